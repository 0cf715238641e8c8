"""RQ job functions: top-level, importable, no arguments (all work waits in Redis).

Each takes the job's Redis connection and the process's ``Runtime`` and hands them to the
engine. ``process_inbox`` (queued when events arrive): take accepted events from the inbox
in batches and handle them (``handling``). ``flush_contacts`` (debounced): send dirty
contacts and plays in batches (``flush``). ``retry_parked``: look up emails for learners
whose events wait, expire old ones.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import redis
from rq import get_current_job
from rq.job import Job

from instruqt_crm.errors import RetryableError

from . import flush, inbox, runtime
from .handling import handle_batch, retry_waiting
from .queueing import FLUSH_JOB, RETRY_PARKED_JOB, job_started
from .worker import worker_gone

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
    conn, run = job.connection, runtime.current()
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
        handled.update(handle_batch(conn, run, entries))
        inbox.ack(conn, [entry.entry_id for entry in entries])
        if time.monotonic() >= deadline:
            inbox.wake(conn)
            break
    return {"reclaimed": reclaimed, **handled}


def flush_contacts() -> dict[str, Any]:
    """Send dirty contacts and plays to the CRM, then do what the flush decided next."""
    conn, run = current_connection(), runtime.current()
    job_started(conn, FLUSH_JOB)
    settings = run.settings
    report = flush.flush(
        conn,
        run.adapter(conn),
        run.mapping,
        lease=settings.flush_lease_seconds,
        window=settings.flush_window_seconds,
        hold=settings.flush_hold_seconds,
    )
    match report.next:
        case flush.Reschedule(after=after):
            flush.schedule_flush(conn, after)
        case flush.RetryLater(reason=reason):
            raise RetryableError(reason)  # RQ retries the job on its backoff
    return {
        "synced": report.contacts.synced,
        "rejected": report.contacts.rejected,
        "requests": report.requests,
        "locked": report.locked,
        "next": getattr(report.next, "why", None),
    }


def retry_parked() -> dict[str, Any]:
    """Look up emails for learners whose events are due; expire those waiting too long."""
    conn = current_connection()
    job_started(conn, RETRY_PARKED_JOB)
    retried = retry_waiting(conn, runtime.current())
    return {"released": retried.released, "expired": retried.expired}
