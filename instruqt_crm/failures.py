"""The registry operators look at: rejected bodies and events that failed for good."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis

from . import inbox, ledger
from .queueing import FLUSH_JOB, KEY_PREFIX, schedule_once, text

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


class NotRequeueable(ValueError):
    """The failure's payload is neither an event, a rejected contact or play, nor a failed flush."""


def every(conn: redis.Redis, category: str | None = None) -> list[Failure]:
    """Every stored failure (newest first), optionally of one category."""
    found = recent(conn, limit=int(conn.zcard(INDEX_KEY)) or 1)
    return [f for f in found if category is None or f.category == category]


def by_category(conn: redis.Redis) -> dict[str, list[Failure]]:
    """Stored failures grouped by category (newest first within each)."""
    groups: dict[str, list[Failure]] = {}
    for failure in every(conn):
        groups.setdefault(failure.category, []).append(failure)
    return groups


def open_counts(conn: redis.Redis) -> dict[str, int]:
    """How many failures are stored now (not yet requeued or purged), by category."""
    return {category: len(items) for category, items in by_category(conn).items()}


def remove(conn: redis.Redis, failure_id: str) -> bool:
    """Forget one failure (its count by category stays); False if there was none."""
    with conn.pipeline(transaction=True) as pipe:
        pipe.delete(_entry_key(failure_id))
        pipe.zrem(INDEX_KEY, failure_id)
        deleted, _ = pipe.execute()
    return bool(deleted)


def purge(conn: redis.Redis, category: str | None = None) -> int:
    """Forget every failure (or those of one category); returns how many."""
    return sum(remove(conn, failure.id) for failure in every(conn, category))


def kind_of(failure: Failure) -> str:
    """What requeueing means: ``event``, ``contact``, ``play``, ``flush`` or ``none``."""
    body = failure.body()
    if isinstance(body, dict) and isinstance(body.get("type"), str) and body["type"]:
        return "event"
    if isinstance(body, dict) and isinstance(body.get("participant_id"), str) and "fields" in body:
        return "play"  # a rejected play record (plays._reject)
    if isinstance(body, dict) and isinstance(body.get("email"), str) and "properties" in body:
        return "contact"
    return "flush" if failure.message_id == "flush" else "none"


def requeue(conn: redis.Redis, failure_id: str, flush_delay: float = 0.0) -> str:
    """Put a failure's work back in the queue and forget it; returns its kind (see kind_of)."""
    failure = get(conn, failure_id)
    if failure is None:
        raise KeyError(failure_id)
    kind = kind_of(failure)
    if kind == "none":
        raise NotRequeueable(f"failure {failure_id}: the payload is not an event, cannot requeue")
    if kind == "event":
        body = failure.body()
        with conn.pipeline(transaction=True) as pipe:
            inbox.add(pipe, failure.message_id, body)
            pipe.delete(_entry_key(failure.id))
            pipe.zrem(INDEX_KEY, failure.id)
            pipe.execute()
        inbox.wake(conn)
        return kind
    if kind == "contact":
        ledger.mark_dirty(conn, [failure.message_id])
    elif kind == "play":
        from . import plays  # late: plays records its rejections here

        plays.mark_dirty(conn, failure.body()["participant_id"])
    remove(conn, failure.id)
    schedule_once(conn, FLUSH_JOB, flush_delay, flush_delay + 30)
    return kind
