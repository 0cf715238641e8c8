"""A request budget per CRM account, shared by every worker process through Redis.

The budget is a sliding window: at most ``limit`` requests in any ``window_seconds``. Each
granted request is one member of a sorted set scored by its grant time; Lua scripts trim,
count and record atomically, so processes on several machines never overspend together.

Keys (the ``{name}`` hash tag keeps them in one Redis Cluster slot)::

    instruqt_crm:budget:{name}         sorted set: one member per request (or phantom usage)
    instruqt_crm:budget:{name}:pause   hash: until, reason, policy (every worker holds off)

Time: by default every timestamp is the Redis server's ``TIME``, read inside the scripts, so
machines with skewed clocks still agree; pauses given as absolute epochs (``pause_until``) are
compared with it too. Local waiting (timeouts, the returned seconds waited) uses
``time.monotonic``. Pass ``clock`` (tests) to use one injected clock for everything instead.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import redis

from instruqt_crm import keys
from instruqt_crm.errors import RateLimited

log = logging.getLogger(__name__)

MIN_WAIT = 1e-6
PAUSE_STEP = 5.0  # a pause never shrinks, so acquire may sleep on it in longer steps

_PRELUDE = """
local function now_of(arg)
  if arg == '' then
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return tonumber(arg)
end
local function fmt(x) return string.format('%.17g', x) end
local function touch(key, now, window)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    local ms = math.ceil((tonumber(last[2]) + window - now) * 1000) + 60000
    redis.call('PEXPIRE', key, math.max(ms, 1000))
  end
end
local function pause_left(key, now)
  local p = redis.call('HMGET', key, 'until', 'reason', 'policy')
  local untl = tonumber(p[1])
  if untl and untl > now then return untl - now, p[2] or '', p[3] or '' end
  return nil
end
"""

# KEYS: window, pause. ARGV: now, n, limit, window, member prefix.
_ACQUIRE = (
    _PRELUDE
    + """
local now = now_of(ARGV[1])
local n, limit, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local left, reason, policy = pause_left(KEYS[2], now)
if left then return {0, fmt(left), fmt(now), 'pause', reason, policy} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
if used + n <= limit then
  for i = 1, n do redis.call('ZADD', KEYS[1], now, ARGV[5] .. ':' .. i) end
  touch(KEYS[1], now, window)
  return {1, '0', fmt(now), 'granted', '', ''}
end
local k = used + n - limit
local entry = redis.call('ZRANGE', KEYS[1], k - 1, k - 1, 'WITHSCORES')
return {0, fmt(tonumber(entry[2]) + window - now), fmt(now), 'window', '', ''}
"""
)

# KEYS: window, pause. ARGV: now, limit, window.
_REMAINING = (
    _PRELUDE
    + """
local now = now_of(ARGV[1])
local limit, window = tonumber(ARGV[2]), tonumber(ARGV[3])
if pause_left(KEYS[2], now) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
return math.max(0, limit - redis.call('ZCARD', KEYS[1]))
"""
)

# KEYS: pause. ARGV: now, 'abs' or 'rel', seconds, reason, policy. Never shortens a pause.
_PAUSE = (
    _PRELUDE
    + """
local now = now_of(ARGV[1])
local target = tonumber(ARGV[3])
if ARGV[2] == 'rel' then target = now + target end
local current = tonumber(redis.call('HGET', KEYS[1], 'until'))
if current and current > now and current >= target then return fmt(current) end
if target <= now then return '' end
redis.call('HSET', KEYS[1], 'until', fmt(target), 'reason', ARGV[4], 'policy', ARGV[5])
redis.call('PEXPIRE', KEYS[1], math.ceil((target - now) * 1000) + 60000)
return fmt(target)
"""
)

# KEYS: pause. ARGV: now.
_PAUSED = (
    _PRELUDE
    + """
local now = now_of(ARGV[1])
local left = pause_left(KEYS[1], now)
if left then return fmt(now + left) end
return ''
"""
)

# KEYS: window. ARGV: now, limit, window, reported remaining, interval seconds, member prefix.
_OBSERVE = (
    _PRELUDE
    + """
local now = now_of(ARGV[1])
local limit, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local reported, interval = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local extra = (limit - redis.call('ZCARD', KEYS[1])) - math.max(0, reported)
if extra <= 0 then return 0 end
local score = now + math.max(0, interval - window)
for i = 1, extra do redis.call('ZADD', KEYS[1], score, ARGV[6] .. ':phantom:' .. i) end
touch(KEYS[1], now, window)
return extra
"""
)


class _Attempt(NamedTuple):
    """The answer of the acquire script."""

    granted: bool
    wait: float
    now: float
    kind: str  # granted | window | pause
    reason: str
    policy: str


class RequestBudget:
    """At most ``limit`` requests per ``window_seconds`` for one CRM account, across processes."""

    def __init__(
        self,
        conn: redis.Redis,
        name: str,
        limit: int,
        window_seconds: float,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_step: float = 0.25,
    ) -> None:
        if limit < 1 or window_seconds <= 0:
            raise ValueError("a budget needs limit >= 1 and window_seconds > 0")
        self.conn = conn
        self.name = name
        self.limit = int(limit)
        self.window = float(window_seconds)
        self.clock = clock
        self._sleep = sleep
        self.max_step = max_step
        self.key = keys.budget(name)
        self.pause_key = keys.budget_pause(name)
        self._acquire = conn.register_script(_ACQUIRE)
        self._remaining = conn.register_script(_REMAINING)
        self._pause = conn.register_script(_PAUSE)
        self._paused = conn.register_script(_PAUSED)
        self._observe = conn.register_script(_OBSERVE)
        self._warned_max: int | None = None

    def __repr__(self) -> str:
        return f"RequestBudget({self.name!r}, limit={self.limit}, window={self.window}s)"

    def acquire(self, n: int = 1, timeout: float | None = None) -> float:
        """Block until n requests fit and record them; seconds waited, or RateLimited on timeout."""
        self._check(n)
        start, slept = self._local_now(), False
        while True:
            attempt = self._attempt(n)
            waited = max(0.0, self._local_now() - start) if slept else 0.0
            if attempt.granted:
                if slept:
                    log.debug("budget=%s granted n=%d after %.3fs", self.name, n, waited)
                return waited
            if timeout is not None and waited + attempt.wait > timeout:
                raise self._limited(attempt)
            step = PAUSE_STEP if attempt.kind == "pause" else self.max_step
            self._sleep(min(attempt.wait, step))
            slept = True

    def try_acquire(self, n: int = 1) -> float:
        """Record n requests and return 0 if they fit now; else the seconds until they may."""
        self._check(n)
        attempt = self._attempt(n)
        return 0.0 if attempt.granted else attempt.wait

    def remaining(self) -> int:
        """Requests that could be granted right now (0 while paused)."""
        args = [*self._args(), self.limit, repr(self.window)]
        return int(self._remaining(keys=[self.key, self.pause_key], args=args))

    def pause_until(self, epoch_seconds: float, reason: str, policy: str = "") -> float | None:
        """Hold every worker off until epoch_seconds (never shortens a pause); the pause's end."""
        args = [*self._args(), "abs", repr(float(epoch_seconds)), reason, policy]
        return self._set_pause(args, reason)

    def pause_for(self, seconds: float, reason: str, policy: str = "") -> float | None:
        """Hold every worker off for seconds from now (by the budget's clock); the pause's end."""
        args = [*self._args(), "rel", repr(float(seconds)), reason, policy]
        return self._set_pause(args, reason)

    def paused_until(self) -> float | None:
        """The epoch at which the current pause ends, or None if not paused."""
        reply = keys.text(self._paused(keys=[self.pause_key], args=self._args()))
        return float(reply) if reply else None

    def pause(self) -> tuple[float, str, str] | None:
        """The current pause: (end epoch, reason, policy), or None if not paused."""
        until = self.paused_until()
        if until is None:
            return None
        reason, policy = self.conn.hmget(self.pause_key, ["reason", "policy"])
        return until, keys.text(reason or ""), keys.text(policy or "")

    def observe_headers(
        self, max: int | None, remaining: int | None, interval_ms: int | None
    ) -> int:
        """Feed the CRM's rate-limit headers; record phantom usage if it has less left than we."""
        if max is not None and max < self.limit and self._warned_max != max:
            self._warned_max = max
            log.warning(
                "budget=%s limit %d exceeds the CRM's reported max %d per %sms",
                self.name,
                self.limit,
                max,
                interval_ms,
            )
        if remaining is None:
            return 0
        interval = self.window if interval_ms is None else interval_ms / 1000.0
        args = [*self._args(), self.limit, repr(self.window), int(remaining), repr(interval)]
        extra = int(self._observe(keys=[self.key], args=[*args, uuid.uuid4().hex]))
        if extra:
            log.info(
                "budget=%s CRM reports %d remaining: recorded %d phantom requests",
                self.name,
                remaining,
                extra,
            )
        return extra

    def _attempt(self, n: int) -> _Attempt:
        """Run the acquire script once: grant and record n requests, or say how long to wait."""
        args = [*self._args(), n, self.limit, repr(self.window), uuid.uuid4().hex]
        reply = self._acquire(keys=[self.key, self.pause_key], args=args)
        granted, wait, now, kind, reason, policy = (keys.text(v) for v in reply)
        ok = granted == "1"
        return _Attempt(
            ok, 0.0 if ok else max(float(wait), MIN_WAIT), float(now), kind, reason, policy
        )

    def _set_pause(self, args: list[Any], reason: str) -> float | None:
        """Run the pause script and log the outcome."""
        reply = keys.text(self._pause(keys=[self.pause_key], args=args))
        until = float(reply) if reply else None
        if until is not None:
            log.warning("budget=%s paused until %.3f: %s", self.name, until, reason)
        return until

    def _limited(self, attempt: _Attempt) -> RateLimited:
        """The error acquire raises when it cannot be served within its timeout."""
        if attempt.kind == "pause":
            why = f"request budget {self.name} paused: {attempt.reason or 'no reason given'}"
            return RateLimited(why, wait=attempt.wait, policy=attempt.policy or "paused")
        why = f"request budget {self.name} exhausted ({self.limit} per {self.window:g}s)"
        return RateLimited(why, wait=attempt.wait, policy="window")

    def _check(self, n: int) -> None:
        """Refuse requests that can never be granted."""
        if n < 1 or n > self.limit:
            raise ValueError(f"n must be between 1 and the limit {self.limit}, not {n}")

    def _args(self) -> list[Any]:
        """The leading ``now`` script argument: '' means Redis server TIME."""
        return ["" if self.clock is None else repr(float(self.clock()))]

    def _local_now(self) -> float:
        """A clock for measuring local waits."""
        return time.monotonic() if self.clock is None else self.clock()
