"""A per-learner activity trail: each event, what the mapping made of it, what was sent, the answer.

Kept in Redis as a capped list per learner (newest first), under the learner's email, plus
an index from Instruqt user id to email, so operators can look a learner up by either.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from redis.client import Pipeline

from instruqt_crm import keys

MAX_ENTRIES = 200
TTL_SECONDS = 30 * 86400


def note(
    conn: redis.Redis | Pipeline,
    email: str,
    kind: str,
    user_id: str | None = None,
    **details: Any,
) -> None:
    """Append one entry (kind: event | sent | rejected | retry | failed) to a learner's trail.

    Given a pipeline, the commands join it (sent with it); given a connection, they are sent.
    """
    entry = json.dumps({"at": time.time(), "kind": kind, **details}, sort_keys=True, default=str)
    pipe = conn if isinstance(conn, Pipeline) else conn.pipeline()
    pipe.lpush(keys.trail(email), entry)
    pipe.ltrim(keys.trail(email), 0, MAX_ENTRIES - 1)
    pipe.expire(keys.trail(email), TTL_SECONDS)
    if user_id:
        pipe.set(keys.trail_user(user_id), email.lower(), ex=TTL_SECONDS)
    if pipe is not conn:
        pipe.execute()


def resolve(conn: redis.Redis, who: str) -> str | None:
    """The email for an email or an Instruqt user id (None if never seen)."""
    if "@" in who:
        return who.strip().lower()
    found = conn.get(keys.trail_user(who.strip()))
    return keys.text(found) if found is not None else None


def when(epoch: float | None) -> str:
    """An epoch as ``YYYY-MM-DD HH:MM:SSZ`` (UTC), or ``never``."""
    if epoch is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))


def describe(entry: dict[str, Any]) -> str:
    """One trail entry in words."""
    kind = entry.get("kind", "?")
    head = f"  {when(entry.get('at'))}  {kind:<8} "
    if kind == "event":
        changes = ", ".join(f"{k}={v}" for k, v in (entry.get("changes") or {}).items())
        flag = "changed" if entry.get("changed") else "no change"
        return head + f"{entry.get('type')} {entry.get('event_id')} ({flag}) {changes}".rstrip()
    if kind == "sent":
        record = f" record {entry['record_id']}" if entry.get("record_id") else ""
        return head + f"{json.dumps(entry.get('properties'), sort_keys=True)}{record}"
    detail = entry.get("reason") or ""
    if entry.get("event_id"):
        detail = f"{entry.get('type')} {entry['event_id']}: {detail}"
    return head + detail


def entries(conn: redis.Redis, who: str, limit: int = MAX_ENTRIES) -> list[dict[str, Any]]:
    """A learner's trail, oldest first."""
    email = resolve(conn, who)
    if email is None:
        return []
    raw = conn.lrange(keys.trail(email), 0, limit - 1)
    return [json.loads(item) for item in reversed(raw)]
