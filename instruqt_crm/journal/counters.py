"""Counters kept in Redis, so every web and worker process (and dyno) adds to one set.

Two kinds: the event and identity statistics (one hash, ``stats``: events by outcome and
type, identity resolutions by source), written with the batch that handles the events; and
the Prometheus counters and histograms (``metrics:<name>``), written with ``incr`` and
``observe`` or, by the web receiver, through a ``Tally`` (counts added up in memory and
written together about once a second: a round trip per request cost as much as keeping the
event). ``ops.metrics`` renders both for ``/metrics``. Counting never breaks the caller:
Redis errors are swallowed.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.client import Pipeline

from instruqt_crm import keys

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
LABEL_SEPARATOR = "\x1f"  # between a counter's label values in its hash field
TALLY_SECONDS = 1.0  # the web receiver writes its counts about this often (see Tally)
COUNTERS = {
    "webhook_requests": ("Webhook deliveries answered, by outcome.", ("outcome",)),
    "crm_requests": (
        "Requests sent to the CRM, by adapter and HTTP status.",
        ("adapter", "status"),
    ),
    "crm_rate_limited": ("429 answers from the CRM, by adapter and policy.", ("adapter", "policy")),
}


def counter_field(name: str, labels: Sequence[str]) -> tuple[str, str]:
    """The Redis hash and field holding one counter's value for these labels."""
    return keys.metric(name), LABEL_SEPARATOR.join(labels)


def incr(conn: redis.Redis, name: str, *labels: str, amount: int = 1) -> None:
    """Add to a counter (labels in the order declared in COUNTERS)."""
    with contextlib.suppress(redis.RedisError):
        conn.hincrby(*counter_field(name, labels), amount)


class Tally:
    """Counters added up in this process and written to Redis together, about once a second.

    A count is written at once when nothing was written in the last ``interval``; later ones
    wait for the first count after the interval, for the ``background`` writer thread (one
    per process, every TALLY_SECONDS; used under gunicorn), for ``render`` in this process,
    or for the process's exit. So a busy receiver writes one pipeline a second instead of one
    HINCRBY per request, and a process killed outright loses at most its last second of
    counts. A write that fails (Redis down) keeps its counts for the next one.
    """

    def __init__(
        self,
        conn: redis.Redis,
        interval: float = TALLY_SECONDS,
        background: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn = conn
        self.interval = interval
        self.background = background
        self.clock = clock
        self._pending: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()  # guards _pending and _written_at
        self._writing = threading.Lock()  # one write at a time; exit waits for a running one
        self._written_at = float("-inf")
        _tallies.add(self)

    def incr(self, name: str, *labels: str, amount: int = 1) -> None:
        """Add to a counter (labels in the order declared in COUNTERS)."""
        key = counter_field(name, labels)
        now = self.clock()
        with self._lock:
            self._pending[key] += amount
            due = now - self._written_at >= self.interval
        if due:
            self.flush(wait=False)
        elif self.background:
            _start_writer()

    def flush(self, wait: bool = True) -> None:
        """Write every count added so far (if another write is going on: wait, or leave it)."""
        if not self._writing.acquire(blocking=wait):
            return
        try:
            with self._lock:
                pending, self._pending = self._pending, Counter()
                self._written_at = self.clock()
            if pending:
                self._write(pending)
        finally:
            self._writing.release()

    def _write(self, pending: Counter[tuple[str, str]]) -> None:
        """One MULTI/EXEC of HINCRBYs; on a Redis error the counts go back to pending."""
        try:
            with self.conn.pipeline(transaction=True) as pipe:
                for (key, field), amount in pending.items():
                    pipe.hincrby(key, field, amount)
                pipe.execute()
        except redis.RedisError:
            with self._lock:
                self._pending.update(pending)

    def _forget(self) -> None:
        """In a forked child: the parent writes what it counted; start afresh."""
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._pending = Counter()


_tallies: weakref.WeakSet[Tally] = weakref.WeakSet()
_writer_pid = 0  # the process whose writer thread runs


def flush_tallies(conn: redis.Redis | None = None) -> None:
    """Write the pending counts of this process's tallies (on ``conn`` only, if given)."""
    for tally in list(_tallies):
        if conn is None or tally.conn is conn:
            tally.flush()


def _start_writer() -> None:
    """Start this process's background writer, once (a forked child starts its own)."""
    global _writer_pid
    if _writer_pid == os.getpid():
        return
    with _writer_start:
        if _writer_pid != os.getpid():
            _writer_pid = os.getpid()
            threading.Thread(target=_write_forever, name="metrics-tally", daemon=True).start()


def _write_forever() -> None:
    while True:
        time.sleep(TALLY_SECONDS)
        try:
            for tally in list(_tallies):
                if tally.background:
                    tally.flush()
        except Exception as exc:  # stay alive: the next round writes what is left
            log.warning("metrics counts not written: %r", exc)


def _after_fork_in_child() -> None:
    global _writer_start
    _writer_start = threading.Lock()
    for tally in list(_tallies):
        tally._forget()


_writer_start = threading.Lock()
os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(flush_tallies)


def observe(conn: redis.Redis, name: str, seconds: Sequence[float]) -> None:
    """Record observations in a histogram with LATENCY_BUCKETS."""
    if not seconds:
        return
    counts = Counter(str(bound) for value in seconds for bound in LATENCY_BUCKETS if value <= bound)
    counts["+Inf"] = len(seconds)
    with contextlib.suppress(redis.RedisError), conn.pipeline(transaction=False) as pipe:
        key = keys.metric(name)
        for bucket, count in counts.items():
            pipe.hincrby(key, bucket, count)
        pipe.hincrbyfloat(key, "sum", sum(seconds))
        pipe.execute()


def count_event(writes: redis.Redis | Pipeline, outcome: str, event_type: str) -> None:
    """Count an event's outcome, overall and by type (``writes`` may be a pipeline)."""
    writes.hincrby(keys.STATS, f"events:{outcome}", 1)
    writes.hincrby(keys.STATS, f"events:{outcome}:{event_type}", 1)


def count_identity(writes: redis.Redis | Pipeline, source: str) -> None:
    """Count where a learner's email was found (or why not)."""
    writes.hincrby(keys.STATS, f"identity:{source}", 1)


def count_skip(writes: redis.Redis | Pipeline, reason: str) -> None:
    """Count an event a mapping condition skipped, by the condition's name."""
    writes.hincrby(keys.STATS, f"skipped:{reason}", 1)


def stats(conn: redis.Redis) -> dict[str, Any]:
    """The statistics: events by outcome, events by type and outcome, identity by source,
    events skipped by a mapping condition by its name."""
    events: dict[str, int] = {}
    by_type: dict[str, dict[str, int]] = {}
    lookups: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for field, raw in conn.hgetall(keys.STATS).items():
        parts, value = keys.text(field).split(":", 2), int(raw)
        if parts[0] == "events" and len(parts) == 2:
            events[parts[1]] = value
        elif parts[0] == "events" and len(parts) == 3:
            by_type.setdefault(parts[2], {})[parts[1]] = value
        elif parts[0] == "identity" and len(parts) >= 2:
            lookups[":".join(parts[1:])] = value
        elif parts[0] == "skipped" and len(parts) >= 2:
            skipped[":".join(parts[1:])] = value
    return {"events": events, "events_by_type": by_type, "identity": lookups, "skipped": skipped}
