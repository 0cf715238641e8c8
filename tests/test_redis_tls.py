"""Redis the way platforms hand it out: rediss:// with a self-signed certificate (Heroku Redis).

Every test talks to a real redis-server that speaks TLS only, with a certificate generated
for the test; the URL is given exactly as Heroku gives it (a password, no TLS options).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from click.testing import CliRunner

from instruqt_crm.cli import main
from instruqt_crm.config import Settings
from instruqt_crm.engine.inbox import enqueue_event
from instruqt_crm.engine.queueing import connect, unreachable
from instruqt_crm.receiver import create_app
from samples.signing import SECRET, signed, track_event
from tests.processes import ROOT, Workers, answers, start_web, wait_for
from tests.redis_process import TlsRedisProcess, free_port

LOGIN = {"RQ_DASHBOARD_USERNAME": "ops", "RQ_DASHBOARD_PASSWORD": "dashboard-pass"}


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedisProcess]:
    server = TlsRedisProcess().start()
    yield server
    server.stop()


@pytest.fixture
def tls(tls_redis: TlsRedisProcess) -> Iterator[TlsRedisProcess]:
    tls_redis.client().flushall()
    yield tls_redis


def app_json_defaults() -> dict[str, str]:
    """The config vars app.json gives a new Heroku app (the Heroku button)."""
    env = json.loads((ROOT / "app.json").read_text())["env"]
    return {name: spec["value"] for name, spec in env.items() if "value" in spec}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a_self_signed_certificate_fails_verification_with_what_to_do(tls: TlsRedisProcess) -> None:
    conn = connect(Settings.from_env({"REDIS_URL": tls.url}))  # verification is the default
    with pytest.raises(redis.ConnectionError) as caught:
        conn.ping()
    reason = unreachable(caught.value)
    assert "certificate verify failed" in reason and "REDIS_TLS_VERIFY=false" in reason
    assert "\n" not in reason and tls.password not in reason


def test_without_verification_the_connection_is_tls_and_works(tls: TlsRedisProcess) -> None:
    conn = connect(Settings.from_env({"REDIS_URL": tls.url, "REDIS_TLS_VERIFY": "false"}))
    assert enqueue_event(conn, "msg_1", track_event(), 3600)
    assert tls.client().exists("instruqt_crm:inbox")


def test_a_ca_bundle_verifies_the_certificate(tls: TlsRedisProcess) -> None:
    settings = Settings.from_env({"REDIS_URL": tls.url, "REDIS_TLS_CA_FILE": str(tls.cert)})
    assert connect(settings).ping()


def test_the_urls_own_ssl_cert_reqs_wins(tls: TlsRedisProcess) -> None:
    assert connect(Settings.from_env({"REDIS_URL": f"{tls.url}?ssl_cert_reqs=none"})).ping()


def test_a_ca_bundle_without_verification_is_a_settings_error(tls: TlsRedisProcess) -> None:
    with pytest.raises(ValueError, match="REDIS_TLS_CA_FILE: set, but REDIS_TLS_VERIFY is false"):
        Settings.from_env({"REDIS_TLS_VERIFY": "false", "REDIS_TLS_CA_FILE": str(tls.cert)})


def test_the_cli_and_the_worker_say_what_to_do_in_one_line(
    tls: TlsRedisProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", tls.url)
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 1 and "REDIS_TLS_VERIFY=false" in result.output
    env = {**os.environ, "REDIS_URL": tls.url, "DRY_RUN_PATH": str(tmp_path / "dry.jsonl")}
    env.pop("INSTRUQT_WEBHOOK_SECRET", None)  # the worker does not need it
    done = subprocess.run(
        [sys.executable, "worker.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "worker not started: Redis:" in done.stderr and "REDIS_TLS_VERIFY=false" in done.stderr
    assert "Traceback" not in done.stderr and tls.password not in done.stderr


def test_the_dashboard_reads_through_the_apps_connection(tls: TlsRedisProcess) -> None:
    """rq-dashboard builds a client from a URL on every request; its pages use the app's
    connection instead, so the TLS settings hold and no connection is opened per request."""
    env = {"REDIS_URL": tls.url, "REDIS_TLS_VERIFY": "false", "INSTRUQT_WEBHOOK_SECRET": SECRET}
    app = create_app(Settings.from_env({**env, **LOGIN}))
    client = app.test_client()
    body, headers = signed(track_event())
    assert client.post("/webhooks/instruqt", data=body, headers=headers).status_code == 202
    assert client.get("/readyz").status_code == 200
    login = basic(LOGIN["RQ_DASHBOARD_USERNAME"], LOGIN["RQ_DASHBOARD_PASSWORD"])
    opened = []
    for _ in range(10):
        page = client.get("/rq/0/data/queues.json", headers=login)
        assert page.status_code == 200
        opened.append(len(tls.client().client_list()))
    assert [queue["name"] for queue in page.get_json()["queues"]] == ["instruqt"]
    assert len(set(opened)) == 1  # the same connections throughout
    overview = client.get("/rq/", headers=login).get_data(as_text=True)
    assert "rediss://127.0.0.1" in overview and tls.password not in overview


def connections(server: TlsRedisProcess) -> int:
    """Clients connected to the server now, not counting the one asking."""
    return len(server.client().client_list()) - 1


@pytest.mark.slow
def test_web_and_worker_run_on_the_platforms_url_with_app_json_defaults(
    tls: TlsRedisProcess, tmp_path: Path
) -> None:
    """The Procfile's web and worker against a TLS-only Redis, with REDIS_URL as Heroku gives
    it and app.json's config vars: events reach the (dry-run) CRM, /readyz and /rq answer,
    and the Redis connections stay within Heroku Redis mini's 20."""
    env = {
        **app_json_defaults(),
        **LOGIN,
        "REDIS_URL": tls.url,
        "INSTRUQT_WEBHOOK_SECRET": SECRET,
        "DRY_RUN_PATH": str(tmp_path / "dry-run.jsonl"),
        "FLUSH_WINDOW_SECONDS": "0.2",
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], connections(tls))

    watcher = threading.Thread(target=watch, daemon=True)
    web = start_web(port, env, tmp_path / "web.log")
    try:
        watcher.start()
        wait_for(lambda: answers(f"{base}/readyz"), 30, "gunicorn to be ready")
        with Workers(env, 1, tmp_path) as workers, requests.Session() as session:
            login = basic(LOGIN["RQ_DASHBOARD_USERNAME"], LOGIN["RQ_DASHBOARD_PASSWORD"])
            for number in range(20):
                body, headers = signed(
                    track_event(f"u{number}", params={"email": f"u{number}@example.com"})
                )
                answer = session.post(f"{base}/webhooks/instruqt", data=body, headers=headers)
                assert answer.status_code == 202
                assert session.get(f"{base}/rq/0/data/queues.json", headers=login).ok
            wait_for(lambda: _records(tmp_path) == 20, 60, "20 contacts in the dry-run CRM")
            for _ in range(25):  # the dashboard left open, polling as its page does
                queues = session.get(f"{base}/rq/0/data/queues.json", headers=login)
                assert queues.status_code == 200
                done.wait(0.2)
            assert "instruqt" in {queue["name"] for queue in queues.json()["queues"]}
            assert session.get(f"{base}/readyz").status_code == 200
            assert "Traceback" not in workers.logs()
    finally:
        done.set()
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(timeout=20)
    assert 0 < peak[0] <= 20, f"{peak[0]} Redis connections"


def _records(folder: Path) -> int:
    """Contacts the dry-run CRM wrote."""
    path = folder / "dry-run.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return len({item["id"] for line in lines for item in json.loads(line)["upsert"]})
