"""Flush: send dirty contacts to the CRM in batches and record each contact's outcome."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import redis
from redis.client import Pipeline
from redis.lock import Lock

from . import failures, ledger, metrics, plays, trace
from .crm.base import BatchRejected, ContactChange, CrmAdapter, Outcome, request_budget
from .errors import PermanentError, RateLimited
from .mapping import Mapping
from .queueing import KEY_PREFIX

log = logging.getLogger(__name__)
LOCK_KEY = f"{KEY_PREFIX}flush:lock"
LOCK_SECONDS = 30
TIME_BUDGET_SECONDS = 20.0
LAST_FLUSH_KEY = f"{KEY_PREFIX}flush:last_success"


@dataclass
class FlushReport:
    """What one flush did."""

    requests: int = 0
    synced: int = 0
    rejected: int = 0
    retry: int = 0
    unchanged: int = 0
    locked: bool = False
    wait: float | None = None
    reasons: list[str] = field(default_factory=list)


def send(
    adapter: CrmAdapter, changes: Sequence[ContactChange], report: FlushReport
) -> list[Outcome]:
    """Upsert a batch; when the CRM refuses the whole batch, set aside the records it names
    (or, when it names none, split the batch in halves) and send the others again."""
    report.requests += 1
    try:
        return adapter.upsert(changes)
    except BatchRejected as exc:
        named = [c for c in changes if c.key in exc.culprits]
        if named:
            rest = [c for c in changes if c.key not in exc.culprits]
            rejected = [Outcome(c.key, "rejected", exc.reason, exc.category) for c in named]
            return rejected + (send(adapter, rest, report) if rest else [])
        if len(changes) == 1:
            return [Outcome(changes[0].key, "rejected", exc.reason, exc.category)]
        middle = len(changes) // 2
        return send(adapter, changes[:middle], report) + send(adapter, changes[middle:], report)


def _record(
    conn: redis.Redis,
    writes: Pipeline,
    change: ContactChange,
    outcome: Outcome,
    version: str,
    report: FlushReport,
) -> None:
    """Apply one outcome: trail and ledger through ``writes``, a rejection to the registry."""
    trace.note(
        writes,
        change.email,
        "sent" if outcome.status == "synced" else outcome.status,
        properties=change.properties,
        reason=outcome.reason,
        record_id=outcome.record_id,
    )
    if outcome.status == "synced":
        ledger.queue_settle(writes, change.key, version, change.properties)
        report.synced += 1
    elif outcome.status == "rejected":
        payload = {
            "email": change.email,
            "properties": change.properties,
            "events": ledger.event_ids(conn, change.key),
        }
        failures.record(
            conn,
            outcome.category or "validation",
            outcome.reason,
            change.key,
            json.dumps(payload, sort_keys=True),
        )
        ledger.queue_settle(writes, change.key, version)
        report.rejected += 1
        report.reasons.append(outcome.reason)
        log.warning("contact %s rejected by the CRM: %s", change.key, outcome.reason)
    else:
        report.retry += 1


def flush_batch(
    conn: redis.Redis,
    adapter: CrmAdapter,
    mapping: Mapping,
    report: FlushReport,
    window: float = 0.0,
    hold: float = 0.0,
) -> bool:
    """Send one batch of dirty contacts; False when nothing more can be sent now (or, with
    ``report.wait`` set, not yet: see ``batch_wait``). The batch's contacts are read in one
    round trip and its outcomes written in another.
    """
    dirty = ledger.dirty_since(conn, adapter.batch_size)
    if not dirty:
        return False
    wait = batch_wait(conn, adapter, dirty, window, hold)
    if wait > 0:
        report.wait = wait
        return False
    since = dict(dirty)
    batch: dict[str, tuple[ContactChange, str]] = {}
    with conn.pipeline(transaction=False) as writes:
        for key, found in zip(since, ledger.pending_many(conn, list(since), mapping), strict=True):
            if found.change is None:
                ledger.queue_settle(writes, key, found.version)
                report.unchanged += 1
            else:
                batch[key] = (found.change, found.version)
        writes.execute()
    if not batch:
        return True
    latencies = []
    outcomes = send(adapter, [change for change, _ in batch.values()], report)
    with conn.pipeline(transaction=False) as writes:
        for outcome in outcomes:
            change, version = batch[outcome.key]
            _record(conn, writes, change, outcome, version, report)
            if outcome.status == "synced":
                latencies.append(time.time() - since[change.key])
        writes.execute()
    metrics.observe(conn, "flush_latency", latencies)
    return report.retry == 0


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
) -> FlushReport:
    """Send batches until nothing is dirty or the time budget is spent; one flusher at a time."""
    report = FlushReport()
    lock = conn.lock(LOCK_KEY, timeout=lease, thread_local=False)  # renewed from a thread
    if not lock.acquire(blocking=False):  # another flush is running: try again after the window
        report.locked = True
        return report
    deadline = time.monotonic() + time_budget
    try:
        with lease_kept(lock, lease):
            while time.monotonic() < deadline and flush_batch(
                conn, adapter, mapping, report, window, hold
            ):
                pass
            out_of_time = time.monotonic() >= deadline and report.wait is None
            if out_of_time and not report.retry and ledger.dirty_count(conn):
                report.wait = 0.0  # contacts left: a new job goes on at once
            plays.flush_plays(conn, adapter, report, deadline)  # after the learners they link to
    except RateLimited as exc:
        report.wait = exc.wait
        log.warning("CRM rate limit (%s): flush parked for %.0f s", exc.policy or "quota", exc.wait)
    except PermanentError as exc:
        failures.record(conn, exc.category, exc.reason, "flush", "{}")
        log.error("flush failed for every contact: %s", exc.reason)
        raise
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()
    if report.synced:
        conn.set(LAST_FLUSH_KEY, str(time.time()))
    log.info(
        "flush: %d synced, %d rejected, %d to retry, %d unchanged, %d requests",
        report.synced,
        report.rejected,
        report.retry,
        report.unchanged,
        report.requests,
    )
    return report
