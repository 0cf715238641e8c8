"""Fixtures-in-functions for engine tests: settings in the environment, draining the queues."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from instruqt_crm.queueing import EVENTS_QUEUE, FLUSH_QUEUE, enqueue_event, queue


def engine_env(redis_url: str, tmp_path, **extra: str) -> dict[str, str]:
    """The environment a worker needs for engine tests (dry-run CRM, no flush delay)."""
    from tests.signing import SECRET

    return {
        "INSTRUQT_WEBHOOK_SECRET": SECRET,
        "REDIS_URL": redis_url,
        "MAPPING_PATH": "mappings/hubspot.yaml",
        "FLUSH_WINDOW_SECONDS": "0",
        "DRY_RUN_PATH": str(tmp_path / "dry-run.jsonl"),
        **extra,
    }


def drain(conn: redis.Redis) -> None:
    """Run every queued event, then the flushes they asked for (like a debounce window)."""
    events, flushes = queue(EVENTS_QUEUE, conn), queue(FLUSH_QUEUE, conn)
    while events.count or flushes.count:
        for only in (events, flushes):
            SimpleWorker([only], connection=conn, serializer=JSONSerializer).work(burst=True)


def enqueue_all(conn: redis.Redis, pairs: Iterable[tuple[str, dict[str, Any]]]) -> int:
    """Enqueue (id, body) deliveries as the receiver would; returns how many were new."""
    return sum(not enqueue_event(conn, msg_id, body, 3600).duplicate for msg_id, body in pairs)


def dry_run_batches(path) -> list[dict]:
    """The batches the dry-run CRM wrote."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]
