"""Rate limiting and request bookkeeping for the fake HubSpot server."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RequestRecord:
    """One API request the fake answered (control endpoints are not recorded)."""

    method: str
    path: str
    status: int
    time: float  # FakeHubSpot.clock() (time.monotonic() by default) at arrival
    body: Any  # parsed JSON, or None
    inputs: int  # len(body["inputs"]) when the body has an inputs list, else 0
    query: str = ""
    policy: str | None = None  # TEN_SECONDLY_ROLLING / DAILY for a 429
    answer: Any = None  # the JSON (or text) the fake answered

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class RollingWindow:
    """At most `limit` admitted hits in any `seconds`-long rolling window."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        self._hits: deque[float] = deque()

    def _prune(self, now: float) -> None:
        while self._hits and self._hits[0] <= now - self.seconds:
            self._hits.popleft()

    def used(self, now: float) -> int:
        """Hits inside the window ending now."""
        self._prune(now)
        return len(self._hits)

    def full(self, now: float) -> bool:
        """True when one more hit would exceed the limit."""
        return self.used(now) >= self.limit

    def hit(self, now: float) -> None:
        """Record an admitted request."""
        self._prune(now)
        self._hits.append(now)

    def remaining(self, now: float) -> int:
        """Requests still allowed in the window ending now."""
        return max(0, self.limit - self.used(now))


def peak_in_window(times: list[float], seconds: float) -> int:
    """Most timestamps inside any half-open window of `seconds` (the limiter's rule)."""
    ordered = sorted(times)
    best = start = 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - seconds:
            start += 1
        best = max(best, end - start + 1)
    return best


def summarize(
    records: list[RequestRecord], window_seconds: float, requests_per_window: int
) -> dict[str, Any]:
    """Counts for `/_fake/requests` and benchmarks.

    `max_in_window` counts every authenticated request sent (429s included: what the
    client spent); `max_admitted_in_window` leaves the 429s out (what HubSpot let through).
    """
    by_status = Counter(str(r.status) for r in records)
    limited = [r for r in records if r.status == 429]
    sent = [r.time for r in records if r.status != 401]
    admitted = [r.time for r in records if r.status not in (401, 429)]
    return {
        "total": len(records),
        "by_status": dict(sorted(by_status.items())),
        "count_429": len(limited),
        "rate_limited_by_policy": dict(Counter(r.policy or "" for r in limited)),
        "max_in_window": peak_in_window(sent, window_seconds),
        "max_admitted_in_window": peak_in_window(admitted, window_seconds),
        "window_seconds": window_seconds,
        "requests_per_window": requests_per_window,
        "inputs_upserted": sum(
            r.inputs for r in records if r.path.endswith("/batch/upsert") and r.status in (200, 207)
        ),
    }
