"""HubSpot adapter: batched contact upserts through hubspot-api-client, within the rate budget.

Every SDK or urllib3 failure is converted here into the engine's errors (see
``instruqt_crm.errors``): 429 → ``RateLimited`` (wait per ``policyName``), 5xx/423/connection
trouble → ``RetryableError``, 401/403 → ``PermanentError`` naming the token or scope, and a
400 or 409 that refuses the whole batch → ``BatchRejected`` naming the culprits when HubSpot
says.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import redis
import urllib3
from hubspot import HubSpot
from hubspot.crm.contacts import (
    BatchInputSimplePublicObjectBatchInputUpsert,
    SimplePublicObjectBatchInputUpsert,
)

from instruqt_crm.errors import (
    BatchRejected,
    Category,
    PermanentError,
    RateLimited,
    RetryableError,
)
from instruqt_crm.journal import counters
from instruqt_crm.ratelimit import RequestBudget
from instruqt_crm.retry import retrying

from .base import ContactChange, Outcome, PropertyInfo, Value

log = logging.getLogger(__name__)
T = TypeVar("T")
TIMEOUT = (5.0, 30.0)  # connect, read (seconds)
BATCH_SIZE = 100
WINDOW_SECONDS = 10.0  # HubSpot's rolling window for private apps
WINDOW_MARGIN = 0.5  # our window is a little longer: requests reach HubSpot with some jitter


def hubspot_budget(conn: redis.Redis, requests_per_10s: int) -> RequestBudget:
    """The request budget all workers share for one HubSpot account."""
    return RequestBudget(conn, "hubspot", requests_per_10s, WINDOW_SECONDS + WINDOW_MARGIN)


def format_value(value: Value) -> str:
    """A value as HubSpot wants it: text; numbers without exponent; booleans; empty = clear."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _body(exc: Any) -> dict[str, Any]:
    """The JSON body of an SDK exception ({} if none)."""
    try:
        parsed = json.loads(getattr(exc, "body", None) or "{}")
    except (TypeError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _header(exc: Any, name: str) -> str | None:
    headers = getattr(exc, "headers", None) or {}
    return headers.get(name) if hasattr(headers, "get") else None


def rate_limit_wait(body: dict[str, Any], headers_interval_ms: str | None) -> tuple[float, str]:
    """How long to hold off after a 429, from HubSpot's ``policyName``."""
    policy = str(body.get("policyName") or "TEN_SECONDLY_ROLLING")
    if policy == "DAILY":
        now = datetime.now(UTC)
        tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return (tomorrow - now).total_seconds() + 60, policy
    if policy == "SECONDLY":
        return 1.0, policy
    interval = float(headers_interval_ms) / 1000 if headers_interval_ms else 10.0
    return interval, policy


def convert(exc: Exception, what: str) -> Exception:
    """The engine error for an SDK or transport failure during ``what``."""
    status = getattr(exc, "status", None)
    if isinstance(exc, urllib3.exceptions.HTTPError) or status in (None, 0):
        return RetryableError(f"HubSpot {what}: connection problem ({type(exc).__name__})")
    body = _body(exc)
    message = str(body.get("message") or getattr(exc, "reason", "") or "")[:500]
    if status == 429:
        wait, policy = rate_limit_wait(
            body, _header(exc, "X-HubSpot-RateLimit-Interval-Milliseconds")
        )
        return RateLimited(f"HubSpot {what}: rate limited ({policy})", wait, policy)
    if status == 401:
        return PermanentError(
            f"HubSpot {what}: 401 {body.get('category', 'INVALID_AUTHENTICATION')}: the token "
            "in HUBSPOT_ACCESS_TOKEN is wrong, expired or revoked (copy the private app's "
            "access token)",
            Category.AUTH,
        )
    if status == 403:
        scopes = _scopes(body)
        return PermanentError(
            f"HubSpot {what}: 403 {body.get('category', 'MISSING_SCOPES')}: the private app lacks "
            f"scope(s) {scopes or 'needed for this call'}; add them in the app's settings",
            Category.AUTH,
        )
    if status == 409:
        return PermanentError(f"HubSpot {what}: 409 {message}", Category.CONFLICT)
    if status == 423:
        return RetryableError(f"HubSpot {what}: 423 locked, retrying", wait=2.0)
    if int(status) >= 500:
        return RetryableError(f"HubSpot {what}: {status} server error")
    return PermanentError(f"HubSpot {what}: {status} {message}", Category.VALIDATION)


def _plain(answer: urllib3.BaseHTTPResponse) -> tuple[dict[str, Any], int, Any]:
    """(JSON body, status, headers) of an answer the SDK left unread."""
    try:
        body = answer.data
    finally:
        answer.release_conn()
    parsed = json.loads(body) if body else {}
    return (parsed if isinstance(parsed, dict) else {}), answer.status, answer.headers


def _scopes(body: dict[str, Any]) -> str:
    """Required scopes named in a 403 body."""
    found: list[str] = []
    for error in body.get("errors") or []:
        context = error.get("context") or {} if isinstance(error, dict) else {}
        for key in ("requiredGranularScopes", "requiredScopes"):
            found += [str(s) for s in context.get(key) or []]
    return ", ".join(sorted(set(found)))


def culprits(answer: str, by_id: dict[str, ContactChange]) -> frozenset[str]:
    """Keys of the changes a whole-batch 400 names: by their id (email) or a property they set."""
    named = set()
    for record_id, change in by_id.items():
        words = [record_id, *change.properties]
        if any(re.search(rf"(?<![\w.@-]){re.escape(w)}(?![\w.@-])", answer) for w in words):
            named.add(change.key)
    return frozenset(named)


class HubSpotAdapter:
    """Upsert contacts into HubSpot by email, 100 per request, never over the shared budget."""

    name = "hubspot"
    batch_size = BATCH_SIZE

    def __init__(
        self,
        token: str,
        host: str,
        budget: RequestBudget | None = None,
        attempts: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        id_property: str = "email",
    ) -> None:
        self.client = HubSpot(access_token=token, host=host)
        self.budget = budget
        self.attempts = attempts
        self.sleep = sleep
        self.id_property = id_property

    def __repr__(self) -> str:
        return f"HubSpotAdapter(host={self.client.api_client.configuration.host!r})"

    def _call(self, what: str, function: Callable[..., Any], *args: Any, raw: bool = False) -> Any:
        """One SDK call: budget first, timeouts, errors converted, headers fed to the budget.

        ``raw``: the answer's JSON as plain dicts and lists, not the SDK's models (whose
        construction parses every timestamp in the answer: ~10 % of a worker's CPU in a burst).
        """
        if self.budget is not None:
            self.budget.acquire(1, timeout=60)
        try:
            if raw:
                data, status, headers = _plain(
                    function(*args, _request_timeout=TIMEOUT, _preload_content=False)
                )
            else:
                data, status, headers = function(*args, _request_timeout=TIMEOUT)
        except Exception as exc:  # the SDK raises per-API classes and urllib3 errors
            error = convert(exc, what)
            self._count(str(getattr(exc, "status", None) or "error"))
            if isinstance(error, RateLimited):
                self._count_429(error.policy)
                if self.budget is not None:
                    self.budget.pause_for(error.wait or 0.0, error.reason, error.policy)
            raise error from exc
        self._count(str(status))
        self._observe(headers)
        return data

    def _count(self, status: str) -> None:
        """Count one request in the shared metrics (needs the budget's Redis)."""
        if self.budget is not None:
            counters.incr(self.budget.conn, "crm_requests", self.name, status)

    def _count_429(self, policy: str) -> None:
        if self.budget is not None:
            counters.incr(self.budget.conn, "crm_rate_limited", self.name, policy)

    def _observe(self, headers: Any) -> None:
        """Feed X-HubSpot-RateLimit-* headers to the shared budget."""
        if self.budget is None or not headers:
            return

        def number(name: str) -> int | None:
            value = headers.get(name)
            return int(value) if value not in (None, "") else None

        self.budget.observe_headers(
            number("X-HubSpot-RateLimit-Max"),
            number("X-HubSpot-RateLimit-Remaining"),
            number("X-HubSpot-RateLimit-Interval-Milliseconds"),
        )

    def call(self, what: str, function: Callable[..., Any], *args: Any, raw: bool = False) -> Any:
        """``_call`` under the shared retry policy."""
        policy = retrying(attempts=self.attempts, sleep=self.sleep, label=f"hubspot {what}")
        return policy(self._call, what, function, *args, raw=raw)

    def upsert(self, changes: Sequence[ContactChange]) -> list[Outcome]:
        """Upsert a batch keyed by email (or the mapping's upsert key); per-contact outcomes
        from a 200 or 207."""
        by_id: dict[str, ContactChange] = {}
        unkeyed = []
        for change in changes:
            record_id = self._id(change)
            if record_id is None:
                reason = f"no {self.id_property} value to upsert this contact on"
                unkeyed.append(Outcome(change.key, "rejected", reason, Category.VALIDATION))
            else:
                by_id[record_id] = change
        if not by_id:
            return unkeyed
        inputs = [
            SimplePublicObjectBatchInputUpsert(
                id=record_id, id_property=self.id_property, properties=self._properties(change)
            )
            for record_id, change in by_id.items()
        ]
        batch = BatchInputSimplePublicObjectBatchInputUpsert(inputs=inputs)
        try:
            data = self.call(
                "batch upsert",
                self.client.crm.contacts.batch_api.upsert_with_http_info,
                batch,
                raw=True,
            )
        except PermanentError as exc:
            # 400, or 409 for a unique value another contact holds: one input's fault, but an
            # email-keyed batch fails whole; send() sets the named inputs aside or splits it.
            if exc.category in (Category.VALIDATION, Category.CONFLICT):
                answer = str(getattr(exc.__cause__, "body", None) or exc.reason)
                raise BatchRejected(
                    exc.reason, Category.VALIDATION, culprits(answer, by_id)
                ) from exc
            raise
        return self._outcomes(data, by_id) + unkeyed

    def _id(self, change: ContactChange) -> str | None:
        """The value of the id property for a change (the email, unless upserting on another
        property: the ledger then sends that property's value with every change)."""
        if self.id_property == "email":
            return change.email
        value = change.properties.get(self.id_property)
        return format_value(value) if value not in (None, "") else None

    def _properties(self, change: ContactChange) -> dict[str, str]:
        """The input's properties as HubSpot wants them (with the email when not keyed on it)."""
        found = {name: format_value(value) for name, value in change.properties.items()}
        if self.id_property != "email":
            found.setdefault("email", change.email)
        return found

    def _outcomes(self, data: dict[str, Any], by_id: dict[str, ContactChange]) -> list[Outcome]:
        """200: every contact written; 207: those named in ``errors`` rejected, the rest written."""
        lowered = {record_id.lower(): change for record_id, change in by_id.items()}
        rejected: dict[str, Outcome] = {}
        for error in data.get("errors") or []:
            reason = f"{error.get('category', '')}: {error.get('message', '')}".strip(": ")
            for values in (error.get("context") or {}).values():
                for record_id in values or []:
                    change = lowered.get(str(record_id).lower())
                    if change is not None:
                        rejected[change.key] = Outcome(
                            change.key, "rejected", reason, Category.VALIDATION
                        )
        written = [
            Outcome(change.key, "synced") for change in by_id.values() if change.key not in rejected
        ]
        return written + list(rejected.values())

    def describe(self) -> dict[str, PropertyInfo]:
        """Contact properties that exist in the account (one GET)."""
        data = self.call(
            "list properties",
            self.client.crm.properties.core_api.get_all_with_http_info,
            "contacts",
        )
        return {
            p.name: PropertyInfo(
                p.name,
                p.type,
                {
                    "group": p.group_name or "",
                    "field": p.field_type or "",
                    "unique": "true" if p.has_unique_value else "false",
                },
            )
            for p in data.results
        }
