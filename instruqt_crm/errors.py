"""Every error the sync raises on purpose, in one tree, and the categories failures are filed in.

::

    SyncError                  base of everything below
    ├── RetryableError         try again later (5xx, timeouts, locks, connection resets)
    │   └── RateLimited        try again after ``wait`` seconds (429, daily quota)
    └── PermanentError         retrying will not help; ``category`` files it for operators
        ├── BatchRejected      the CRM refused a whole batch because of some records in it
        ├── MappingFailure     the mapping cannot turn this one event into property values
        └── NotReady           the CRM account is not set up for the mapping (fields, access)

Vendor exceptions are converted to these at the adapter boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from enum import StrEnum


class Category(StrEnum):
    """Why something failed for good: what ``failed list`` groups by and operators act on."""

    AUTH = "auth"  # a token, key or scope is wrong: fix the credentials
    CONFIG = "config"  # a setting is unusable (a URL, a login flow)
    CONFLICT = "conflict"  # the CRM holds a conflicting record
    VALIDATION = "validation"  # the CRM refused the values (a missing property, a bad email)
    RATE_LIMIT = "rate_limit"  # the CRM's quota was spent
    INSTRUQT_API = "instruqt_api"  # Instruqt's API refused a lookup
    IDENTITY = "identity"  # the learner's email was never found
    MAPPING = "mapping"  # a template failed or a value has the wrong type
    INVALID_BODY = "invalid_body"  # a signed delivery that is not a usable event
    OTHER = "other"  # an unexpected error: a bug, or an answer we do not understand


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
    """A failure that retrying cannot fix; ``category`` files it for operators."""

    def __init__(self, reason: str, category: Category = Category.VALIDATION) -> None:
        super().__init__(reason)
        self.category = Category(category)


class BatchRejected(PermanentError):
    """The CRM refused the whole batch because of some records in it (``culprits``: their keys,
    when the CRM's answer names them; empty when it does not)."""

    def __init__(
        self,
        reason: str,
        category: Category = Category.VALIDATION,
        culprits: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(reason, category)
        self.culprits = culprits


class MappingFailure(PermanentError):
    """This one event cannot be mapped (a template failed or a value has the wrong type)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, Category.MAPPING)


class NotReady(PermanentError):
    """The CRM account is not set up for the mapping: fields it lacks or hides, access the
    user lacks. The reason names each problem and its fix; the worker does not start."""
