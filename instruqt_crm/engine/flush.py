"""Flush: send dirty contacts to the CRM in batches, record each one's outcome, then the plays.

One flusher at a time (a Redis lock, renewed while it runs). ``flush`` hands back a frozen
``FlushReport`` whose ``next`` is the explicit decision for the job: run another flush after
a while (``Reschedule``), let RQ retry the job (``RetryLater``), or nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.client import Pipeline
from redis.lock import Lock

from instruqt_crm import keys
from instruqt_crm.crm.base import (
    ContactChange,
    CrmAdapter,
    Outcome,
    ReadsCurrentValues,
    request_budget,
)
from instruqt_crm.errors import PermanentError, RateLimited
from instruqt_crm.journal import counters, failures, trail
from instruqt_crm.mapping import Mapping

from . import inbox, ledger
from .flush_plays import flush_plays
from .queueing import FLUSH_JOB, schedule_once
from .send import Tally, send

log = logging.getLogger(__name__)
LOCK_SECONDS = 30
TIME_BUDGET_SECONDS = 20.0
STALL_SECONDS = 30  # changes waiting this long past the window without a flush: queue one


@dataclass(frozen=True)
class Reschedule:
    """Run another flush in ``after`` seconds; ``why`` says what it waits for."""

    after: float
    why: str


@dataclass(frozen=True)
class RetryLater:
    """Some records could not be written yet: RQ retries the job on its backoff."""

    reason: str


Decision = Reschedule | RetryLater | None


@dataclass(frozen=True)
class FlushReport:
    """What one flush did with contacts and plays, and what should happen next."""

    contacts: Tally = field(default_factory=Tally)
    plays: Tally = field(default_factory=Tally)
    next: Decision = None
    locked: bool = False

    @property
    def requests(self) -> int:
        """CRM requests sent, for contacts and plays."""
        return self.contacts.requests + self.plays.requests


def schedule_flush(conn: redis.Redis, after: float, force: bool = False) -> bool:
    """Ask for a flush in ``after`` s (once, however often asked, unless ``force``)."""
    return schedule_once(conn, FLUSH_JOB, after, after + 30, force)


def release_backfilled(conn: redis.Redis) -> int:
    """Once a backfill is done (``inbox.backfill_done``), make the learners it changed dirty
    and ask for a flush; how many were released."""
    if not ledger.held_count(conn) or not inbox.backfill_done(conn):
        return 0
    released = ledger.release_held(conn)
    if released:
        log.info("backfill done: %d learner(s) to send", released)
        schedule_flush(conn, 0)
    return released


def wake_stalled(conn: redis.Redis, window: float) -> bool:
    """Queue a flush now if changes waited STALL_SECONDS past the window and none is pending
    (a net for a flush lost with a worker or held by a scheduler that died with Redis). Plays
    are left alone while a backfill holds learners: theirs wait for them, and the flush that
    sends them when it ends sends the plays too (``release_backfilled``)."""
    due = time.time() - window - STALL_SECONDS
    held = ledger.held_count(conn) > 0
    for key in (keys.DIRTY_CONTACTS,) if held else (keys.DIRTY_CONTACTS, keys.DIRTY_PLAYS):
        oldest: Any = conn.zrange(key, 0, 0, withscores=True)
        if oldest and float(oldest[0][1]) <= due:
            return schedule_flush(conn, 0)  # unless a flush (or its wait) is pending
    return False


def last_success(conn: redis.Redis) -> float | None:
    """When a flush last had the CRM accept a contact (epoch seconds), or None if none has."""
    raw = conn.get(keys.LAST_FLUSH)
    return float(keys.text(raw)) if raw is not None else None


def _record(
    conn: redis.Redis, writes: Pipeline, change: ContactChange, outcome: Outcome, version: str
) -> ledger.Settle | None:
    """Apply one outcome: trail through ``writes``, a rejection to the registry; what the
    ledger must settle (None: the record is retried)."""
    trail.note(
        writes,
        change.email,
        "sent" if outcome.status == "synced" else outcome.status,
        properties=change.properties,
        reason=outcome.reason,
        record_id=outcome.record_id,
    )
    if outcome.status == "synced":
        return ledger.Settle(change.key, version, change.properties)
    if outcome.status != "rejected":
        return None
    payload = {"email": change.email, "properties": change.properties}
    failures.record(
        conn,
        failures.Kind.CONTACT,
        outcome.category,
        outcome.reason,
        change.key,
        json.dumps(payload, sort_keys=True),
    )
    log.warning("contact %s rejected by the CRM: %s", change.key, outcome.reason)
    return ledger.Settle(change.key, version)


def flush_batch(
    conn: redis.Redis,
    adapter: CrmAdapter,
    mapping: Mapping,
    window: float = 0.0,
    hold: float = 0.0,
    idle_seconds: int = 0,
) -> Tally | Reschedule | None:
    """Send one batch of dirty contacts: what it did, a ``Reschedule`` when the batch should
    wait (see ``batch_wait``), or None when nothing is dirty. Learners new to the ledger get
    the CRM's current values merged in first (one read per batch, see ``ledger.rebase_many``).
    ``idle_seconds``: how long learners' state lives after this write (0: for ever)."""
    dirty = ledger.dirty_since(conn, adapter.batch_size)
    if not dirty:
        return None
    wait = batch_wait(conn, adapter, dirty, window, hold)
    if wait > 0:
        return Reschedule(wait, "a batch waits for its contacts to gather their changes")
    since = dict(dirty)
    found = ledger.pending_many(conn, list(since), mapping)
    reads, rebased = _read_current(conn, adapter, mapping, found, idle_seconds)
    if rebased:
        found = ledger.pending_many(conn, list(since), mapping)
    batch: dict[str, tuple[ContactChange, str]] = {}
    nothing: list[ledger.Settle] = []
    for key, item in zip(since, found, strict=True):
        if item.change is None:
            nothing.append(ledger.Settle(key, item.version))
        else:
            batch[key] = (item.change, item.version)
    ledger.settle_many(conn, nothing, mapping, idle_seconds)
    if not batch:
        return Tally(unchanged=len(nothing), requests=reads)
    sent = send(adapter, [change for change, _ in batch.values()])
    latencies, statuses, settles = [], {"synced": 0, "rejected": 0, "retry": 0}, []
    with conn.pipeline(transaction=False) as writes:
        for outcome in sent.outcomes:
            change, version = batch[outcome.key]
            if settle := _record(conn, writes, change, outcome, version):
                settles.append(settle)
            statuses[outcome.status] += 1
            if outcome.status == "synced":
                latencies.append(time.time() - since[change.key])
        writes.execute()
    ledger.settle_many(conn, settles, mapping, idle_seconds)
    counters.observe(conn, "flush_latency", latencies)
    return Tally(**statuses, unchanged=len(nothing), requests=sent.requests + reads)


def _read_current(
    conn: redis.Redis,
    adapter: CrmAdapter,
    mapping: Mapping,
    found: list[ledger.Unsent],
    idle_seconds: int,
) -> tuple[int, bool]:
    """Merge the CRM's current values into the learners new to the ledger: the requests
    spent, and whether any learner was rebased.

    Without read access (or an adapter that cannot read) they are sent as they are, and the
    log says what that means for them."""
    fresh = [item.change for item in found if item.needs_read and item.change is not None]
    if not fresh or not isinstance(adapter, ReadsCurrentValues):
        return 0, False
    try:
        current = adapter.current_values(fresh, list(mapping.properties))
    except PermanentError as exc:
        log.warning(
            "could not read %d learner(s)' current CRM values (%s): they are sent from what "
            "the ledger holds, so a learner whose state had expired starts over",
            len(fresh),
            exc.reason,
        )
        return 0, False
    ledger.rebase_many(conn, current.found, mapping, idle_seconds)
    return current.requests, bool(current.found)


def batch_wait(
    conn: redis.Redis,
    adapter: CrmAdapter,
    dirty: list[tuple[str, float]],
    window: float,
    hold: float,
) -> float:
    """How long the next batch (``dirty``: its contacts and when each became dirty, oldest
    first) should wait; 0: send it now.

    A batch smaller than the adapter's waits until its oldest contact has been dirty for
    ``window`` s, so changes arriving in a stream go in full batches. While the CRM's request
    budget binds (more contacts are dirty than the requests left in its window can carry),
    a full batch waits until its newest contact has been dirty for ``hold`` s: the few
    requests left then carry contacts that had time to gather their learners' next events,
    not ones that will need sending again a moment later. ``window`` 0 (a flush on demand)
    sends at once.
    """
    if window <= 0:
        return 0.0
    now = time.time()
    if len(dirty) < adapter.batch_size:
        return max(0.0, dirty[0][1] + window - now)
    budget = request_budget(adapter)
    wait = dirty[-1][1] + hold - now
    if wait <= 0 or budget is None:
        return 0.0
    waiting, left = ledger.dirty_count(conn), budget.remaining()
    if waiting <= left * adapter.batch_size:
        return 0.0
    log.info(
        "flush: %d contacts wait and %d requests are left in the budget: holding the next "
        "batch %.1f s, until its newest contact has waited %g s (FLUSH_HOLD_SECONDS)",
        waiting,
        left,
        wait,
        hold,
    )
    return wait


@contextlib.contextmanager
def lease_kept(lock: Lock, lease: float) -> Iterator[None]:
    """Renew the flush lock every lease/3 s while a flush runs (a killed worker stops renewing)."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease / 3):
            with contextlib.suppress(redis.RedisError):
                lock.reacquire()

    keeper = threading.Thread(target=renew, name="flush-lease", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join(timeout=5)


def flush(
    conn: redis.Redis,
    adapter: CrmAdapter,
    mapping: Mapping,
    time_budget: float = TIME_BUDGET_SECONDS,
    lease: int = LOCK_SECONDS,
    window: float = 0.0,
    hold: float = 0.0,
    idle_seconds: int = 0,
) -> FlushReport:
    """Send batches until nothing is dirty or the time budget is spent; one flusher at a time
    (``idle_seconds``: how long learners' state lives after a write, 0: for ever)."""
    lock = conn.lock(keys.FLUSH_LOCK, timeout=lease, thread_local=False)  # renewed from a thread
    if not lock.acquire(blocking=False):
        return FlushReport(locked=True, next=Reschedule(window, "another flush is running"))
    deadline = time.monotonic() + time_budget
    contacts, played, held = Tally(), Tally(), None
    try:
        with lease_kept(lock, lease):
            while time.monotonic() < deadline:
                step = flush_batch(conn, adapter, mapping, window, hold, idle_seconds)
                if not isinstance(step, Tally):
                    held = step
                    break
                contacts += step
                if step.retry:
                    break
            out_of_time = time.monotonic() >= deadline  # for the contacts, before the plays
            # after the learners they link to
            plays_flushed = flush_plays(conn, adapter, deadline, idle_seconds)
            played = plays_flushed.tally
            next_step = _decide(
                conn, contacts + played, held, out_of_time, plays_flushed.left, window
            )
    except RateLimited as exc:
        next_step = Reschedule(exc.wait or 0.0, f"the CRM's rate limit ({exc.policy or 'quota'})")
        log.warning("CRM rate limit (%s): flush parked for %.0f s", exc.policy or "quota", exc.wait)
    except PermanentError as exc:
        failures.record(conn, failures.Kind.FLUSH, exc.category, exc.reason, "flush", "{}")
        log.error("flush failed for every contact: %s", exc.reason)
        raise
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()
    if contacts.synced:
        conn.set(keys.LAST_FLUSH, str(time.time()))
    log.log(
        logging.INFO if contacts + played != Tally() else logging.DEBUG,  # an empty one: DEBUG
        "flush: %d synced, %d rejected, %d to retry, %d unchanged, %d requests",
        contacts.synced,
        contacts.rejected,
        contacts.retry + played.retry,
        contacts.unchanged,
        contacts.requests + played.requests,
    )
    return FlushReport(contacts, played, next_step)


def _decide(
    conn: redis.Redis,
    done: Tally,
    held: Reschedule | None,
    out_of_time: bool,
    plays_left: bool,
    window: float,
) -> Decision:
    """What the job does next, by precedence: a held batch's wait; at once when the time
    budget ran out with contacts left; RQ's retry for records to retry; soon for plays left;
    after the window for changes that arrived meanwhile."""
    if held is not None:
        return held
    if out_of_time and not done.retry and ledger.dirty_count(conn):
        return Reschedule(0.0, "the time budget was spent with contacts left")
    if done.retry:
        return RetryLater(f"{done.retry} record(s) could not be written yet")
    if plays_left:
        return Reschedule(1.0, "the time budget was spent with play records left")
    if ledger.dirty_count(conn):
        return Reschedule(window, "changes arrived during the flush")
    return None
