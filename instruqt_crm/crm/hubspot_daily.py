"""HubSpot's daily request limit: how much of it is used, when it resets, and the warning.

A private app's requests count against its account's daily limit, which resets at midnight
in the account's time zone (HubSpot's ``resetsAt``), not UTC's. ``GET
/account-info/v3/api-usage/daily/private-apps`` reports the day's use, the limit and
``resetsAt``. HubSpot documents the ``X-HubSpot-RateLimit-Daily``/``-Daily-Remaining``
headers only for the retired API keys (and says OAuth calls carry none), so an answer that
has them is read for free and the endpoint is read otherwise, at most every
``CHECK_SECONDS`` for all workers together. ``DailyLimit`` keeps the last reading in Redis
(``keys.daily_usage``) for ``status`` and ``/metrics`` and warns, once per account day, when
the use passes the configured share.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from instruqt_crm import keys
from instruqt_crm.errors import SyncError
from instruqt_crm.journal.trail import when

log = logging.getLogger(__name__)
USAGE_PATH = "/account-info/v3/api-usage/daily/private-apps"
CHECK_SECONDS = 300.0  # read the day's usage at most this often (all workers together)
FALLBACK_MARGIN_SECONDS = 60.0  # past the next UTC midnight, when resetsAt is unknown
DAY = 86400.0
KEEP_SECONDS = 3 * 86400  # a reading nobody refreshes expires

# KEYS: the hash. ARGV: now, next check. The caller whose turn it is gets 1.
_CLAIM = """
local due = tonumber(redis.call('HGET', KEYS[1], 'next_check') or '0')
if due > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'next_check', ARGV[2])
return 1
"""

# KEYS: the hash. ARGV: the account day. 1 for the first to warn that day.
_FIRST_WARNING = """
if redis.call('HGET', KEYS[1], 'warned_day') == ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'warned_day', ARGV[1])
return 1
"""


@dataclass(frozen=True)
class DailyUsage:
    """One reading of the day's usage (``resets_at``: epoch seconds, None when not given)."""

    used: int
    limit: int
    resets_at: float | None = None


def _epoch(value: Any) -> float | None:
    """An ISO 8601 time with a zone (``...Z`` or an offset) as epoch seconds; else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def parse_usage(answer: Any) -> DailyUsage:
    """The private apps' daily usage in the endpoint's answer (``{"results": [...]}``, as
    HubSpot's reference shows, or a bare list); ValueError when it has none."""
    items = answer.get("results") if isinstance(answer, dict) else answer
    for item in items if isinstance(items, list) else []:
        used = item.get("currentUsage") if isinstance(item, dict) else None
        limit = item.get("usageLimit") if isinstance(item, dict) else None
        if isinstance(used, int) and isinstance(limit, int) and limit > 0:
            return DailyUsage(used, limit, _epoch(item.get("resetsAt")))
    raise ValueError(f"no daily usage in HubSpot's answer: {str(answer)[:200]}")


def usage_from_headers(headers: Mapping[str, str] | None) -> DailyUsage | None:
    """The day's usage from ``X-HubSpot-RateLimit-Daily``/``-Daily-Remaining``, when sent."""
    limit = (headers or {}).get("X-HubSpot-RateLimit-Daily") or ""
    left = (headers or {}).get("X-HubSpot-RateLimit-Daily-Remaining") or ""
    if not (limit.isdigit() and left.isdigit()) or int(limit) == 0:
        return None
    return DailyUsage(max(0, int(limit) - int(left)), int(limit))


def next_utc_midnight(now: float, margin: float = FALLBACK_MARGIN_SECONDS) -> float:
    """The next UTC midnight after ``now``, plus ``margin`` seconds (epoch seconds)."""
    return (math.floor(now / DAY) + 1) * DAY + margin


def ahead(resets_at: float, now: float) -> float:
    """``resets_at`` moved on by whole days until it is after ``now`` (an old reading)."""
    if resets_at > now:
        return resets_at
    return resets_at + (math.floor((now - resets_at) / DAY) + 1) * DAY


def reset_time(
    read: Callable[[], DailyUsage], known: float | None, now: float
) -> tuple[float, str]:
    """When the spent daily limit resets (epoch seconds) and how that was learnt: ``read``
    now (HubSpot's ``resetsAt``), else the last ``resetsAt`` ``known``, else the next UTC
    midnight plus a margin."""
    try:
        usage = read()
    except (SyncError, ValueError) as exc:  # refused, unreachable, or not understood
        why = f"resetsAt could not be read ({exc})"
    else:
        if usage.resets_at is not None:
            return ahead(usage.resets_at, now), "HubSpot's resetsAt, the account's midnight"
        why = "HubSpot's usage answer had no resetsAt"
    if known is not None:
        return ahead(known, now), f"the last resetsAt read, as {why}"
    return next_utc_midnight(now), f"the next UTC midnight plus a margin, as {why}"


class DailyLimit:
    """The daily limit's shared state: the last reading, whose turn it is to read, the warning."""

    def __init__(
        self,
        conn: redis.Redis,
        name: str,
        warn_percent: float,
        clock: Callable[[], float] | None = None,
        check_seconds: float = CHECK_SECONDS,
    ) -> None:
        self.conn = conn
        self.name = name
        self.warn_percent = float(warn_percent)
        self.clock = clock or time.time
        self.check_seconds = check_seconds
        self.key = keys.daily_usage(name)
        self._claim = conn.register_script(_CLAIM)
        self._first_warning = conn.register_script(_FIRST_WARNING)
        self._next_local = float("-inf")  # this process asks Redis no sooner

    def due(self) -> bool:
        """True for the one caller (of all workers) whose turn it is to read the usage."""
        now = self.clock()
        if now < self._next_local:
            return False
        self._next_local = now + self.check_seconds
        args = [repr(now), repr(now + self.check_seconds)]
        return bool(self._claim(keys=[self.key], args=args))

    def record(self, usage: DailyUsage) -> bool:
        """Keep a reading; warn once per account day when it passes the share. True if over."""
        now = self.clock()
        over = usage.used * 100 >= self.warn_percent * usage.limit
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.hset(
                self.key,
                mapping={
                    "used": usage.used,
                    "limit": usage.limit,
                    "read_at": repr(now),
                    "warn_percent": repr(self.warn_percent),
                    "warning": int(over),
                },
            )
            if usage.resets_at is not None:
                pipe.hset(self.key, "resets_at", repr(usage.resets_at))
            pipe.expire(self.key, KEEP_SECONDS)
            pipe.execute()
        known = usage.resets_at or self.resets_at()
        ends = ahead(known, now) if known is not None else None
        day = when(ends) if ends is not None else when(now)[:10]
        if over and self._first_warning(keys=[self.key], args=[day]):
            log.warning(
                "%s: %d of the account's %d daily API requests used (%.0f %%, past "
                "HUBSPOT_DAILY_WARN_PERCENT=%g); the limit resets at %s",
                self.name,
                usage.used,
                usage.limit,
                100.0 * usage.used / usage.limit,
                self.warn_percent,
                when(ends) if ends is not None else "the account's midnight",
            )
        return over

    def resets_at(self) -> float | None:
        """The last ``resetsAt`` read (epoch seconds), or None."""
        raw = self.conn.hget(self.key, "resets_at")
        return float(keys.text(raw)) if raw is not None else None


def reading(conn: redis.Redis, name: str) -> dict[str, Any] | None:
    """The last reading kept, JSON-ready (used, limit, share, warn_percent, warning,
    read_at, resets_at), or None."""
    raw = conn.hgetall(keys.daily_usage(name))
    stored = {keys.text(k): keys.text(v) for k, v in raw.items()}
    if "used" not in stored:
        return None
    used, limit = int(stored["used"]), int(stored["limit"])
    resets = stored.get("resets_at")
    return {
        "used": used,
        "limit": limit,
        "share": used / limit if limit else 0.0,
        "warn_percent": float(stored.get("warn_percent", "0")),
        "warning": stored.get("warning") == "1",
        "read_at": float(stored["read_at"]),
        "resets_at": float(resets) if resets else None,
    }
