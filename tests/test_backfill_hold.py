"""Learners a backfill changed are held until it is done: sent at once when a live event comes,
never expired or stuck while held; their play records wait without flushes spinning on them;
a backfill event's failure goes back to the backfill lane."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.crm.dryrun import dry_run_records
from instruqt_crm.engine import flush, inbox, ledger, plays, requeue
from instruqt_crm.engine.handling import handle_batch
from instruqt_crm.engine.inbox import Entry
from instruqt_crm.engine.queueing import FLUSH_JOB, QUEUE_NAME, queue
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.engine.worker import build_worker
from instruqt_crm.errors import Category
from instruqt_crm.journal import failures
from instruqt_crm.mapping import load_mapping
from samples.signing import SECRET
from tests.engine_helpers import drain, dry_run_batches, enqueue_all
from tests.fakes.salesforce import FakeSalesforce
from tests.test_plays import learner, play_records
from tests.test_salesforce import adapter

SALESFORCE = load_mapping("mappings/salesforce.yaml")


def started(user: str, play: str = "p1", **extra: Any) -> dict[str, Any]:
    """A track.started of ``user``'s play, with the learner's email as a parameter."""
    return {
        "type": "track.started",
        "timestamp": "2025-03-01T10:00:00Z",
        "user_id": user,
        "participant_id": play,
        "track_id": "trk1",
        "track_slug": "intro",
        "params": {"email": f"{user}@x.co"},
        **extra,
    }


def backfilled(conn: redis.Redis, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Queue events in the backfill lane, as the reader does (and wake the workers)."""
    for message_id, body in events:
        inbox.add(conn, message_id, body, inbox.BACKFILL)
    inbox.wake(conn)


def sent_emails(path: Path) -> list[str]:
    """Every contact the dry-run CRM was sent, one entry per write."""
    return [item["id"] for batch in dry_run_batches(path) for item in batch["upsert"]]


def test_a_live_event_for_a_held_learner_sends_it_at_once_with_the_backfilled_values(
    engine: Path, redis_conn: redis.Redis
) -> None:
    """A live event that changes a held learner sends it while the backfill still reads, with
    what the backfill merged; the backfill's end sends it no more. (A live event that changes
    nothing leaves it held: there is nothing new to show.)"""
    inbox.backfill_reading(redis_conn, 600)  # the reader is still reading
    backfilled(redis_conn, [("backfill:p1:track.started", started("u1"))])
    drain(redis_conn)
    assert ledger.held_count(redis_conn) == 1 and sent_emails(engine) == []
    enqueue_all(redis_conn, [("msg_same", started("u1"))])  # the same play, delivered live
    drain(redis_conn)
    assert ledger.held_count(redis_conn) == 1 and sent_emails(engine) == []
    live = started("u1", type="review.created", review_id="r1", score=4)
    enqueue_all(redis_conn, [("msg_review", {**live, "timestamp": "2025-03-01T11:00:00Z"})])
    drain(redis_conn)
    assert sent_emails(engine) == ["u1@x.co"]
    record = dry_run_records(redis_conn)["u1@x.co"]
    assert record["instruqt_last_track"] == "intro" and record["instruqt_last_review_score"] == 4
    assert ledger.held_count(redis_conn) == 0 and ledger.dirty_count(redis_conn) == 0
    redis_conn.delete(keys.BACKFILL_RUNNING)  # the reader is done
    flush.release_backfilled(redis_conn)
    drain(redis_conn)
    assert sent_emails(engine) == ["u1@x.co"]  # nothing new to send


def test_a_held_learners_state_never_expires_and_a_stopped_reader_releases_it(
    engine: Path, redis_conn: redis.Redis
) -> None:
    """While held, a learner's state has no TTL (STATE_IDLE_DAYS does not apply); once the
    reader's mark is gone (it crashed) and its events are handled, a worker's maintenance
    sends the learner, and its state expires again as usual."""
    inbox.backfill_reading(redis_conn, 600)
    backfilled(redis_conn, [(f"backfill:p{n}:track.started", started(f"u{n}")) for n in range(3)])
    drain(redis_conn)
    assert ledger.held_count(redis_conn) == 3
    assert all(redis_conn.ttl(keys.learner(f"u{n}@x.co")) == -1 for n in range(3))
    redis_conn.delete(keys.BACKFILL_RUNNING)  # as its expiry does when the reader died
    build_worker(redis_conn, simple=True).run_maintenance_tasks()
    drain(redis_conn)
    assert sorted(sent_emails(engine)) == ["u0@x.co", "u1@x.co", "u2@x.co"]
    assert ledger.held_count(redis_conn) == 0
    assert all(redis_conn.ttl(keys.learner(f"u{n}@x.co")) > 0 for n in range(3))


def test_a_requeued_backfill_failure_goes_back_behind_live_events(
    engine: Path, redis_conn: redis.Redis
) -> None:
    """Requeued, a backfill event waits in the backfill lane (live events first), its learner
    is held like the backfill's and sent once that lane is empty."""
    body = started("u1")
    failures.record(
        redis_conn,
        failures.Kind.EVENT,
        Category.OTHER,
        "RuntimeError: boom",
        "backfill:p1:track.started",
        json.dumps(body),
    )
    [failure] = failures.every(redis_conn)
    requeue.requeue(redis_conn, failure.id)
    assert inbox.depth(redis_conn) == 0 and inbox.depth(redis_conn, inbox.BACKFILL) == 1
    drain(redis_conn)
    assert sent_emails(engine) == ["u1@x.co"]
    assert dry_run_records(redis_conn)["u1@x.co"]["instruqt_last_track"] == "intro"


def flush_jobs(conn: redis.Redis) -> int:
    """Flush jobs queued (not yet run)."""
    return sum(1 for job in queue(QUEUE_NAME, conn).get_jobs() if job.func_name == FLUSH_JOB)


def test_play_records_of_held_learners_wait_without_flushes_spinning_on_them(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    """Salesforce: a backfill batch asks for no flush (its learners are held, nothing can be
    sent), the stalled-flush net leaves waiting plays alone while learners are held, and once
    the backfill is done the learners are written, then their plays, each once."""
    env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url, "FLUSH_WINDOW_SECONDS": "0"}
    run = Runtime(Settings.from_env(env), SALESFORCE)
    inbox.backfill_reading(redis_conn, 600)
    entries = [
        Entry(f"{n}-{i}", f"backfill:p{n}:{i}", body, inbox.BACKFILL)
        for n in range(3)
        for i, body in enumerate(learner(f"p{n}", f"u{n}@acme.io", f"u{n}"))
    ]
    handle_batch(redis_conn, run, entries)
    assert ledger.held_count(redis_conn) == 3 and plays.dirty_count(redis_conn) == 3
    assert flush_jobs(redis_conn) == 0
    redis_conn.zadd(keys.DIRTY_PLAYS, {f"p{n}": 1.0 for n in range(3)}, xx=True)  # long ago
    assert flush.wake_stalled(redis_conn, 0) is False
    assert flush_jobs(redis_conn) == 0
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        report = flush.flush(redis_conn, sf, SALESFORCE)  # another learner's flush runs
        assert report.plays.waiting == 3 and report.requests == 0
        redis_conn.delete(keys.BACKFILL_RUNNING)
        assert flush.release_backfilled(redis_conn) == 3
        flush.flush(redis_conn, sf, SALESFORCE)
        assert set(play_records(fake)) == {"p0", "p1", "p2"}
        assert set(fake.by_email("Lead")) == {"u0@acme.io", "u1@acme.io", "u2@acme.io"}
    assert plays.dirty_count(redis_conn) == 0 and ledger.dirty_count(redis_conn) == 0
