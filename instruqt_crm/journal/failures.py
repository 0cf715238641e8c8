"""The failure registry operators look at: what failed for good, why, and what it concerned.

Each failure is recorded with its ``Kind`` (an event, a contact or play record the CRM
rejected, a flush, or a delivery that is not an event: what requeueing it means, see
``ops.requeue``) and its ``Category`` (why, for grouping). Both are enums, so a failure is
never filed under a name nobody lists.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import redis

from instruqt_crm import keys
from instruqt_crm.errors import Category


class Kind(StrEnum):
    """What a failure concerns."""

    EVENT = "event"  # an accepted event that could not be handled: handled again on requeue
    CONTACT = "contact"  # a contact the CRM rejected: sent again on requeue
    PLAY = "play"  # a play record the CRM rejected: sent again on requeue
    FLUSH = "flush"  # a flush that failed for every contact: run again on requeue
    BODY = "body"  # a signed delivery that is not a usable event: kept to read, not requeued


@dataclass(frozen=True)
class Failure:
    """One failed or rejected item, with everything needed to understand and requeue it."""

    id: str
    kind: Kind
    category: Category
    reason: str
    message_id: str  # the event's delivery id, the contact's key, play:<participant>, or flush
    at: float
    payload: str  # the raw body or the JSON the failure concerns, as text

    def body(self) -> Any:
        """The payload decoded as JSON, or the raw text if it is not JSON."""
        try:
            return json.loads(self.payload)
        except ValueError:
            return self.payload


def record(
    conn: redis.Redis,
    kind: Kind,
    category: Category,
    reason: str,
    message_id: str,
    payload: str | bytes,
) -> Failure:
    """Store a failure for operators and count it by category."""
    text = payload.decode("utf-8", "backslashreplace") if isinstance(payload, bytes) else payload
    failure = Failure(
        uuid.uuid4().hex[:16],
        Kind(kind),
        Category(category),
        _storable(reason),
        _storable(message_id),
        time.time(),
        _storable(text),
    )
    with conn.pipeline(transaction=True) as pipe:
        pipe.hset(keys.failure(failure.id), mapping={k: str(v) for k, v in asdict(failure).items()})
        pipe.zadd(keys.FAILURES, {failure.id: failure.at})
        pipe.hincrby(keys.FAILURE_COUNTS, failure.category, 1)
        pipe.execute()
    return failure


def _storable(value: str) -> str:
    """Text Redis can store: anything UTF-8 cannot encode (lone surrogates) escaped."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def get(conn: redis.Redis, failure_id: str) -> Failure | None:
    """One failure by id, or None."""
    raw = conn.hgetall(keys.failure(failure_id))
    if not raw:
        return None
    fields = {keys.text(k): keys.text(v) for k, v in raw.items()}
    return Failure(
        id=fields["id"],
        kind=_recorded_kind(fields),
        category=Category(fields["category"]),
        reason=fields["reason"],
        message_id=fields["message_id"],
        at=float(fields["at"]),
        payload=fields["payload"],
    )


def _recorded_kind(fields: dict[str, str]) -> Kind:
    """The kind recorded with a failure. Failures recorded by versions that kept no kind
    have it read off their payload, as those versions did when requeueing them."""
    if "kind" in fields:
        return Kind(fields["kind"])
    try:
        body = json.loads(fields["payload"])
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("type"), str) and body["type"]:
        return Kind.EVENT
    if isinstance(body, dict) and isinstance(body.get("participant_id"), str) and "fields" in body:
        return Kind.PLAY
    if isinstance(body, dict) and isinstance(body.get("email"), str) and "properties" in body:
        return Kind.CONTACT
    return Kind.FLUSH if fields["message_id"] == "flush" else Kind.BODY


def recent(conn: redis.Redis, limit: int = 100) -> list[Failure]:
    """The newest failures first."""
    ids = conn.zrevrange(keys.FAILURES, 0, limit - 1)
    found = (get(conn, keys.text(raw)) for raw in ids)
    return [failure for failure in found if failure is not None]


def counts(conn: redis.Redis) -> dict[str, int]:
    """How many failures were recorded, by category."""
    return {keys.text(k): int(v) for k, v in conn.hgetall(keys.FAILURE_COUNTS).items()}


def every(conn: redis.Redis, category: Category | None = None) -> list[Failure]:
    """Every stored failure (newest first), optionally of one category."""
    found = recent(conn, limit=int(conn.zcard(keys.FAILURES)) or 1)
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


def forget(pipe: redis.Redis | Any, failure_id: str) -> None:
    """Queue the commands that forget one failure (on a pipeline, with what it does)."""
    pipe.delete(keys.failure(failure_id))
    pipe.zrem(keys.FAILURES, failure_id)


def remove(conn: redis.Redis, failure_id: str) -> bool:
    """Forget one failure (its count by category stays); False if there was none."""
    with conn.pipeline(transaction=True) as pipe:
        forget(pipe, failure_id)
        deleted, _ = pipe.execute()
    return bool(deleted)


def purge(conn: redis.Redis, category: Category | None = None) -> int:
    """Forget every failure (or those of one category); returns how many."""
    return sum(remove(conn, failure.id) for failure in every(conn, category))
