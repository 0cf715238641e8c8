"""The status page (/status) people read: its tables, a Requeue button per failure doing what
``instruqt-crm failed requeue`` does, untrusted text shown and never run; the front page (/).
Read through Flask's client, and in a real browser (headless chromium) against gunicorn."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from flask.testing import FlaskClient

from instruqt_crm.config import Settings
from instruqt_crm.crm import hubspot_daily
from instruqt_crm.crm.adapters import build_adapter
from instruqt_crm.crm.base import request_budget
from instruqt_crm.engine import inbox, mapping_record
from instruqt_crm.engine.inbox import enqueue_event
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.engine.worker import build_worker
from instruqt_crm.errors import Category
from instruqt_crm.journal import failures
from instruqt_crm.journal.failures import Kind
from instruqt_crm.receiver.app import create_app
from instruqt_crm.receiver.status_page import ago
from samples.signing import signed
from tests.browser import browser
from tests.engine_helpers import drain, dry_run_batches, engine_env, installed
from tests.fakes.hubspot import FakeHubSpot
from tests.html_tables import row, table_rows
from tests.processes import answers, start_web, wait_for
from tests.redis_process import free_port
from tests.test_hubspot_daily import change
from tests.test_requeue import event, write_mapping
from tests.test_untrusted_redis import trapped_job

PASSWORD = "s3cret-passphrase"
LOGIN = {"RQ_DASHBOARD_USERNAME": "ops", "RQ_DASHBOARD_PASSWORD": PASSWORD}
AUTH = ("ops", PASSWORD)
HERE = {"Origin": "http://localhost"}  # where Flask's test client sends requests
HOSTILE_USER = "<script>document.title='pwned'</script>"
WHEN = event("track.started", "u", "e")["timestamp"]  # the time of every test event


def runtime(redis_url: str, tmp_path: Path, mapping: Path | None = None, **env: str) -> Runtime:
    """The engine's runtime: dry-run CRM, the default mapping or ``mapping``."""
    extra = {"MAPPING_PATH": str(mapping)} if mapping is not None else {}
    return Runtime.from_settings(Settings.from_env(engine_env(redis_url, tmp_path, **extra, **env)))


def client_for(conn: redis.Redis, redis_url: str, run: Runtime, **env: str) -> FlaskClient:
    """The receiver with the dashboard login, on ``run``'s mapping (``env`` added)."""
    settings = Settings.from_env(
        {
            **engine_env(redis_url, run.settings.dry_run_path.parent),
            "MAPPING_PATH": str(run.settings.mapping_path),
            **LOGIN,
            **env,
        }
    )
    return create_app(settings, conn=conn).test_client()


def broken(redis_url: str, tmp_path: Path) -> Runtime:
    """A mapping whose review template divides by the score: a review of 0 fails."""
    mapping = write_mapping(tmp_path / "broken.yaml", "{{ 100 // event.score }}", "datetime")
    return runtime(redis_url, tmp_path, mapping)


def fixed(redis_url: str, tmp_path: Path) -> Runtime:
    """The same mapping, fixed."""
    mapping = write_mapping(tmp_path / "fixed.yaml", "{{ event.score }}", "datetime")
    return runtime(redis_url, tmp_path, mapping)


@pytest.fixture
def broken_run(redis_url: str, tmp_path: Path) -> Runtime:
    """The engine on the broken mapping."""
    return broken(redis_url, tmp_path)


@pytest.fixture
def client(redis_conn: redis.Redis, redis_url: str, broken_run: Runtime) -> FlaskClient:
    """The receiver, with the dashboard login, on the broken mapping."""
    return client_for(redis_conn, redis_url, broken_run)


def a_failing_review(conn: redis.Redis, run: Runtime, user_id: str = "u2") -> failures.Failure:
    """A review of score 0 handled under ``run``: the failure it leaves."""
    review = event("review.created", user_id, "bob@example.com", score=0, review_id="r1")
    enqueue_event(conn, "msg_review", review, 60)
    with installed(run):
        drain(conn)
    (failure,) = failures.every(conn)
    return failure


def the_pipeline(conn: redis.Redis, run: Runtime) -> failures.Failure:
    """What the status page shows: a merged and sent learner, one waiting for an email, a
    template failure (of a hostile user id), a worker running ``run``'s mapping."""
    enqueue_event(conn, "msg_ann", event("track.started", "u1", "ann@example.com"), 60)
    waiting = event("track.started", "u-waiting", "x@example.com")
    waiting.pop("custom_parameters")
    enqueue_event(conn, "msg_waiting", waiting, 60)
    failure = a_failing_review(conn, run, HOSTILE_USER)
    worker = build_worker(conn, simple=True, name="w1")
    worker.register_birth()
    mapping_record.record_running(conn, "w1", run.mapping, gone=lambda name: False)
    return failure


def test_the_status_page_shows_each_table(
    redis_conn: redis.Redis, broken_run: Runtime, client: FlaskClient
) -> None:
    run = broken_run
    failure = the_pipeline(redis_conn, run)
    body, headers = signed(b"not json")  # a signed body that is no event: kept, not requeueable
    assert client.post("/webhooks/instruqt", data=body, headers=headers).status_code == 400

    page = client.get("/status", auth=AUTH)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert row(html, "pipeline", "Workers")[1] == "1"
    assert row(html, "pipeline", "Inbox")[1] == "0"
    assert row(html, "pipeline", "Learners waiting")[1:] == [
        "1",
        "for an email (1 event(s)); below",
    ]
    assert row(html, "pipeline", "Open failures")[1] == "2"
    assert row(html, "pipeline", "Last flush")[1].endswith(" ago")  # ann was sent (dry run)
    assert row(html, "counters", "merged")[1] == "1"
    assert row(html, "counters", "mapping")[1:] == ["1", "1"]  # recorded ever, open

    listed = {cells[5]: cells for cells in table_rows(html)["failures"][1:]}
    when, kind, category, what, reason, _, action = listed[failure.id]
    assert when == time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(failure.at))
    assert (kind, category, action) == ("event", "mapping", "Requeue")
    assert what == f"event review.created of user {HOSTILE_USER} at {WHEN} (msg_review)"
    assert "template failed" in reason and "ZeroDivisionError" in reason
    (body_failure,) = [cells for cells in listed.values() if cells[1] == "body"]
    assert body_failure[6] == "not requeueable"
    assert f'action="/status/failures/{failure.id}/requeue"' in html

    assert row(html, "waiting", "u-waiting")[1] == "1"
    assert "dry-run" in row(html, "crm", "CRM")[1]
    assert row(html, "mapping", "File's digest")[1] == f"{run.mapping.digest} (hubspot)"
    assert row(html, "mapping", run.mapping.digest) == [run.mapping.digest, "1", "the file's"]
    assert row(html, "redis", "Memory")[1].startswith("memory ")
    assert "<script>document" not in html  # shown as text, never as markup
    traced = client.post("/status", data={"who": "u-waiting"}, auth=AUTH, headers=HERE)
    found = traced.get_data(as_text=True)
    assert row(found, "trace", "msg_waiting") == ["msg_waiting", "track.started", WHEN]


def test_requeue_on_the_page_does_what_failed_requeue_does(
    redis_url: str,
    redis_conn: redis.Redis,
    tmp_path: Path,
    broken_run: Runtime,
    client: FlaskClient,
) -> None:
    failure = a_failing_review(redis_conn, broken_run)

    answer = client.post(f"/status/failures/{failure.id}/requeue", auth=AUTH, headers=HERE)
    assert answer.status_code == 303  # then a GET: a reload never requeues again
    target = urlsplit(answer.headers["Location"])
    assert target.path == "/status"
    assert parse_qs(target.query) == {"requeued": [failure.id], "kind": ["event"]}
    assert failures.every(redis_conn) == []  # off the list (and RQ's failed registry) at once
    assert inbox.depth(redis_conn) == 1  # the event is back where the workers take it
    html = client.get(answer.headers["Location"], auth=AUTH).get_data(as_text=True)
    assert f"Failure {failure.id} requeued: process the event again." in html
    assert "No open failures." in html

    with installed(fixed(redis_url, tmp_path)):
        drain(redis_conn)
    sent = [c for b in dry_run_batches(broken_run.settings.dry_run_path) for c in b["upsert"]]
    assert sent[-1]["id"] == "bob@example.com"
    assert sent[-1]["properties"]["instruqt_last_review_score"] == 0


@pytest.mark.parametrize(
    ("auth", "headers", "code"),
    [
        (None, HERE, 401),
        (("ops", "wrong-password"), HERE, 401),
        (AUTH, {}, 403),
        (AUTH, {"Origin": "https://evil.example"}, 403),
        (AUTH, {"Referer": "https://evil.example/status"}, 403),
    ],
)
def test_requeue_needs_the_login_and_the_same_origin(
    redis_conn: redis.Redis, broken_run: Runtime, client: FlaskClient, auth, headers, code: int
) -> None:
    failure = a_failing_review(redis_conn, broken_run)
    answer = client.post(f"/status/failures/{failure.id}/requeue", auth=auth, headers=headers)
    assert answer.status_code == code
    assert client.get(f"/status/failures/{failure.id}/requeue", auth=AUTH).status_code == 405
    assert [f.id for f in failures.every(redis_conn)] == [failure.id]  # still there
    assert inbox.depth(redis_conn) == 0


def test_a_failure_that_cannot_be_requeued_or_is_gone_says_why(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    run = runtime(redis_url, tmp_path)
    kept = failures.record(
        redis_conn, Kind.BODY, Category.INVALID_BODY, "not a JSON object", "msg_b", b"{"
    )
    client = client_for(redis_conn, redis_url, run)
    refused = client.post(f"/status/failures/{kept.id}/requeue", auth=AUTH, headers=HERE)
    assert refused.status_code == 409
    html = refused.get_data(as_text=True)
    assert f"failure {kept.id}: the payload is not an event, cannot requeue" in html
    assert [f.id for f in failures.every(redis_conn)] == [kept.id]
    gone = client.post("/status/failures/0123456789abcdef/requeue", auth=AUTH, headers=HERE)
    assert gone.status_code == 404
    assert "No open failure 0123456789abcdef: it was requeued or purged" in gone.get_data(
        as_text=True
    )


def test_untrusted_text_is_shown_never_run(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """Reasons, payloads, user ids and searches come from outside: escaped everywhere, and the
    page allows no script, frame or foreign form anyway."""
    run = runtime(redis_url, tmp_path)
    hostile = '<img src=x onerror="alert(1)">'
    failures.record(redis_conn, Kind.EVENT, Category.OTHER, hostile, "msg_h", json.dumps(
        {"type": hostile, "user_id": hostile}))  # fmt: skip
    waiting = event("track.started", hostile, "x@example.com")
    waiting.pop("custom_parameters")
    enqueue_event(redis_conn, "msg_w", waiting, 60)
    with installed(run):
        drain(redis_conn)
    client = client_for(redis_conn, redis_url, run)
    pages = [
        client.get("/status", auth=AUTH),
        client.get(f"/status?requeued={hostile}&kind=event", auth=AUTH),
        client.post("/status", data={"who": hostile}, auth=AUTH, headers=HERE),
    ]
    for page in pages:
        html = page.get_data(as_text=True)
        assert "<img" not in html and "<script" not in html
        assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
        policy = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert page.headers["Cache-Control"] == "no-store"
    assert "requeued:" not in pages[1].get_data(as_text=True)  # no notice from a forged URL
    assert row(pages[0].get_data(as_text=True), "waiting", hostile)[1] == "1"


def test_a_foreign_job_among_the_failures_is_read_never_unpickled(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """A job in the failed queue's registry whose meta and result are pickles (written by
    someone with Redis access): listed as not requeueable, nothing loaded."""
    marker = tmp_path / "unpickled"
    job_id = trapped_job(redis_conn, marker)
    redis_conn.zadd(failures.registry(redis_conn).key, {job_id: time.time() + 3600})
    client = client_for(redis_conn, redis_url, runtime(redis_url, tmp_path))
    html = client.get("/status", auth=AUTH).get_data(as_text=True)
    listed = {cells[5]: cells for cells in table_rows(html)["failures"][1:]}
    assert listed[job_id][1] == "job" and listed[job_id][6] == "not requeueable"
    refused = client.post(f"/status/failures/{job_id}/requeue", auth=AUTH, headers=HERE)
    assert refused.status_code == 409
    assert not marker.exists()


def test_the_crm_table_shows_the_budget_left_and_the_daily_limit(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    with FakeHubSpot(daily_limit=1000) as fake:
        env = {"HUBSPOT_ACCESS_TOKEN": fake.token, "HUBSPOT_API_BASE": fake.url}
        run = runtime(redis_url, tmp_path, **env)
        client = client_for(redis_conn, redis_url, run, **env)
        before = client.get("/status", auth=AUTH).get_data(as_text=True)
        hub = build_adapter(run.settings, run.mapping, redis_conn)  # as the worker builds it
        hub.upsert([change(1)])
        budget = request_budget(hub)
        assert budget is not None
        least = budget.remaining()
        html = client.get("/status", auth=AUTH).get_data(as_text=True)
        most = budget.remaining()  # requests leave the window as time passes: a bracket
        reading = hubspot_daily.reading(redis_conn, "hubspot")
    assert row(before, "crm", "CRM")[1] == "hubspot via hubspot"
    assert row(before, "crm", "Request budget left")[1] == (
        "90 of 90 per 10.5 s (all workers together)"
    )
    assert row(before, "crm", "Daily limit")[1] == "use not read yet"
    shown = row(html, "crm", "Request budget left")[1]
    assert least < 90 and least <= int(shown.split(" of ")[0]) <= most
    assert row(html, "crm", "Pause")[1] == "none"
    assert reading is not None
    assert row(html, "crm", "Daily limit")[1].startswith(
        f"{reading['used']} of 1000 requests used today (0 %)"
    )


def test_the_front_page_links_to_the_status_page_and_the_dashboard(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    run = runtime(redis_url, tmp_path)
    failures.record(redis_conn, Kind.EVENT, Category.OTHER, "a secret reason", "msg_1", "{}")
    html = client_for(redis_conn, redis_url, run).get("/").get_data(as_text=True)  # no login needed
    assert 'href="/status"' in html and 'href="/rq/"' in html and 'href="/metrics"' in html
    assert "a secret reason" not in html and "METRICS_TOKEN" not in html  # no figures here
    off = client_for(redis_conn, redis_url, run, RQ_DASHBOARD_USERNAME="", RQ_DASHBOARD_PASSWORD="")
    html = off.get("/").get_data(as_text=True)
    assert 'href="/status"' not in html and "RQ_DASHBOARD_USERNAME" in html
    locked = client_for(redis_conn, redis_url, run, METRICS_TOKEN="a-long-enough-token")
    assert "METRICS_TOKEN" in locked.get("/").get_data(as_text=True)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "never"), (0.4, "0 s"), (119, "119 s"), (120, "2 min"), (7199, "119 min"),
     (7200, "2 h 0 min"), (90061, "25 h 1 min"), (2 * 86400 + 3 * 3600, "2 d 3 h")],
)  # fmt: skip
def test_ages_read_in_the_units_that_say_them(seconds: float | None, shown: str) -> None:
    assert ago(seconds) == shown


@pytest.mark.slow
def test_the_status_page_in_a_real_browser(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, broken_run: Runtime
) -> None:
    """The Procfile's gunicorn, the page in headless chromium: its tables read right, the
    hostile user id shows as text (no script ran), Requeue works; screenshots in tmp_path."""
    run = broken_run
    failure = the_pipeline(redis_conn, run)
    port = free_port()
    env = {**engine_env(redis_url, tmp_path), "MAPPING_PATH": str(run.settings.mapping_path)}
    web = start_web(port, {**env, **LOGIN}, tmp_path / "web.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{url}/healthz"), 30, "gunicorn to answer /healthz")
        with browser(tmp_path) as page:
            login = base64.b64encode(f"ops:{PASSWORD}".encode()).decode()
            page.send_header("Authorization", f"Basic {login}")
            page.open(f"{url}/")
            page.click("a[href='/status']")
            assert page.title() == "instruqt-crm status"  # the hostile id's script never ran
            page.screenshot(tmp_path / "status.png")
            text = page.text("#failures")
            assert f"event review.created of user {HOSTILE_USER} at" in text
            assert "ZeroDivisionError" in text and "Failures 1 open" in text
            assert "Workers 1 worker process(es) alive" in page.text("#pipeline")
            assert "u-waiting 1" in page.text("#waiting")
            assert f"{run.mapping.digest} 1 the file's" in page.text("#mapping")
            page.click(f"form[action='/status/failures/{failure.id}/requeue'] button")
            assert urlsplit(page.url()).path == "/status"
            notice = page.text("p.notice")
            assert notice == f"Failure {failure.id} requeued: process the event again."
            assert "No open failures." in page.text("#failures")
            assert page.text("#pipeline").count("Inbox 1 event(s) accepted") == 1
            page.screenshot(tmp_path / "status-requeued.png")
            page.click("#waiting form button")  # Trace
            assert "msg_waiting track.started" in page.text("#trace")
            assert page.find_all("meta[http-equiv='refresh']") == []  # the trace stays put
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(timeout=30)
    assert failures.every(redis_conn) == [] and inbox.depth(redis_conn) == 1
