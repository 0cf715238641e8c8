"""A per-learner activity trail: each event, what the mapping made of it, what was sent, the answer.

Kept in Redis as a list per learner (newest first), under the learner's email (a user id is
turned into the email through the identity cache, ``identity.email_of``). Bounded three ways
(``Limits``: ``TRACE_MAX_ENTRIES``, ``TRACE_MAX_BYTES``, ``TRACE_RETENTION_DAYS``): a push
drops the oldest entries past either cap (the newest entry is always kept), and a learner's
trail expires once nothing was added for the retention. Entries are
stored compact (``trail_format``) and read back with their full names.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

from instruqt_crm import keys, redis_scripts
from instruqt_crm.config import Settings

from . import trail_format

# KEYS: trail. ARGV: entry, max entries, max bytes, ttl s. Trims to the newest entries that
# fit both caps (always the newest one), then renews the retention.
_PUSH = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local kept, total, cap = 0, 0, tonumber(ARGV[3])
for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  total = total + #item
  if kept > 0 and total > cap then break end
  kept = kept + 1
end
redis.call('LTRIM', KEYS[1], 0, kept - 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
"""


@dataclass(frozen=True)
class Limits:
    """How much of a learner's trail is kept: entries, stored bytes, seconds since the last."""

    entries: int
    bytes: int
    seconds: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The limits the settings give (``TRACE_*``)."""
        seconds = max(1, round(settings.trace_retention_days * 86400))
        return cls(settings.trace_max_entries, settings.trace_max_bytes, seconds)


_limits: Limits | None = None


def configure(limits: Limits | None) -> None:
    """Bound the trails this process writes (None: the settings' defaults)."""
    global _limits
    _limits = limits


def limits() -> Limits:
    """The limits in force."""
    global _limits
    if _limits is None:
        _limits = Limits.from_settings(Settings.from_env({}))
    return _limits


def note(
    conn: redis.Redis | Pipeline,
    email: str,
    kind: str,
    **details: Any,
) -> None:
    """Append one entry (kind: event | sent | rejected | retry | failed | skipped | identity)
    to a learner's trail.

    Given a pipeline, the commands join it (sent with it); given a connection, they are sent.
    """
    bounds = limits()
    entry = trail_format.encode({"at": time.time(), "kind": kind, **details})
    pipe = conn if isinstance(conn, Pipeline) else conn.pipeline()
    args = [entry, bounds.entries, bounds.bytes, bounds.seconds]
    redis_scripts.run(pipe, _PUSH, [keys.trail(email)], args)
    if pipe is not conn:
        pipe.execute()


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


def entries(conn: redis.Redis, email: str, limit: int | None = None) -> list[dict[str, Any]]:
    """A learner's trail, oldest first (the newest ``limit`` entries; all when None)."""
    raw = conn.lrange(keys.trail(email), 0, -1 if limit is None else limit - 1)
    return [_read(item) for item in reversed(raw)]


def _read(raw: bytes | str) -> dict[str, Any]:
    """One stored entry; one that cannot be read says so in its place."""
    try:
        return trail_format.decode(raw.encode() if isinstance(raw, str) else raw)
    except ValueError as exc:
        return {"kind": "unreadable", "reason": str(exc)}
