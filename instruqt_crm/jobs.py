"""RQ job functions: top-level, importable, no arguments (all work waits in Redis).

``process_inbox`` (queued when events arrive): take accepted events from the inbox in
batches and handle them (``handling``). ``flush_contacts`` (debounced): send dirty contacts
in batches. ``retry_parked``: look up emails for learners whose events wait, expire old ones.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import redis
from rq import get_current_job
from rq.job import Job

from . import failures, identity, inbox, ledger
from .errors import RetryableError
from .handling import Batch, handle_batch, release, schedule_flush
from .queueing import FLUSH_JOB, PENDING, RETRY_PARKED_JOB, schedule_once
from .runtime import Runtime, current_runtime
from .sync import flush
from .workers import worker_gone

log = logging.getLogger(__name__)
DRAIN_BATCH = 100  # events taken from the inbox at a time
DRAIN_SECONDS = 2.0  # then the job yields, so flush jobs at the queue's front get a turn


def current_job() -> Job:
    """The RQ job being run."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("not running inside an RQ job")
    return job


def current_connection() -> redis.Redis:
    """The Redis connection of the job being run."""
    return current_job().connection


def process_inbox() -> dict[str, Any]:
    """Handle accepted events from the inbox, a batch at a time, for up to DRAIN_SECONDS."""
    job = current_job()
    conn, runtime = job.connection, current_runtime()
    conn.delete(inbox.DRAIN_MARK)  # events added from now on queue another drain job
    me = job.worker_name or job.id
    reclaimed = inbox.reclaim(conn, me, lambda name: worker_gone(conn, name))
    deadline = time.monotonic() + DRAIN_SECONDS
    own, handled = True, Counter[str]()
    while True:
        entries = inbox.take(conn, me, DRAIN_BATCH, own_pending=own)
        if not entries and own:
            own = False  # what this worker held before (retries, reclaimed) is done
            continue
        if not entries:
            break
        handled.update(handle_batch(conn, runtime, entries))
        inbox.ack(conn, [entry.entry_id for entry in entries])
        if time.monotonic() >= deadline:
            inbox.wake(conn)
            break
    return {"reclaimed": reclaimed, **handled}


def flush_contacts() -> dict[str, Any]:
    """Send dirty contacts to the CRM (RQ retries this job on transient CRM failures)."""
    conn = current_connection()
    runtime = current_runtime()
    conn.delete(f"{PENDING}{FLUSH_JOB}")
    settings = runtime.settings
    report = flush(
        conn,
        runtime.adapter(conn),
        runtime.mapping,
        lease=settings.flush_lease_seconds,
        window=settings.flush_window_seconds,
        hold=settings.flush_hold_seconds,
    )
    if report.wait is not None:
        schedule_once(conn, FLUSH_JOB, report.wait, report.wait + 30)
    elif report.retry:
        raise RetryableError(f"{report.retry} contact(s) could not be written yet")
    elif report.locked or ledger.dirty_count(conn):
        schedule_flush(conn, runtime)
    return {
        "synced": report.synced,
        "rejected": report.rejected,
        "requests": report.requests,
        "locked": report.locked,
    }


def retry_parked() -> dict[str, Any]:
    """Look up emails for learners whose events are due; expire those waiting too long."""
    conn = current_connection()
    conn.delete(f"{PENDING}{RETRY_PARKED_JOB}")
    return retry_parked_users(conn, current_runtime())


def retry_parked_users(
    conn: redis.Redis, runtime: Runtime, now: float | None = None
) -> dict[str, Any]:
    """Release parked learners whose email can now be found; expire those past the wait."""
    moment = time.time() if now is None else now
    due = identity.due(conn, moment)
    batch = Batch(conn, runtime, due)
    max_wait = runtime.settings.identity_wait_days * 86400
    released = expired = 0
    for user_id in due:
        found = batch.resolver.resolve_user(user_id)
        if found.email:
            released += release(batch, user_id, found.email)
        elif moment - (identity.parked_since(conn, user_id) or moment) >= max_wait:
            expired += _expire(batch, user_id, runtime.settings.identity_wait_days)
        else:
            identity.postpone(conn, user_id, moment)
    batch.commit()
    upcoming = identity.next_due(conn)
    if upcoming is not None:
        delay = max(1.0, upcoming - moment)
        schedule_once(conn, RETRY_PARKED_JOB, delay, delay)
    return {"released": released, "expired": expired}


def _expire(batch: Batch, user_id: str, days: float) -> int:
    """Give up on a learner's waiting events: each becomes a counted, visible failure."""
    events = identity.parked_events(batch.conn, user_id)
    reason = f"no email found for user {user_id} within {days:g} days"
    for event_id, body in events:
        failures.record(batch.conn, "identity", reason, event_id, json.dumps(body))
        batch.count("expired", str(body.get("type")))
    batch.unpark.append((user_id, [event_id for event_id, _ in events]))
    log.warning("%d event(s) of user %s expired: %s", len(events), user_id, reason)
    return len(events)
