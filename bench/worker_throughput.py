"""Events/s through the inbox on ONE ``python worker.py``, against one no-op RQ job per event.

    python -m bench.worker_throughput [--events 3000] [--timeout 120]

Both runs use the production worker (``worker.py``: a fork per job, JSON serializer, scheduler)
on an emptied Redis db 12. The baseline is what any one-job-per-event design costs at least:
N jobs of ``bench.noop.noop`` (an empty function) with the options event jobs had. The real
run keeps N events with ``inbox.enqueue_event`` exactly as the receiver does and lets the
worker drain them (``process_inbox`` jobs, dry-run CRM, ``FLUSH_WINDOW_SECONDS=1`` so flushes
run in between). A rate is jobs (or events handled) over the span from the first timed job's
start to the last one's end (RQ's own timestamps), so worker start-up is not counted.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    REDIS_URL,
    Processes,
    claimed_db,
    ended_job_ids,
    events_queue,
    fresh_redis,
    handled,
    job_window,
    jobs_waiting,
    print_table,
    wait_for,
)
from bench.common import realistic_events as make_events
from instruqt_crm.engine import inbox
from instruqt_crm.engine.inbox import enqueue_event
from instruqt_crm.engine.queueing import DRAIN_JOB, JOB_OPTIONS
from tests.engine_helpers import engine_env

TARGET_RATIO = 0.7
Enqueue = Callable[[redis.Redis, list[dict[str, Any]]], list[str]]


@dataclass(frozen=True)
class Run:
    """One timed drain."""

    jobs: int
    seconds: float
    failed: int

    @property
    def rate(self) -> float:
        """Jobs per second."""
        return self.jobs / self.seconds if self.seconds > 0 else 0.0


def worker_env(folder: Path) -> dict[str, str]:
    """The worker's environment: Redis db 12, default mapping, dry-run CRM, 1 s flush window."""
    return engine_env(
        REDIS_URL,
        folder,
        FLUSH_WINDOW_SECONDS="1",
        HUBSPOT_ACCESS_TOKEN="",  # dry run even if the shell has a token
        INSTRUQT_API_KEY="",
    )


def enqueue_events(conn: redis.Redis, events: list[dict[str, Any]]) -> list[str]:
    """Keep events exactly as the receiver does (no job ids: drain jobs are timed instead)."""
    for n, body in enumerate(events):
        enqueue_event(conn, f"msg_{n:06d}", body, 3600)
    return []


def enqueue_noops(conn: redis.Redis, events: list[dict[str, Any]]) -> list[str]:
    """Enqueue the no-op job with the receiver's queue, serializer, ids and options."""
    target = events_queue(conn)
    ids = []
    for n, body in enumerate(events):
        message_id = f"msg_{n:06d}"
        job = target.enqueue_call(
            "bench.noop.noop",
            args=(message_id, body),
            job_id=f"event-{message_id}",
            retry=JOB_OPTIONS["retry"],
            timeout=60,
            result_ttl=3600,
            failure_ttl=30 * 24 * 3600,
            description=f"{body.get('type')} {message_id}",
        )
        ids.append(job.id)
    return ids


def drained(conn: redis.Redis, ids: list[str]) -> bool:
    """No event or job waits or runs, and every one of ``ids`` has ended."""
    if jobs_waiting(conn) != (0, 0) or inbox.depth(conn):
        return False
    ended = set(ended_job_ids(conn))
    return all(job_id in ended for job_id in ids)


def timed_drain(
    name: str, enqueue: Enqueue, events: list[dict[str, Any]], timeout: float, simple: bool
) -> Run:
    """Enqueue into an empty db, run one worker until the events queue drains, time the jobs."""
    conn = fresh_redis()
    ids = enqueue(conn, events)
    command = ["-m", "bench.simple_worker"] if simple else ["worker.py"]
    with Processes() as processes, tempfile.TemporaryDirectory() as folder:
        processes.python(name, command, worker_env(Path(folder)))

        def done() -> bool:
            processes.check_alive()
            return drained(conn, ids)

        wait_for(done, timeout, f"the {name} jobs to drain")
        failed = events_queue(conn).failed_job_registry.count
    if ids:
        start, end, finished = job_window(conn, ids)
        return Run(finished, end - start, failed)
    start, end, _ = job_window(conn, ended_job_ids(conn), DRAIN_JOB)
    return Run(handled(conn), end - start, failed)


def main(argv: list[str] | None = None) -> int:
    """Run both drains and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="jobs per run (default 2000)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per run")
    parser.add_argument(
        "--simple", action="store_true", help="compare with RQ's SimpleWorker (no fork per job)"
    )
    args = parser.parse_args(argv)
    events = make_events(args.events)
    with claimed_db():
        baseline = timed_drain("noop", enqueue_noops, events, args.timeout, args.simple)
        real = timed_drain("events", enqueue_events, events, args.timeout, args.simple)
    ratio = real.rate / baseline.rate if baseline.rate else 0.0
    kind = "bench.simple_worker (SimpleWorker)" if args.simple else "worker.py (HerokuWorker)"
    print_table(
        f"worker throughput: {args.events} jobs, one {kind} process",
        [
            ("no-op jobs/s (baseline)", f"{baseline.rate:.1f}", f"{baseline.seconds:.1f} s"),
            ("inbox events/s", f"{real.rate:.1f}", f"{real.seconds:.1f} s"),
            ("ratio events/no-op", f"{ratio:.3f}", f"target >= {TARGET_RATIO}"),
            ("failed jobs (no-op/events)", f"{baseline.failed}/{real.failed}", "expected 0/0"),
        ],
    )
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(f"  target {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
