"""RQ job functions: top-level, importable, plain JSON arguments."""

from __future__ import annotations

import logging
from typing import Any

import redis
from rq import get_current_job

from .events import parse_event
from .queueing import KEY_PREFIX

log = logging.getLogger(__name__)
RECEIVED_KEY = f"{KEY_PREFIX}received_by_type"


def current_connection() -> redis.Redis:
    """The Redis connection of the job being run."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("not running inside an RQ job")
    return job.connection


def process_event(message_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Record one accepted Instruqt event as received."""
    event = parse_event(message_id, body)
    current_connection().hincrby(RECEIVED_KEY, event.type, 1)
    log.info("event %s (%s) received for user %s", event.id, event.type, event.user_id)
    return {"status": "received", "type": event.type}
