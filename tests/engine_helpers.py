"""Fixtures-in-functions for engine tests: settings and runtime, draining the queues."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.engine import runtime
from instruqt_crm.engine.dequeue import TakesThroughIntermediateLists
from instruqt_crm.engine.inbox import enqueue_event
from instruqt_crm.engine.queueing import queues
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.engine.worker import AppJob, worker_queues
from instruqt_crm.journal import trail
from samples.signing import SECRET


def engine_env(redis_url: str, tmp_path, **extra: str) -> dict[str, str]:
    """The environment a worker process needs for engine tests (dry-run CRM, no flush delay)."""
    return {
        "INSTRUQT_WEBHOOK_SECRET": SECRET,
        "REDIS_URL": redis_url,
        "MAPPING_PATH": "mappings/hubspot.yaml",
        "FLUSH_WINDOW_SECONDS": "0",
        "DRY_RUN_PATH": str(tmp_path / "dry-run.jsonl"),
        # learners' whole trails: tests read which events were merged there (``merged_ids``)
        "TRACE_MAX_ENTRIES": "100000",
        "TRACE_MAX_BYTES": "100000000",
        **extra,
    }


def engine_runtime(redis_url: str, tmp_path, **extra: str) -> Runtime:
    """A runtime for in-process engine tests, built from ``engine_env`` (and ``extra``)."""
    return Runtime.from_settings(Settings.from_env(engine_env(redis_url, tmp_path, **extra)))


@contextmanager
def installed(run: Runtime) -> Iterator[Runtime]:
    """Hand ``run`` to the jobs this process runs (``drain``), for the ``with`` block."""
    runtime.install(run)
    try:
        yield run
    finally:
        runtime.install(None)


class DrainWorker(TakesThroughIntermediateLists, SimpleWorker):
    """RQ's in-process worker taking jobs as ours do, without the app's maintenance."""


def drain(conn: redis.Redis) -> None:
    """Run every queued job (the failed queue's requeued failures too), as the worker reads
    them (``AppJob``: our job functions only); with FLUSH_WINDOW_SECONDS=0 a flush queues
    behind the drain."""
    while any(jobs.count for jobs in queues(conn)):
        worker = DrainWorker(
            worker_queues(conn), connection=conn, serializer=JSONSerializer, job_class=AppJob
        )
        worker.work(burst=True)


def enqueue_all(conn: redis.Redis, pairs: Iterable[tuple[str, dict[str, Any]]]) -> int:
    """Enqueue (id, body) deliveries as the receiver would; returns how many were new."""
    return sum(enqueue_event(conn, msg_id, body, 3600) for msg_id, body in pairs)


def inbox_events(conn: redis.Redis) -> list[tuple[str, dict[str, Any]]]:
    """(message id, body) of every event kept in the inbox, oldest first."""
    return [
        (fields[b"id"].decode(), json.loads(fields[b"body"]))
        for _, fields in conn.xrange(keys.INBOX)
    ]


def dry_run_batches(path) -> list[dict]:
    """The batches the dry-run CRM wrote."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


class CountingConnection(redis.Connection):
    """A connection that counts what it sends: one count per command or pipeline."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def counting_client(redis_url: str) -> redis.Redis:
    """A client whose round trips add up in ``CountingConnection.sent``."""
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    return redis.Redis(connection_pool=pool)


def merged_ids(conn: redis.Redis, email: str) -> set[str]:
    """Ids of the events a learner's trail says were merged (a test that needs them all keeps
    the trail's bounds above its event count)."""
    return {str(e["event_id"]) for e in trail.entries(conn, email) if e.get("kind") == "event"}
