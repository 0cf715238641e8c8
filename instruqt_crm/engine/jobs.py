"""RQ job functions: top-level, importable, no arguments (all work waits in Redis).

Each takes the job's Redis connection and the process's ``Runtime`` and hands them to the
engine. ``process_inbox`` (queued when events arrive): take accepted events from the inbox
in batches and handle them (``handling``). ``flush_contacts`` (debounced): send dirty
contacts and plays in batches (``flush``). ``retry_parked``: look up emails for learners
whose events wait, expire old ones. ``requeue_failure``: the function of every failure's
job (``journal.failures``), run when RQ requeues it: do its work again (``requeue``).

Each job ends with a description saying what it did, as the dashboard shows it.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rq import get_current_job
from rq.job import Job

from instruqt_crm.crm.adapters import adapter_name
from instruqt_crm.errors import RetryableError
from instruqt_crm.journal import failures

from . import flush, inbox, requeue, runtime
from .handling import handle_batch, retry_waiting
from .queueing import FLUSH_JOB, RETRY_PARKED_JOB, job_started
from .worker import worker_gone

DRAIN_BATCH = 100  # events taken from the inbox at a time
DRAIN_SECONDS = 2.0  # then the job yields, so flush jobs at the queue's front get a turn
BACKFILL_DRAIN_SECONDS = 0.5  # sooner after backfill batches: a live event's flush waits less


def current_job() -> Job:
    """The RQ job being run."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("not running inside an RQ job")
    return job


def process_inbox() -> dict[str, Any]:
    """Handle accepted events from the inbox, a batch at a time, for up to DRAIN_SECONDS
    (BACKFILL_DRAIN_SECONDS once it took backfill events)."""
    job = current_job()
    conn, run = job.connection, runtime.current()
    conn.delete(inbox.DRAIN_MARK)  # events added from now on queue another drain job
    me = job.worker_name or job.id
    reclaimed = inbox.reclaim(conn, me, lambda name: worker_gone(conn, name))
    started = time.monotonic()
    deadline = started + DRAIN_SECONDS
    own, handled, backfilled = True, Counter[str](), 0
    while True:
        entries = inbox.take(conn, me, DRAIN_BATCH, own_pending=own)
        if not entries and own:
            own = False  # what this worker held before (retries, reclaimed) is done
            continue
        if not entries:
            break
        handled.update(handle_batch(conn, run, entries))
        inbox.ack(conn, [entry.entry_id for entry in entries], entries[0].lane)
        if entries[0].lane == inbox.BACKFILL:
            backfilled += len(entries)
            deadline = min(deadline, started + BACKFILL_DRAIN_SECONDS)
        if time.monotonic() >= deadline:
            inbox.wake(conn)
            break
    if backfilled:
        flush.release_backfilled(conn)  # the backfill's last events: send its learners
    job.description = _events_line(handled, backfilled)
    return {"reclaimed": reclaimed, "backfill": backfilled, **handled}


def _events_line(handled: Counter[str], backfilled: int = 0) -> str:
    """``process_inbox: 100 events (40 from a backfill), 3 failed, 2 waiting for an email``."""
    words = {"failed": "failed", "parked": "waiting for an email", "skipped": "skipped"}
    parts = [f"{handled[status]} {word}" for status, word in words.items() if handled[status]]
    events = f"{handled.total()} events" + (
        f" ({backfilled} from a backfill)" if backfilled else ""
    )
    return f"process_inbox: {', '.join([events, *parts])}"


def flush_contacts() -> dict[str, Any]:
    """Send dirty contacts and plays to the CRM, then do what the flush decided next."""
    job = current_job()
    conn, run = job.connection, runtime.current()
    job_started(conn, FLUSH_JOB)
    settings = run.settings
    report = flush.flush(
        conn,
        run.adapter(conn),
        run.mapping,
        lease=settings.flush_lease_seconds,
        window=settings.flush_window_seconds,
        hold=settings.flush_hold_seconds,
        idle_seconds=settings.state_idle_seconds,
    )
    job.description = _flush_line(report, CRM_NAMES[adapter_name(settings, run.mapping)])
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


CRM_NAMES = {"hubspot": "HubSpot", "salesforce": "Salesforce", "dry-run": "the dry run"}


def _flush_line(report: flush.FlushReport, crm: str) -> str:
    """``flush: 87 contacts → HubSpot, 2 rejected; 5 play records`` (or why it sent none)."""
    if report.locked:
        return "flush: another flush was running"
    contacts, played = report.contacts, report.plays
    line = f"flush: {contacts.synced} contacts → {crm}"
    line += "".join(
        f", {count} {word}"
        for count, word in ((contacts.rejected, "rejected"), (contacts.retry, "to retry"))
        if count
    )
    if played.synced or played.rejected:
        line += f"; {played.synced} play records, {played.rejected} rejected"
    return line + f" ({report.requests} request{'' if report.requests == 1 else 's'})"


def retry_parked() -> dict[str, Any]:
    """Look up emails for learners whose events are due; expire those waiting too long."""
    job = current_job()
    conn = job.connection
    job_started(conn, RETRY_PARKED_JOB)
    retried = retry_waiting(conn, runtime.current())
    job.description = (
        f"retry_parked: {retried.released} event(s) released, {retried.expired} expired"
    )
    return {"released": retried.released, "expired": retried.expired}


def requeue_failure() -> dict[str, Any]:
    """Do a failure's work again: RQ ran this because the failure's job was requeued (the
    dashboard's "Requeue"), so it is off the failed registry; what is done is what
    ``instruqt-crm failed requeue`` does. A failure that cannot be requeued fails again,
    back into the registry with its record."""
    job = current_job()
    failure = failures.of_job(job)
    if failure is None:
        raise requeue.NotRequeueable(f"job {job.id} holds no failure record")
    kind = requeue.put_back(job.connection, failure, forget=False)
    job.description = f"requeued {failure.summary()}: {requeue.MEANING[kind]}"
    return {"failure": failure.id, "kind": str(kind)}
