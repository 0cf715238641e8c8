"""Operator pages: dashboard and status behind basic auth, metrics that move when events flow."""

from __future__ import annotations

import base64
import json
import os
import signal
from pathlib import Path

import pytest
import redis
import requests
from flask.testing import FlaskClient
from rq.job import JobStatus

from instruqt_crm.config import Settings
from instruqt_crm.engine.queueing import QUEUE_NAME, RETRY_PARKED_JOB, queue
from instruqt_crm.receiver.app import create_app
from samples.signing import SECRET, signed, track_event
from tests.engine_helpers import drain
from tests.html_tables import row
from tests.processes import answers, start_web, wait_for
from tests.redis_process import free_port

PASSWORD = "s3cret-passphrase"
LOGIN = {"RQ_DASHBOARD_USERNAME": "ops", "RQ_DASHBOARD_PASSWORD": PASSWORD}
SAME_ORIGIN = {"Origin": "http://localhost"}  # where the Flask test client sends requests


def client_for(redis_conn: redis.Redis, redis_url: str, **env: str) -> FlaskClient:
    settings = Settings.from_env({"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url, **env})
    return create_app(settings, conn=redis_conn).test_client()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


LOGGED_IN = basic("ops", PASSWORD)
LOGGED_IN_HERE = {**LOGGED_IN, **SAME_ORIGIN}


@pytest.mark.parametrize("path", ["/rq/", "/status"])
def test_not_mounted_without_credentials(redis_conn, redis_url, path: str) -> None:
    response = client_for(redis_conn, redis_url).get(path, headers=basic("ops", PASSWORD))
    assert response.status_code == 404
    assert "RQ_DASHBOARD_USERNAME" in response.json["reason"]


@pytest.mark.parametrize("path", ["/rq/", "/rq/0/data/queues.json", "/status"])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("ops", "wrong"),
        basic("someone", PASSWORD),
        {"Authorization": "Bearer x"},
    ],
)
def test_refused_without_the_right_login(redis_conn, redis_url, path: str, headers) -> None:
    response = client_for(redis_conn, redis_url, **LOGIN).get(path, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert PASSWORD not in response.get_data(as_text=True)


def test_dashboard_with_login_shows_our_queues(redis_conn, redis_url) -> None:
    client = client_for(redis_conn, redis_url, **LOGIN)
    body, headers = signed(track_event())
    assert client.post("/webhooks/instruqt", data=body, headers=headers).status_code == 202
    assert client.get("/rq/", headers=basic("ops", PASSWORD)).status_code == 200
    data = client.get("/rq/0/data/queues.json", headers=basic("ops", PASSWORD)).json
    counts = {q["name"]: q["count"] for q in data["queues"]}
    assert counts["instruqt"] == 1


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or (
            line.startswith(name + "{") and line.split(" ")[0] == name
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_when_events_flow(redis_conn, redis_url, engine: Path) -> None:
    client = client_for(redis_conn, redis_url)
    before = client.get("/metrics").get_data(as_text=True)
    assert metric(before, 'instruqt_crm_webhook_requests_total{outcome="queued"}') == 0
    for number in range(3):
        body, headers = signed(
            track_event(user_id=f"u{number}", params={"email": f"u{number}@x.io"})
        )
        client.post("/webhooks/instruqt", data=body, headers=headers)
    body, headers = signed(track_event(), secret="whsec_" + base64.b64encode(b"other").decode())
    client.post("/webhooks/instruqt", data=body, headers=headers)
    queued = client.get("/metrics").get_data(as_text=True)
    assert metric(queued, "instruqt_crm_inbox_depth") == 3
    assert metric(queued, 'instruqt_crm_queue_depth{queue="instruqt"}') == 1  # one drain job
    drain(redis_conn)
    after = client.get("/metrics").get_data(as_text=True)
    assert metric(after, 'instruqt_crm_webhook_requests_total{outcome="queued"}') == 3
    assert metric(after, 'instruqt_crm_webhook_requests_total{outcome="bad_signature"}') == 1
    assert (
        metric(
            after, 'instruqt_crm_events_total{outcome="merged",type="track.challenge_attempted"}'
        )
        == 3
    )
    assert metric(after, "instruqt_crm_flush_latency_seconds_count") == 3
    assert metric(after, 'instruqt_crm_queue_depth{queue="instruqt"}') == 0
    assert metric(after, "instruqt_crm_inbox_depth") == 0
    assert metric(after, "instruqt_crm_dirty_contacts") == 0
    assert metric(after, "instruqt_crm_dirty_plays") == 0


def test_status_page_shows_figures_and_traces_a_learner(
    redis_conn, redis_url, engine: Path
) -> None:
    client = client_for(redis_conn, redis_url, **LOGIN)
    body, headers = signed(track_event(user_id="u7", params={"email": "grace@example.com"}))
    client.post("/webhooks/instruqt", data=body, headers=headers)
    drain(redis_conn)
    page = client.get("/status", headers=basic("ops", PASSWORD))
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert row(html, "pipeline", "Contacts to send")[1] == "0"
    assert row(html, "pipeline", "Inbox")[1:] == ["0", "event(s) accepted, not yet handled"]
    assert row(html, "pipeline", "Play records to send")[1] == "0"
    assert 'href="/rq/"' in html
    assert '<form method="post" action="/status#trace">' in html
    traced = client.post("/status", data={"who": "u7"}, headers={**LOGGED_IN, **SAME_ORIGIN})
    assert traced.status_code == 200
    assert "track.challenge_attempted" in traced.get_data(as_text=True)
    hostile = client.post(
        "/status", data={"who": "<script>x</script>"}, headers={**LOGGED_IN, **SAME_ORIGIN}
    )
    assert "<script>x" not in hostile.get_data(as_text=True)


def test_the_status_search_is_a_same_origin_post(redis_conn, redis_url, engine: Path) -> None:
    """A learner's email never goes into a URL (nor access logs): GET ignores ``who``."""
    client = client_for(redis_conn, redis_url, **LOGIN)
    body, headers = signed(track_event(user_id="u7", params={"email": "grace@example.com"}))
    client.post("/webhooks/instruqt", data=body, headers=headers)
    drain(redis_conn)
    by_url = client.get("/status?who=grace@example.com", headers=LOGGED_IN)
    assert by_url.status_code == 200
    html = by_url.get_data(as_text=True)
    assert "grace@example.com" not in html and "track.challenge_attempted" not in html
    assert row(html, "pipeline", "Contacts to send")[1] == "0"  # the figures only
    found = client.post("/status", data={"who": "grace@example.com"}, headers=LOGGED_IN_HERE)
    assert "track.challenge_attempted" in found.get_data(as_text=True)
    for headers in ({}, {"Origin": "https://evil.example"}, {"Referer": "https://evil.example/"}):
        refused = client.post("/status", data={"who": "u7"}, headers={**LOGGED_IN, **headers})
        assert refused.status_code == 403
        assert "track.challenge_attempted" not in refused.get_data(as_text=True)


def test_the_dashboard_serves_one_redis_instance(redis_conn, redis_url) -> None:
    client = client_for(redis_conn, redis_url, **LOGIN)
    login = basic("ops", PASSWORD)
    assert client.get("/rq/0/data/queues.json", headers=login).status_code == 200
    assert client.get("/rq/1/data/queues.json", headers=login).status_code == 404


def failed_job(conn: redis.Redis) -> str:
    """A job in the failed registry, as a worker leaves one."""
    jobs = queue(QUEUE_NAME, conn)
    job = jobs.enqueue(RETRY_PARKED_JOB)
    jobs.remove(job.id)
    job.set_status(JobStatus.FAILED)
    jobs.failed_job_registry.add(job, ttl=3600, exc_string="boom")
    return job.id


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://localhost:8080"},  # another port
        {"Origin": "https://localhost"},  # another scheme
        {"Origin": "http://localhost.evil.example"},
        {"Referer": "https://evil.example/rq/"},
        {"Referer": "http://localhost.evil.example/rq/"},
        {"Origin": "https://evil.example", "Referer": "http://localhost/rq/"},
    ],
)
@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT", "PATCH"])
def test_dashboard_changes_need_the_same_origin(
    redis_conn, redis_url, headers: dict[str, str], method: str
) -> None:
    client = client_for(redis_conn, redis_url, **LOGIN)
    job_id = failed_job(redis_conn)
    for path in (f"/rq/job/{job_id}/delete", f"/rq/job/{job_id}/requeue", "/rq/requeue/instruqt"):
        response = client.open(path, method=method, headers={**LOGGED_IN, **headers})
        assert response.status_code == 403, path
        assert "cross-origin request refused" in response.json["reason"]
    assert queue(QUEUE_NAME, redis_conn).failed_job_registry.get_job_ids() == [job_id]


@pytest.mark.parametrize(
    "headers",
    [
        SAME_ORIGIN,
        {"Origin": "http://LOCALHOST:80"},
        {"Referer": "http://localhost/rq/0/view/jobs"},
        {"Origin": "https://localhost", "X-Forwarded-Proto": "https"},  # behind Heroku's router
    ],
)
def test_dashboard_changes_from_its_own_pages_are_served(redis_conn, redis_url, headers) -> None:
    client = client_for(redis_conn, redis_url, **LOGIN)
    job_id = failed_job(redis_conn)
    requeued = client.post(f"/rq/job/{job_id}/requeue", headers={**LOGGED_IN, **headers})
    assert requeued.status_code == 200 and requeued.json["status"] == "OK"
    assert queue(QUEUE_NAME, redis_conn).job_ids == [job_id]
    deleted = client.post(f"/rq/job/{job_id}/delete", headers={**LOGGED_IN, **headers})
    assert deleted.json["status"] == "OK" and queue(QUEUE_NAME, redis_conn).count == 0


def test_the_login_is_checked_before_the_origin(redis_conn, redis_url) -> None:
    client = client_for(redis_conn, redis_url, **LOGIN)
    response = client.post("/rq/requeue/instruqt", headers={"Origin": "https://evil.example"})
    assert response.status_code == 401


def test_requeue_all_is_refused_by_get(redis_conn, redis_url) -> None:
    """rq-dashboard also requeued every failed job on a GET (a link or an image could)."""
    client = client_for(redis_conn, redis_url, **LOGIN)
    job_id = failed_job(redis_conn)
    for method in ("GET", "HEAD"):
        response = client.open("/rq/requeue/instruqt", method=method, headers=LOGGED_IN_HERE)
        assert response.status_code == 405
        assert response.headers["Allow"] == "POST"
    failed = queue(QUEUE_NAME, redis_conn).failed_job_registry
    assert failed.get_job_ids() == [job_id]
    response = client.post("/rq/requeue/instruqt", headers=LOGGED_IN_HERE)
    assert response.json == {"status": "OK", "count": 1}
    assert failed.get_job_ids() == [] and queue(QUEUE_NAME, redis_conn).job_ids == [job_id]


def test_reading_pages_needs_no_origin(redis_conn, redis_url) -> None:
    client = client_for(redis_conn, redis_url, **LOGIN)
    headers = {**LOGGED_IN, "Origin": "https://evil.example"}
    assert client.get("/rq/0/data/queues.json", headers=headers).status_code == 200
    assert client.get("/status", headers=headers).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("access_log", [False, True])
def test_gunicorn_logs_json_lines_and_the_access_log_only_when_asked(
    redis_conn, redis_url, tmp_path: Path, access_log: bool
) -> None:
    """The Procfile's gunicorn: its own lines JSON like ours; no access log unless
    WEB_ACCESS_LOG, then one line per request (control characters escaped), paths without
    their query strings."""
    port = free_port()
    env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url, **LOGIN}
    if access_log:
        env["WEB_ACCESS_LOG"] = "true"
    log_path = tmp_path / "web.log"
    web = start_web(port, env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{url}/healthz"), 30, "gunicorn to answer /healthz")
        with requests.Session() as session:
            session.auth = ("ops", PASSWORD)
            pages = [
                session.get(f"{url}/status?who=grace@example.com"),
                session.get(f"{url}/readyz?token=abc123"),
                session.get(f'{url}/healthz%0A1.2.3.4 [forged] "GET /x HTTP/1.1" 200'),
                session.post(
                    f"{url}/status",
                    data={"who": "ada@example.com"},
                    headers={"Origin": url},
                ),
            ]
        assert [page.status_code for page in pages] == [200, 200, 404, 200]
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(timeout=30)
    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line: one JSON object
    server = [line["msg"] for line in lines if line["logger"] == "gunicorn.error"]
    assert any(msg.startswith("Booting worker") for msg in server), server
    requests_logged = [line["msg"] for line in lines if line["logger"] == "gunicorn.access"]
    for leak in ("grace@example.com", "ada@example.com", "abc123", "?", "s3cret"):
        assert leak not in text, leak
    if not access_log:
        assert requests_logged == []
        return
    for request_line in ('"GET /status HTTP/1.1" 200', '"GET /readyz HTTP/1.1" 200'):
        assert len([msg for msg in requests_logged if request_line in msg]) == 1, request_line
    assert len([msg for msg in requests_logged if '"POST /status HTTP/1.1" 200' in msg]) == 1
    (forged,) = [msg for msg in requests_logged if "forged" in msg]
    assert forged.startswith("127.0.0.1 ") and "/healthz\\x0a1.2.3.4" in forged  # escaped
