"""The registry operators look at: rejected bodies and events that failed for good."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis

from .queueing import KEY_PREFIX, text

INDEX_KEY = f"{KEY_PREFIX}failures"
COUNTS_KEY = f"{KEY_PREFIX}failure_counts"
CATEGORIES = ("auth", "validation", "rate_limit", "identity", "mapping", "invalid_body", "other")


@dataclass(frozen=True)
class Failure:
    """One failed or rejected item, with everything needed to understand and requeue it."""

    id: str
    category: str
    reason: str
    message_id: str
    at: float
    payload: str  # the raw body or the JSON the failure concerns, as text

    def body(self) -> Any:
        """The payload decoded as JSON, or the raw text if it is not JSON."""
        try:
            return json.loads(self.payload)
        except ValueError:
            return self.payload


def _entry_key(failure_id: str) -> str:
    return f"{KEY_PREFIX}failure:{failure_id}"


def record(
    conn: redis.Redis, category: str, reason: str, message_id: str, payload: str | bytes
) -> Failure:
    """Store a failure for operators and count it by category."""
    if category not in CATEGORIES:
        category = "other"
    text = payload.decode("utf-8", "backslashreplace") if isinstance(payload, bytes) else payload
    failure = Failure(uuid.uuid4().hex[:16], category, reason, message_id, time.time(), text)
    with conn.pipeline(transaction=True) as pipe:
        pipe.hset(_entry_key(failure.id), mapping={k: str(v) for k, v in asdict(failure).items()})
        pipe.zadd(INDEX_KEY, {failure.id: failure.at})
        pipe.hincrby(COUNTS_KEY, category, 1)
        pipe.execute()
    return failure


def get(conn: redis.Redis, failure_id: str) -> Failure | None:
    """One failure by id, or None."""
    raw = conn.hgetall(_entry_key(failure_id))
    if not raw:
        return None
    fields = {text(k): text(v) for k, v in raw.items()}
    return Failure(
        id=fields["id"],
        category=fields["category"],
        reason=fields["reason"],
        message_id=fields["message_id"],
        at=float(fields["at"]),
        payload=fields["payload"],
    )


def recent(conn: redis.Redis, limit: int = 100) -> list[Failure]:
    """The newest failures first."""
    ids = conn.zrevrange(INDEX_KEY, 0, limit - 1)
    found = (get(conn, text(raw)) for raw in ids)
    return [failure for failure in found if failure is not None]


def counts(conn: redis.Redis) -> dict[str, int]:
    """How many failures were recorded, by category."""
    return {text(k): int(v) for k, v in conn.hgetall(COUNTS_KEY).items()}
