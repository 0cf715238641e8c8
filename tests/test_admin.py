"""Operator pages: dashboard and status behind basic auth, metrics that move when events flow."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from instruqt_crm.config import Settings
from instruqt_crm.receiver.app import create_app
from samples.signing import SECRET, signed, track_event
from tests.engine_helpers import drain

LOGIN = {"RQ_DASHBOARD_USERNAME": "ops", "RQ_DASHBOARD_PASSWORD": "s3cret-pass"}


def client_for(redis_conn: redis.Redis, redis_url: str, **env: str) -> FlaskClient:
    settings = Settings.from_env({"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url, **env})
    return create_app(settings, conn=redis_conn).test_client()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.mark.parametrize("path", ["/rq/", "/status"])
def test_not_mounted_without_credentials(redis_conn, redis_url, path: str) -> None:
    response = client_for(redis_conn, redis_url).get(path, headers=basic("ops", "s3cret-pass"))
    assert response.status_code == 404
    assert "RQ_DASHBOARD_USERNAME" in response.json["reason"]


@pytest.mark.parametrize("path", ["/rq/", "/rq/0/data/queues.json", "/status"])
@pytest.mark.parametrize(
    "headers",
    [{}, basic("ops", "wrong"), basic("someone", "s3cret-pass"), {"Authorization": "Bearer x"}],
)
def test_refused_without_the_right_login(redis_conn, redis_url, path: str, headers) -> None:
    response = client_for(redis_conn, redis_url, **LOGIN).get(path, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert "s3cret-pass" not in response.get_data(as_text=True)


def test_dashboard_with_login_shows_our_queues(redis_conn, redis_url) -> None:
    client = client_for(redis_conn, redis_url, **LOGIN)
    body, headers = signed(track_event())
    assert client.post("/webhooks/instruqt", data=body, headers=headers).status_code == 202
    assert client.get("/rq/", headers=basic("ops", "s3cret-pass")).status_code == 200
    data = client.get("/rq/0/data/queues.json", headers=basic("ops", "s3cret-pass")).json
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
    page = client.get("/status", headers=basic("ops", "s3cret-pass"))
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "Contacts      0 waiting to be sent" in html
    assert "Inbox         0 event(s) accepted, not yet handled" in html
    assert "Plays         0 play record(s) waiting to be sent" in html
    assert 'href="/rq/"' in html
    traced = client.get("/status?who=u7", headers=basic("ops", "s3cret-pass")).get_data(
        as_text=True
    )
    assert "track.challenge_attempted" in traced and "sent" in traced
    hostile = client.get("/status?who=<script>x</script>", headers=basic("ops", "s3cret-pass"))
    assert "<script>x" not in hostile.get_data(as_text=True)


def test_the_dashboard_serves_one_redis_instance(redis_conn, redis_url) -> None:
    client = client_for(redis_conn, redis_url, **LOGIN)
    login = basic("ops", "s3cret-pass")
    assert client.get("/rq/0/data/queues.json", headers=login).status_code == 200
    assert client.get("/rq/1/data/queues.json", headers=login).status_code == 404
