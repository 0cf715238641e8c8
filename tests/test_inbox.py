"""The inbox: events kept once, drained in batches, never lost to a dead or failing worker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from instruqt_crm import keys
from instruqt_crm.crm.dryrun import dry_run_records
from instruqt_crm.engine import handling, identity, inbox, jobs, requeue
from instruqt_crm.engine.queueing import QUEUE_NAME, queue
from instruqt_crm.engine.worker import build_worker
from instruqt_crm.journal import failures
from samples.signing import track_event
from tests.engine_helpers import drain, enqueue_all, merged_ids


def challenge(number: int, learner: int | None = None) -> tuple[str, dict[str, object]]:
    """A delivery: one challenge completed by learner ``learner`` (default: its own learner)."""
    who = number if learner is None else learner
    body = track_event(f"u{who}", challenge_id=f"c{number}", params={"email": f"u{who}@x.co"})
    return f"msg_{number}", body


def merged(conn: redis.Redis) -> int:
    return int(conn.hget(keys.STATS, "events:merged") or 0)


def test_the_dedupe_mark_lasts_dedupe_ttl(redis_conn: redis.Redis) -> None:
    """The seen mark expires dedupe_ttl after the event was kept; until then a redelivery is
    refused."""
    message_id, body = challenge(1)
    dedupe_ttl = 86_400
    started = time.monotonic()
    assert inbox.enqueue_event(redis_conn, message_id, body, dedupe_ttl) is True
    left_ms = redis_conn.pttl(keys.seen(message_id))
    spent_ms = (time.monotonic() - started) * 1000
    assert dedupe_ttl * 1000 - spent_ms - 1 <= left_ms <= dedupe_ttl * 1000
    assert inbox.enqueue_event(redis_conn, message_id, body, dedupe_ttl) is False
    assert inbox.depth(redis_conn) == 1


def test_a_burst_queues_one_drain_job(redis_conn: redis.Redis) -> None:
    assert enqueue_all(redis_conn, (challenge(n) for n in range(250))) == 250
    assert enqueue_all(redis_conn, (challenge(n) for n in range(5))) == 0  # redeliveries
    assert inbox.depth(redis_conn) == 250
    assert queue(QUEUE_NAME, redis_conn).count == 1


def test_drain_handles_every_event_in_batches_and_empties_the_inbox(
    engine: Path, redis_conn: redis.Redis
) -> None:
    enqueue_all(redis_conn, (challenge(n, learner=n % 40) for n in range(250)))
    drain(redis_conn)
    assert merged(redis_conn) == 250
    assert inbox.depth(redis_conn) == 0
    records = dry_run_records(redis_conn).values()
    counts = [int(str(r["instruqt_challenges_completed_count"])) for r in records]
    assert len(counts) == 40 and sum(counts) == 250


def test_a_drain_job_yields_and_queues_the_next(
    engine: Path, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch per job. It (like any test that runs an RQ worker in-process) sometimes waited
    60 s at a worker's teardown for RQ's pubsub thread: see conftest's
    no_worker_command_channel."""
    monkeypatch.setattr(jobs, "DRAIN_SECONDS", 0.0)
    enqueue_all(redis_conn, (challenge(n) for n in range(250)))
    drain(redis_conn)
    assert merged(redis_conn) == 250
    finished = queue(QUEUE_NAME, redis_conn).finished_job_registry.get_job_ids()
    done = Job.fetch_many(finished, connection=redis_conn, serializer=JSONSerializer)
    drains = [job for job in done if job and job.func_name == inbox.DRAIN_JOB]
    assert len(drains) >= 3  # 100 + 100 + 50: one batch per job


def test_events_held_by_a_dead_worker_are_taken_over(engine: Path, redis_conn: redis.Redis) -> None:
    enqueue_all(redis_conn, (challenge(n) for n in range(30)))
    held = inbox.take(redis_conn, "killed-worker", 20)  # taken, then the process died
    assert len(held) == 20
    drain(redis_conn)
    assert merged(redis_conn) == 30
    assert inbox.depth(redis_conn) == 0
    names = [info["name"] for info in redis_conn.xinfo_consumers(keys.INBOX, inbox.GROUP)]
    assert b"killed-worker" not in names  # the dead consumer is forgotten


def test_events_held_too_long_by_a_live_consumer_are_taken_over(
    engine: Path, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueue_all(redis_conn, (challenge(n) for n in range(10)))
    inbox.take(redis_conn, "stuck", 10)
    monkeypatch.setattr(inbox, "STALE_MS", 0)
    drain(redis_conn)
    assert merged(redis_conn) == 10


def test_an_event_that_raises_becomes_a_failure_and_spares_its_batch(
    engine: Path, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = handling.Batch.handle

    def fragile(batch, event):
        if event.id == "msg_3":
            raise ValueError("cannot handle this one")
        return real(batch, event)

    enqueue_all(redis_conn, (challenge(n) for n in range(8)))
    with monkeypatch.context() as patch:
        patch.setattr(handling.Batch, "handle", fragile)
        drain(redis_conn)
    assert merged(redis_conn) == 7
    [failure] = failures.every(redis_conn)
    assert failure.message_id == "msg_3" and "ValueError: cannot handle this one" in failure.reason
    assert requeue.requeue(redis_conn, failure.id) == "event"
    drain(redis_conn)
    assert merged(redis_conn) == 8 and not failures.every(redis_conn)


def test_a_redis_error_leaves_the_batch_pending_for_the_next_job(
    engine: Path, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = handling.Batch.handle

    def flaky(batch, event):
        calls["n"] += 1
        if calls["n"] == 5:
            raise redis.ConnectionError("connection reset")
        return real(batch, event)

    enqueue_all(redis_conn, (challenge(n) for n in range(10)))
    with monkeypatch.context() as patch:
        patch.setattr(handling.Batch, "handle", flaky)
        SimpleWorker(
            [queue(QUEUE_NAME, redis_conn)], connection=redis_conn, serializer=JSONSerializer
        ).work(burst=True)
    assert inbox.depth(redis_conn) == 10  # nothing acknowledged: the batch is still held
    assert inbox.wake(redis_conn) or queue(QUEUE_NAME, redis_conn).count
    drain(redis_conn)
    assert merged(redis_conn) >= 10 and inbox.depth(redis_conn) == 0
    assert not failures.every(redis_conn)


def test_worker_start_and_maintenance_wake_waiting_events(
    engine: Path, redis_conn: redis.Redis
) -> None:
    enqueue_all(redis_conn, (challenge(n) for n in range(3)))
    queue(QUEUE_NAME, redis_conn).empty()  # the drain job was lost
    redis_conn.delete(inbox.DRAIN_MARK)
    worker = build_worker(redis_conn, simple=True)
    worker.run_maintenance_tasks()
    assert queue(QUEUE_NAME, redis_conn).count == 1
    worker.work(burst=True)
    assert merged(redis_conn) == 3


def test_events_released_by_a_failed_batch_stay_parked_until_merged(
    engine: Path, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = track_event("u-late", challenge_id="c-waiting")  # no email: parked
    enqueue_all(redis_conn, [("msg_waiting", waiting)])
    drain(redis_conn)
    assert identity.parked_events(redis_conn, "u-late")
    revealing = track_event("u-late", challenge_id="c-reveal", params={"email": "late@x.co"})
    enqueue_all(redis_conn, [("msg_reveal", revealing), challenge(1)])
    real = handling.Batch.handle

    def dies_after_the_release(batch, event):
        if event.id == "msg_1":
            raise redis.ConnectionError("connection reset")
        return real(batch, event)

    with monkeypatch.context() as patch:
        patch.setattr(handling.Batch, "handle", dies_after_the_release)
        build_worker(redis_conn, simple=True).work(burst=True)
    assert [i for i, _ in identity.parked_events(redis_conn, "u-late")] == ["msg_waiting"]
    inbox.wake(redis_conn)
    drain(redis_conn)
    assert identity.parked_events(redis_conn, "u-late") == []
    assert merged_ids(redis_conn, "late@x.co") == {"msg_waiting", "msg_reveal"}


def test_an_unreadable_inbox_entry_becomes_a_failure(engine: Path, redis_conn: redis.Redis) -> None:
    redis_conn.xadd(keys.INBOX, {"id": "msg_odd", "body": "{not json"})
    enqueue_all(redis_conn, [challenge(1)])
    drain(redis_conn)
    assert merged(redis_conn) == 1 and inbox.depth(redis_conn) == 0
    [failure] = failures.every(redis_conn)
    assert failure.message_id == "msg_odd" and "{not json" in failure.payload


def test_live_events_are_taken_before_backfill_events(redis_conn: redis.Redis) -> None:
    """A batch is of one lane; the backfill lane is taken only while no live event waits, and
    the live lane is looked at again before every batch."""
    for number in range(150):
        message_id, body = challenge(1000 + number)
        inbox.add(redis_conn, message_id, body, inbox.BACKFILL)
    enqueue_all(redis_conn, (challenge(n) for n in range(30)))
    first = inbox.take(redis_conn, "w1", 100)
    assert len(first) == 30 and {e.lane for e in first} == {inbox.LIVE}
    inbox.ack(redis_conn, [e.entry_id for e in first], inbox.LIVE)
    second = inbox.take(redis_conn, "w1", 100)
    assert len(second) == 100 and {e.lane for e in second} == {inbox.BACKFILL}
    inbox.ack(redis_conn, [e.entry_id for e in second], inbox.BACKFILL)
    enqueue_all(redis_conn, (challenge(n) for n in range(30, 35)))  # arrives mid-backfill
    third = inbox.take(redis_conn, "w1", 100)
    assert [e.message_id for e in third] == [f"msg_{n}" for n in range(30, 35)]
    inbox.ack(redis_conn, [e.entry_id for e in third], inbox.LIVE)
    assert inbox.depth(redis_conn) == 0 and inbox.depth(redis_conn, inbox.BACKFILL) == 50


def test_a_killed_workers_backfill_events_are_taken_over(
    engine: Path, redis_conn: redis.Redis
) -> None:
    """Backfill entries a dead worker held are reclaimed like live ones and handled."""
    for number in range(20):
        message_id, body = challenge(number)
        inbox.add(redis_conn, message_id, body, inbox.BACKFILL)
    held = inbox.take(redis_conn, "killed-worker", 20)
    assert len(held) == 20 and held[0].lane == inbox.BACKFILL
    assert inbox.wake(redis_conn)
    drain(redis_conn)
    assert merged(redis_conn) == 20
    assert inbox.depth(redis_conn, inbox.BACKFILL) == 0


def test_a_drain_job_says_how_many_events_came_from_a_backfill(
    engine: Path, redis_conn: redis.Redis
) -> None:
    enqueue_all(redis_conn, (challenge(n) for n in range(3)))
    for number in range(3, 7):
        message_id, body = challenge(number)
        inbox.add(redis_conn, message_id, body, inbox.BACKFILL)
    drain(redis_conn)
    finished = queue(QUEUE_NAME, redis_conn).finished_job_registry.get_job_ids()
    descriptions = [
        Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).description
        for job_id in finished
    ]
    assert "process_inbox: 7 events (4 from a backfill)" in descriptions


def test_each_backfill_run_has_its_own_reading_mark(redis_conn: redis.Redis) -> None:
    """Two backfills at once: the first to stop does not end the other's mark; a mark whose
    reader died lapses by itself."""
    assert not inbox.backfill_reading(redis_conn)
    inbox.backfill_reading(redis_conn, 600, "run-a")
    inbox.backfill_reading(redis_conn, 600, "run-b")
    inbox.backfill_stopped(redis_conn, "run-a")
    assert inbox.backfill_reading(redis_conn) and not inbox.backfill_done(redis_conn)
    redis_conn.zadd(keys.BACKFILL_RUNNING, {"run-b": time.time() - 1})  # its time ran out
    assert not inbox.backfill_reading(redis_conn) and inbox.backfill_done(redis_conn)
