"""Queueing: Redis outage mid-run, the embedded Redis, the JSON serializer."""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator

import pytest
import redis

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.engine import inbox
from instruqt_crm.engine.inbox import enqueue_event
from instruqt_crm.engine.queueing import QUEUE_NAME, connect, queue
from instruqt_crm.receiver.app import create_app
from samples.signing import SECRET, signed, track_event
from tests.redis_process import RedisProcess


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
    assert not conn.exists(keys.seen("msg_during_outage"))
    body, headers = signed(track_event(user_id="b"), msg_id="msg_during_outage")  # Svix's retry
    response = client.post("/webhooks/instruqt", data=body, headers=headers)
    assert response.status_code == 202
    assert [fields[b"id"] for _, fields in conn.xrange(keys.INBOX)] == [b"msg_during_outage"]
    assert queue(QUEUE_NAME, conn).count == 1  # its drain job


def test_refused_write_leaves_no_dedupe_mark(redis_conn: redis.Redis) -> None:
    redis_conn.set(keys.INBOX, "not a stream")  # Redis refuses the XADD (as under OOM)
    with pytest.raises(redis.ResponseError):
        enqueue_event(redis_conn, "msg_x", track_event(), 3600)
    assert not redis_conn.exists(keys.seen("msg_x"))
    redis_conn.delete(keys.INBOX)
    assert enqueue_event(redis_conn, "msg_x", track_event(), 3600)  # Svix's retry is kept


def test_jobs_use_the_json_serializer(redis_conn: redis.Redis) -> None:
    enqueue_event(redis_conn, "msg_json", track_event(), 3600)
    job = queue(QUEUE_NAME, redis_conn).jobs[0]
    raw = redis_conn.hget(job.key, "data")
    assert raw is not None
    data = json.loads(zlib.decompress(raw))  # RQ compresses the serialized payload
    assert data[0] == "instruqt_crm.engine.jobs.process_inbox"
    assert data[2] == []


def test_lost_drain_job_is_requeued_by_wake(redis_conn: redis.Redis, monkeypatch) -> None:
    """The receiver kept the event but could not queue the drain job: the safety net does."""
    from rq import Queue

    def broken(*args, **kwargs):
        raise redis.ConnectionError("connection lost")

    with monkeypatch.context() as patch:
        patch.setattr(Queue, "enqueue", broken)
        with pytest.raises(redis.ConnectionError):
            enqueue_event(redis_conn, "msg_lost_job", track_event(), 3600)
    assert inbox.depth(redis_conn) == 1 and queue(QUEUE_NAME, redis_conn).count == 0
    assert not enqueue_event(redis_conn, "msg_lost_job", track_event(), 3600)  # retry: duplicate
    assert not inbox.wake(redis_conn)  # the drain mark still holds (at most 10 s)
    redis_conn.delete(inbox.DRAIN_MARK)
    assert inbox.wake(redis_conn)
    assert queue(QUEUE_NAME, redis_conn).count == 1


def test_embedded_redis_when_redis_url_unset(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    settings = Settings.from_env({"INSTRUQT_WEBHOOK_SECRET": SECRET})
    assert settings.redis_url is None
    conn = connect(settings)
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
