"""How full Redis is, and whether its eviction policy keeps what must not go.

Read from ``INFO memory`` (``used_memory``, ``maxmemory``, ``maxmemory_policy``): managed
Redis such as Heroku's may refuse ``CONFIG GET``, so that is only asked when INFO lacks the
policy, and a Redis that tells neither is reported as such, never refused. At 70 % of
``maxmemory`` status, /status and the logs warn; at 85 % they say it is urgent. Under
``noeviction`` (Heroku's default) a full Redis refuses writes: the receiver answers 503
and Svix retries for about 27.5 hours, then drops the events.

The inbox, the queue, the ledger and everything else that must outlive a full Redis never
carry a TTL while needed; caches (trails, dedupe marks, the email cache) do. So a
``volatile-*`` policy may only drop caches, while ``allkeys-*`` could drop queued events and
learners' state: the worker and the release refuse it, naming the fix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from instruqt_crm.keys import text

log = logging.getLogger(__name__)

WARN_SHARE = 0.70
URGENT_SHARE = 0.85
RECOMMENDED_POLICY = "volatile-lru"
HEROKU_FIX = f"heroku redis:maxmemory <DATABASE> --policy {RECOMMENDED_POLICY}"
RANKS = {"ok": 0, "unlimited": 0, "warning": 1, "urgent": 2}  # how loud each level is


@dataclass(frozen=True)
class Memory:
    """Redis's memory as INFO tells it: bytes used, the limit (None: none set or not told)
    and the eviction policy (None: not told); ``told`` is False where INFO was refused."""

    used: int
    limit: int | None
    policy: str | None
    told: bool = True

    @property
    def share(self) -> float | None:
        """How full Redis is (0..1, past 1 when over), or None without a limit."""
        return None if not self.limit else self.used / self.limit

    @property
    def level(self) -> str:
        """``ok``, ``warning`` (70 %+), ``urgent`` (85 %+), or ``unlimited`` (no maxmemory)."""
        share = self.share
        if share is None:
            return "unlimited"
        if share >= URGENT_SHARE:
            return "urgent"
        return "warning" if share >= WARN_SHARE else "ok"

    def summary(self) -> str:
        """How full Redis is and its eviction policy, in a few words."""
        if not self.told:
            return "memory and eviction policy not told (INFO refused)"
        if self.share is None:
            size = f"{megabytes(self.used)} used, no maxmemory"
        else:
            size = f"{self.share:.0%} of {megabytes(self.limit or 0)} ({megabytes(self.used)})"
        return f"memory {size}, eviction policy {self.policy or 'not told'}"

    def warning(self) -> str | None:
        """One line when Redis is 70 % full or more, saying what follows and what to do."""
        share, level = self.share, self.level
        if share is None or level in ("ok", "unlimited"):
            return None
        past = URGENT_SHARE if level == "urgent" else WARN_SHARE
        if self.policy in (None, "noeviction"):
            full = "refuses writes (the receiver answers 503, Svix retries for ~27.5 h)"
        else:
            full = "evicts caches, then refuses writes"
        return (
            f"Redis memory {share:.0%} full ({megabytes(self.used)} of "
            f"{megabytes(self.limit or 0)}, past {past:.0%}): when full it {full}; "
            f"{'act now' if level == 'urgent' else 'plan for it'}: a larger Redis plan, or "
            "a shorter TRACE_RETENTION_DAYS or TRACE_MAX_BYTES"
        )

    def refusal(self) -> str | None:
        """One line when the eviction policy could drop queued events or ledger state."""
        if self.policy is None or not self.policy.startswith("allkeys-"):
            return None
        return (
            f"eviction policy {self.policy} may drop queued events and learners' state when "
            f"Redis is full: set {RECOMMENDED_POLICY} (caches carry TTLs and may go; queues "
            f"and state carry none), on Heroku: {HEROKU_FIX}"
        )

    def figures(self) -> dict[str, Any]:
        """JSON-ready figures for ``status``."""
        return {
            "told": self.told,
            "summary": self.summary(),
            "used_bytes": self.used,
            "max_bytes": self.limit,
            "policy": self.policy,
            "share": self.share,
            "level": self.level,
            "warning": self.warning(),
            "refusal": self.refusal(),
        }


def megabytes(size: int) -> str:
    """Bytes as ``12.3 MB``."""
    return f"{size / 1_000_000:.1f} MB"


def read(conn: redis.Redis) -> Memory:
    """Redis's memory now (``INFO memory``; ``CONFIG GET`` only if INFO hides the policy)."""
    try:
        info = conn.info("memory")
    except redis.ResponseError:  # an ACL that denies INFO: nothing known, nothing refused
        return Memory(0, None, None, told=False)
    limit = _number(info.get("maxmemory"))
    policy = info.get("maxmemory_policy")
    if policy is None:
        policy = _configured_policy(conn)
    return Memory(_number(info.get("used_memory")) or 0, limit or None, _text(policy))


def out_of_memory(exc: redis.ResponseError) -> bool:
    """Whether Redis refused a command because it is full (also from inside a script, where
    Redis before 7 wraps the refusal in a script error)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or "-OOM " in str(exc)


def _configured_policy(conn: redis.Redis) -> str | None:
    """The policy from ``CONFIG GET``, or None where the server refuses the command."""
    try:
        found = conn.config_get("maxmemory-policy")
    except redis.ResponseError:  # renamed or disabled, as managed Redis does
        return None
    return _text(found.get("maxmemory-policy"))


def _number(value: Any) -> int | None:
    """An INFO figure as an integer (None when absent or not a number)."""
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str | None:
    """A policy name as text (None when absent)."""
    return None if value is None else text(value)


class MemoryWatch:
    """Logs how full Redis is, from a process that runs anyway (the worker's maintenance,
    the receiver): reads at most every ``every`` seconds, warns when the level rises and
    again every ``repeat`` seconds while it stays at 70 % or more."""

    def __init__(
        self,
        every: float = 60.0,
        repeat: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every = every
        self.repeat = repeat
        self.clock = clock
        self._read_at: float | None = None
        self._warned_at: float | None = None
        self._level = "ok"

    def check(self, conn: redis.Redis) -> Memory | None:
        """Read and log if due; the reading, or None when it was not due or Redis failed."""
        now = self.clock()
        if self._read_at is not None and now - self._read_at < self.every:
            return None
        self._read_at = now
        try:
            memory = read(conn)
        except redis.RedisError as exc:
            log.debug("Redis memory not read: %s", exc)
            return None
        self._log(memory, now)
        return memory

    def _log(self, memory: Memory, now: float) -> None:
        """Warn when the level rose or the last warning is ``repeat`` old; note the fall."""
        line, level, before = memory.warning(), memory.level, self._level
        self._level = level
        if line is None:
            if before in ("warning", "urgent"):
                log.info("Redis memory back under %.0f%% full", WARN_SHARE * 100)
            return
        rose = RANKS[level] > RANKS.get(before, 0)
        if rose or self._warned_at is None or now - self._warned_at >= self.repeat:
            self._warned_at = now
            (log.error if level == "urgent" else log.warning)("%s", line)
