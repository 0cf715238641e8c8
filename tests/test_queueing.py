"""Queueing: Redis outage mid-run, the embedded Redis, the JSON serializer."""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator

import pytest
import redis

from instruqt_crm.config import Settings
from instruqt_crm.queueing import (
    QUEUE_NAME,
    connect,
    dedupe_key,
    enqueue_event,
    job_id_for,
    queue,
)
from instruqt_crm.web import create_app
from tests.redis_process import RedisProcess
from tests.signing import SECRET, signed, track_event


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    server.stop()


def test_redis_stopped_mid_test_gives_503_then_retry_succeeds(private_redis: RedisProcess) -> None:
    settings = Settings.from_env(
        {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": private_redis.url}
    )
    app = create_app(settings)
    client = app.test_client()
    first = signed(track_event(user_id="a"))
    assert client.post("/webhooks/instruqt", data=first[0], headers=first[1]).status_code == 202

    private_redis.stop()
    body, headers = signed(track_event(user_id="b"), msg_id="msg_during_outage")
    response = client.post("/webhooks/instruqt", data=body, headers=headers)
    assert response.status_code == 503
    assert client.get("/readyz").status_code == 503

    private_redis.start()  # not persistent: the restarted server is empty
    conn = redis.Redis.from_url(private_redis.url)
    assert not conn.exists(dedupe_key("msg_during_outage"))
    body, headers = signed(track_event(user_id="b"), msg_id="msg_during_outage")  # Svix's retry
    response = client.post("/webhooks/instruqt", data=body, headers=headers)
    assert response.status_code == 202
    assert queue(QUEUE_NAME, conn).job_ids == [job_id_for("msg_during_outage")]


def test_failed_transaction_leaves_no_dedupe_mark(redis_conn: redis.Redis, monkeypatch) -> None:
    from rq import Queue

    def broken(*args, **kwargs):
        raise redis.ConnectionError("connection lost")

    monkeypatch.setattr(Queue, "enqueue_call", broken)
    with pytest.raises(redis.ConnectionError):
        enqueue_event(redis_conn, "msg_x", track_event(), 3600)
    assert not redis_conn.exists(dedupe_key("msg_x"))


def test_jobs_use_the_json_serializer(redis_conn: redis.Redis) -> None:
    enqueue_event(redis_conn, "msg_json", track_event(), 3600)
    job = queue(QUEUE_NAME, redis_conn).jobs[0]
    raw = redis_conn.hget(job.key, "data")
    assert raw is not None
    data = json.loads(zlib.decompress(raw))  # RQ compresses the serialized payload
    assert data[0] == "instruqt_crm.jobs.process_event"
    assert data[2] == ["msg_json", track_event()]


def test_odd_message_ids_get_safe_job_ids() -> None:
    assert job_id_for("msg_abc") == "event-msg_abc"
    odd = job_id_for("a b/c:d" * 30)
    assert odd.startswith("event-") and " " not in odd and len(odd) < 60


def test_embedded_redis_when_redis_url_unset(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    settings = Settings.from_env({"INSTRUQT_WEBHOOK_SECRET": SECRET})
    assert settings.redis_url is None
    conn = connect(settings.redis_url)
    try:
        assert conn.ping()
        assert "not for production" in caplog.text
        app = create_app(settings, conn=conn)
        body, headers = signed(track_event())
        response = app.test_client().post("/webhooks/instruqt", data=body, headers=headers)
        assert response.status_code == 202
        assert queue(QUEUE_NAME, conn).count == 1
    finally:
        conn.shutdown(nosave=True)


def test_interrupted_transaction_is_not_a_duplicate(redis_conn: redis.Redis, monkeypatch) -> None:
    """redis-py raises WatchError when the connection drops while watching: not a duplicate."""
    from redis.client import Pipeline

    def dropped(self, *args, **kwargs):
        raise redis.WatchError("Watched variable changed.")  # what a dropped connection gives

    monkeypatch.setattr(Pipeline, "execute", dropped)
    with pytest.raises(redis.ConnectionError):
        enqueue_event(redis_conn, "msg_dropped", track_event(), 3600)
    assert not redis_conn.exists(dedupe_key("msg_dropped"))
