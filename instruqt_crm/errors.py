"""Every error the sync raises on purpose, in one tree.

::

    SyncError                  base of everything below
    ├── RetryableError         try again later (5xx, timeouts, locks, connection resets)
    │   └── RateLimited        try again after ``wait`` seconds (429, daily quota)
    └── PermanentError         retrying will not help (validation, auth, missing property)

Vendor exceptions are converted to these at the adapter boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class SyncError(Exception):
    """Base class: a CRM or lookup call did not succeed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryableError(SyncError):
    """A transient failure: the same call may succeed later."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


class RateLimited(RetryableError):
    """The CRM refused for quota; ``wait`` says how long to hold off (seconds)."""

    def __init__(self, reason: str, wait: float, policy: str = "") -> None:
        super().__init__(reason, wait)
        self.policy = policy


class PermanentError(SyncError):
    """A failure that retrying cannot fix; ``category`` groups it for operators."""

    def __init__(self, reason: str, category: str = "validation") -> None:
        super().__init__(reason)
        self.category = category
