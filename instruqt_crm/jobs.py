"""RQ job functions: top-level, importable, plain JSON arguments.

``process_event`` (one per webhook): resolve the learner, apply the mapping, merge into the
ledger, schedule a flush. ``flush_contacts`` (debounced): send dirty contacts in batches.
``retry_parked``: look up emails for learners whose events wait, and expire old ones.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any

import redis
from rq import Retry, get_current_job

from . import failures, identity, ledger, trace
from .errors import RetryableError
from .events import Event, parse_event
from .mapping import MappingFailure, apply_event
from .queueing import KEY_PREFIX, QUEUE_NAME, STATS_KEY, queue
from .runtime import Runtime, current_runtime
from .sync import flush

log = logging.getLogger(__name__)
FLUSH_RETRY = Retry(max=8, interval=[5, 15, 30, 60, 120, 300, 600, 1200])
PENDING = f"{KEY_PREFIX}pending:"


def current_connection() -> redis.Redis:
    """The Redis connection of the job being run."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("not running inside an RQ job")
    return job.connection


def count(conn: redis.Redis, outcome: str, event_type: str) -> None:
    """Count an event outcome, overall and by type."""
    with conn.pipeline() as pipe:
        pipe.hincrby(STATS_KEY, f"events:{outcome}", 1)
        pipe.hincrby(STATS_KEY, f"events:{outcome}:{event_type}", 1)
        pipe.execute()


def schedule_once(
    conn: redis.Redis, func: str, delay: float, hold: float, force: bool = False
) -> bool:
    """Enqueue ``func`` in ``delay`` s unless one is already pending (the mark lasts ``hold`` s)."""
    marked = conn.set(f"{PENDING}{func}", "1", nx=True, px=max(1, int(hold * 1000)))
    if not marked and not force:
        return False
    flushes = queue(QUEUE_NAME, conn)
    options: dict[str, Any] = {
        "retry": FLUSH_RETRY,
        "result_ttl": 600,
        "failure_ttl": 30 * 86400,
        "job_timeout": 120,
    }
    if delay <= 0:  # behind what already waits: those events join this flush
        flushes.enqueue(func, **options)
    else:  # after the window, ahead of newer events
        flushes.enqueue_in(timedelta(seconds=delay), func, at_front=True, **options)
    return True


def schedule_flush(
    conn: redis.Redis, runtime: Runtime, delay: float | None = None, force: bool = False
) -> bool:
    """Ask for a flush after the debounce window (once, however many events arrive)."""
    window = runtime.settings.flush_window_seconds if delay is None else delay
    return schedule_once(conn, "instruqt_crm.jobs.flush_contacts", window, window + 30, force)


def process_event(message_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Turn one accepted Instruqt event into ledger changes."""
    conn = current_connection()
    return handle_event(conn, current_runtime(), parse_event(message_id, body))


def handle_event(conn: redis.Redis, runtime: Runtime, event: Event) -> dict[str, Any]:
    """Resolve, map and merge one event; returns what happened to it."""
    resolver = identity.IdentityResolver(conn, runtime.mapping.identity, runtime.lookup)
    direct = identity.email_in(event.params, runtime.mapping.identity.email_params)
    if direct and event.user_id:
        identity.remember(conn, event.user_id, direct)
        _release(conn, runtime, event.user_id, direct)
    kind = runtime.mapping.classify(event.type)
    if kind != "mapped":
        count(conn, "skipped" if kind == "ignored" else "unknown", event.type)
        log.info(
            "event %s (%s) %s by the mapping",
            event.id,
            event.type,
            "ignored" if kind == "ignored" else "not mapped",
        )
        return {"status": kind}
    found = resolver.resolve(event)
    if found.email is None:
        return _wait_for_identity(conn, runtime, event)
    if found.source == "lookup" and event.user_id:  # earlier events may wait for this answer
        _release(conn, runtime, event.user_id, found.email)
    return _merge(conn, runtime, event, found.email)


def _merge(conn: redis.Redis, runtime: Runtime, event: Event, email: str) -> dict[str, Any]:
    """Apply the mapping and merge the result into the learner's ledger."""
    try:
        changes = apply_event(runtime.mapping, event, email)
    except MappingFailure as exc:
        failures.record(conn, "mapping", exc.reason, event.id, json.dumps(event.body))
        trace.note(
            conn,
            email,
            "failed",
            event.user_id,
            event_id=event.id,
            type=event.type,
            reason=exc.reason,
        )
        count(conn, "failed", event.type)
        log.error("event %s (%s) failed in the mapping: %s", event.id, event.type, exc.reason)
        return {"status": "failed", "reason": exc.reason}
    changed = (
        ledger.merge(conn, email, changes, event.id, email, event.user_id) if changes else False
    )
    trace.note(
        conn,
        email,
        "event",
        event.user_id,
        event_id=event.id,
        type=event.type,
        timestamp=event.body.get("timestamp"),
        changed=changed,
        changes={change.name: change.value for change in changes},
    )
    if changed:
        schedule_flush(conn, runtime)
    count(conn, "merged", event.type)
    log.info(
        "event %s (%s) merged for user %s: %d properties, %s",
        event.id,
        event.type,
        event.user_id,
        len(changes),
        "changed" if changed else "no change",
    )
    return {"status": "merged", "changed": changed}


def _wait_for_identity(conn: redis.Redis, runtime: Runtime, event: Event) -> dict[str, Any]:
    """Park an event whose learner has no email yet (or fail it if it never can have one)."""
    if not event.user_id:
        reason = "event has no user_id and no email parameter: the learner cannot be identified"
        failures.record(conn, "identity", reason, event.id, json.dumps(event.body))
        count(conn, "failed", event.type)
        return {"status": "failed", "reason": reason}
    identity.park(conn, event)
    count(conn, "parked", event.type)
    schedule_once(conn, "instruqt_crm.jobs.retry_parked", identity.BACKOFF[0], identity.BACKOFF[0])
    return {"status": "parked"}


def _release(conn: redis.Redis, runtime: Runtime, user_id: str, email: str) -> int:
    """Merge every event that was waiting for this user's email."""
    released = identity.release(conn, user_id)
    for event_id, body in released:
        _merge(conn, runtime, parse_event(event_id, body), email)
    if released:
        log.info("released %d waiting event(s) of user %s", len(released), user_id)
    return len(released)


def flush_contacts() -> dict[str, Any]:
    """Send dirty contacts to the CRM (RQ retries this job on transient CRM failures)."""
    conn = current_connection()
    runtime = current_runtime()
    conn.delete(f"{PENDING}instruqt_crm.jobs.flush_contacts")
    settings = runtime.settings
    report = flush(
        conn,
        runtime.adapter(conn),
        runtime.mapping,
        lease=settings.flush_lease_seconds,
        window=settings.flush_window_seconds,
    )
    if report.wait is not None:
        schedule_once(conn, "instruqt_crm.jobs.flush_contacts", report.wait, report.wait + 30)
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
    conn.delete(f"{PENDING}instruqt_crm.jobs.retry_parked")
    return retry_parked_users(conn, current_runtime())


def retry_parked_users(
    conn: redis.Redis, runtime: Runtime, now: float | None = None
) -> dict[str, Any]:
    """Release parked learners whose email can now be found; expire those past the wait."""
    moment = time.time() if now is None else now
    resolver = identity.IdentityResolver(conn, runtime.mapping.identity, runtime.lookup)
    max_wait = runtime.settings.identity_wait_days * 86400
    released = expired = 0
    for user_id in identity.due(conn, moment):
        found = resolver.resolve_user(user_id)
        if found.email:
            released += _release(conn, runtime, user_id, found.email)
        elif moment - (identity.parked_since(conn, user_id) or moment) >= max_wait:
            expired += _expire(conn, user_id, runtime.settings.identity_wait_days)
        else:
            identity.postpone(conn, user_id, moment)
    upcoming = identity.next_due(conn)
    if upcoming is not None:
        delay = max(1.0, upcoming - moment)
        schedule_once(conn, "instruqt_crm.jobs.retry_parked", delay, delay)
    return {"released": released, "expired": expired}


def _expire(conn: redis.Redis, user_id: str, days: float) -> int:
    """Give up on a learner's waiting events: each becomes a counted, visible failure."""
    events = identity.release(conn, user_id)
    reason = f"no email found for user {user_id} within {days:g} days"
    for event_id, body in events:
        failures.record(conn, "identity", reason, event_id, json.dumps(body))
        count(conn, "expired", str(body.get("type")))
    log.warning("%d event(s) of user %s expired: %s", len(events), user_id, reason)
    return len(events)
