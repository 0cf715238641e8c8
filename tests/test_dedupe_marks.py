"""Dedupe marks: small, kept as long as Svix retries, and honoured across the key change."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import redis
from flask.testing import FlaskClient

from instruqt_crm import keys
from instruqt_crm.config import MIN_DEDUPE_SECONDS, Settings
from instruqt_crm.engine import inbox
from instruqt_crm.journal import failures
from instruqt_crm.receiver.app import create_app
from samples.signing import SECRET, signed, track_event

URL = "/webhooks/instruqt"
SVIX_RETRY_SECONDS = 5 + 5 * 60 + 30 * 60 + 2 * 3600 + 5 * 3600 + 10 * 3600 + 10 * 3600


@pytest.fixture
def client(redis_url: str) -> Iterator[FlaskClient]:
    settings = Settings.from_env({"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url})
    with create_app(settings).test_client() as client:
        yield client


def accepted_by_the_previous_version(conn: redis.Redis, message_id: str, value: str) -> None:
    """The mark as the previous version set it (the full SHA-256 in hex, 72 h)."""
    name = f"instruqt_crm:seen:{hashlib.sha256(message_id.encode()).hexdigest()}"
    conn.set(name, value, ex=72 * 3600)


def test_a_delivery_accepted_before_the_upgrade_is_a_repeat_after_it(
    client: FlaskClient, redis_conn: redis.Redis
) -> None:
    accepted_by_the_previous_version(redis_conn, "msg_before_deploy", "1")
    body, headers = signed(track_event("u1"), msg_id="msg_before_deploy")  # Svix's retry
    response = client.post(URL, data=body, headers=headers)
    assert (response.status_code, response.get_json()["status"]) == (200, "duplicate")
    assert inbox.depth(redis_conn) == 0
    assert not redis_conn.exists(keys.seen("msg_before_deploy"))
    assert inbox.enqueue_event(redis_conn, "msg_before_deploy", track_event("u1"), 3600) is False


def test_a_body_refused_before_the_upgrade_is_not_kept_again(
    client: FlaskClient, redis_conn: redis.Redis
) -> None:
    accepted_by_the_previous_version(redis_conn, "msg_bad", "invalid")
    body, headers = signed(b'{"no_type": 1}', msg_id="msg_bad")
    assert client.post(URL, data=body, headers=headers).status_code == 400
    assert failures.counts(redis_conn) == {}  # the previous version kept it already

    body, headers = signed(b'{"no_type": 2}', msg_id="msg_new_bad")
    assert client.post(URL, data=body, headers=headers).status_code == 400
    assert client.post(URL, data=body, headers=headers).status_code == 400  # Svix's retry
    assert failures.counts(redis_conn) == {"invalid_body": 1}
    assert redis_conn.get(keys.seen("msg_new_bad")) == b"0"


def test_a_mark_is_a_short_key_holding_an_integer(redis_conn: redis.Redis) -> None:
    message_id = "msg_2Ev9kqBmZ6cJ1wXW4bYdLgT3a0F"  # as Svix names messages
    assert inbox.enqueue_event(redis_conn, message_id, track_event("u1"), 3600)
    mark = keys.seen(message_id)
    assert len(mark.encode()) < 32  # Redis's smallest key header
    assert redis_conn.object("encoding", mark) == b"int"
    accepted_by_the_previous_version(redis_conn, message_id, "1")
    assert keys.legacy_seen(message_id) in {k.decode() for k in redis_conn.scan_iter()}
    assert redis_conn.memory_usage(mark) < redis_conn.memory_usage(keys.legacy_seen(message_id))


def test_distinct_ids_get_distinct_marks() -> None:
    """72 bits: no two of 200,000 ids share a mark (the odds are in the README)."""
    marks = {keys.seen(f"msg_{number}") for number in range(200_000)}
    assert len(marks) == 200_000


def test_the_default_ttl_outlasts_svix_retries_and_the_floor_stays() -> None:
    ttl = Settings.from_env({}).dedupe_ttl_seconds
    assert ttl == 30 * 3600
    assert ttl > SVIX_RETRY_SECONDS + 8 * 15  # every wait, and each attempt's 15 s timeout
    assert MIN_DEDUPE_SECONDS == 99_000
