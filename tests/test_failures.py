"""The failure registry: each failure keeps its kind and category; requeueing acts by kind."""

from __future__ import annotations

import json

import pytest
import redis
from rq.job import Job

from instruqt_crm import keys
from instruqt_crm.engine import ledger, plays, requeue
from instruqt_crm.engine.inbox import take
from instruqt_crm.engine.queueing import FLUSH_JOB
from instruqt_crm.errors import Category
from instruqt_crm.journal import failures
from instruqt_crm.journal.failures import Kind


def test_a_failure_keeps_its_kind_and_category(redis_conn: redis.Redis) -> None:
    kept = failures.record(redis_conn, Kind.CONTACT, Category.VALIDATION, "bad", "a@b.co", "{}")
    found = failures.get(redis_conn, kept.id)
    assert found == kept
    assert (found.kind, found.category) == (Kind.CONTACT, Category.VALIDATION)
    assert failures.counts(redis_conn) == {"validation": 1}


@pytest.mark.parametrize(("kind", "category"), [("event", "nonsense"), ("maybe", "mapping")])
def test_an_unknown_kind_or_category_is_refused_not_filed_as_other(
    redis_conn: redis.Redis, kind: str, category: str
) -> None:
    with pytest.raises(ValueError):
        failures.record(redis_conn, kind, category, "r", "m", "{}")  # type: ignore[arg-type]
    assert failures.every(redis_conn) == []


def requeued(conn: redis.Redis, kind: Kind, message_id: str, payload: dict) -> Kind:
    failure = failures.record(conn, kind, Category.OTHER, "r", message_id, json.dumps(payload))
    done = requeue.requeue(conn, failure.id)
    assert failures.get(conn, failure.id) is None
    return done


def test_requeueing_an_event_puts_it_back_in_the_inbox(redis_conn: redis.Redis) -> None:
    body = {"type": "track.started", "user_id": "u1"}
    assert requeued(redis_conn, Kind.EVENT, "msg_1", body) == Kind.EVENT
    [entry] = take(redis_conn, "tester", 10)
    assert (entry.message_id, entry.body) == ("msg_1", body)


def test_requeueing_a_contact_or_play_marks_it_for_sending(redis_conn: redis.Redis) -> None:
    requeued(redis_conn, Kind.CONTACT, "a@b.co", {"email": "a@b.co", "properties": {}})
    requeued(redis_conn, Kind.PLAY, "play:p1", {"participant_id": "p1", "email": "a@b.co"})
    assert ledger.dirty(redis_conn, 10) == ["a@b.co"]
    assert plays.dirty(redis_conn, 10) == ["p1"]
    assert redis_conn.exists(keys.pending_job(FLUSH_JOB))  # and a flush is on its way


def test_a_failed_flush_is_run_again(redis_conn: redis.Redis) -> None:
    assert requeued(redis_conn, Kind.FLUSH, "flush", {}) == Kind.FLUSH
    assert redis_conn.exists(keys.pending_job(FLUSH_JOB))


def test_a_body_that_is_not_an_event_cannot_be_requeued(redis_conn: redis.Redis) -> None:
    kept = failures.record(redis_conn, Kind.BODY, Category.INVALID_BODY, "r", "m", b"{oops")
    with pytest.raises(requeue.NotRequeueable):
        requeue.requeue(redis_conn, kept.id)
    assert failures.get(redis_conn, kept.id) == kept
    with pytest.raises(KeyError):
        requeue.requeue(redis_conn, "no-such-id")


@pytest.mark.parametrize(
    ("payload", "message_id", "kind"),
    [
        ('{"type": "track.started", "user_id": "u1"}', "msg_1", Kind.EVENT),
        ('{"email": "a@b.co", "properties": {}, "events": []}', "a@b.co", Kind.CONTACT),
        ('{"participant_id": "p1", "email": "a@b.co", "fields": {}}', "play:p1", Kind.PLAY),
        ("{}", "flush", Kind.FLUSH),
        ("{oops", "msg_2", Kind.BODY),
    ],
)
def test_a_failure_recorded_without_a_kind_reads_it_off_its_payload(
    redis_conn: redis.Redis, payload: str, message_id: str, kind: Kind
) -> None:
    """Failures kept by versions before the RQ registry (some recorded no kind) move into it
    when first read, readable and requeueable."""
    fields = {"id": "old1", "category": "other", "reason": "r", "message_id": message_id}
    redis_conn.hset(
        keys.legacy_failure("old1"), mapping={**fields, "at": "1.0", "payload": payload}
    )
    redis_conn.zadd(keys.LEGACY_FAILURES, {"old1": 1.0})
    [failure] = failures.every(redis_conn)
    assert failure.kind == kind and failure.category == Category.OTHER
    assert (failure.id, failure.at, failure.payload) == ("old1", 1.0, payload)
    assert not redis_conn.exists(keys.LEGACY_FAILURES, keys.legacy_failure("old1"))
    assert failures.registry(redis_conn).get_job_ids() == ["old1"]


def test_open_counts_read_each_failures_category_not_its_record(redis_conn: redis.Redis) -> None:
    # /metrics reads these on every scrape: a record holds the event's body (up to 256 KiB)
    big = json.dumps({"type": "track.started", "content": "x" * 100_000})
    mapping = failures.record(redis_conn, Kind.EVENT, Category.MAPPING, "r", "m1", big)
    failures.record(redis_conn, Kind.CONTACT, Category.VALIDATION, "r", "a@b.co", "{}")
    redis_conn.hset(Job.key_for(mapping.id), "meta", "not the record")  # read: it would be OTHER
    assert failures.open_counts(redis_conn) == {"mapping": 1, "validation": 1}


def test_open_counts_include_failures_filed_before_the_category_field(
    redis_conn: redis.Redis,
) -> None:
    old = failures.record(redis_conn, Kind.EVENT, Category.IDENTITY, "r", "m1", "{}")
    redis_conn.hdel(Job.key_for(old.id), failures.CATEGORY_FIELD)  # as an earlier version filed it
    failures.record(redis_conn, Kind.EVENT, Category.IDENTITY, "r", "m2", "{}")
    assert failures.open_counts(redis_conn) == {"identity": 2}
    failures.remove(redis_conn, old.id)
    assert failures.open_counts(redis_conn) == {"identity": 1}
