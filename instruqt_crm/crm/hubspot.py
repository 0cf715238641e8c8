"""HubSpot adapter: batched contact upserts through hubspot-api-client, within the rate budget.

Every SDK or urllib3 failure becomes one of the engine's errors (``hubspot_errors.convert``),
and a 400 or 409 that refuses the whole batch → ``BatchRejected`` naming the culprits when
HubSpot says. A ``DAILY`` 429 pauses every worker until HubSpot's ``resetsAt`` (``hubspot_daily``);
a 207 is read input by input through the trace ids on them (``hubspot_batch``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import urllib3
from hubspot import HubSpot
from hubspot.crm.contacts import BatchReadInputSimplePublicObjectId, SimplePublicObjectId

from instruqt_crm.config import DEFAULT_HUBSPOT_DAILY_WARN_PERCENT
from instruqt_crm.errors import (
    BatchRejected,
    Category,
    PermanentError,
    RateLimited,
    RetryableError,
    SyncError,
)
from instruqt_crm.journal import counters
from instruqt_crm.ratelimit import RequestBudget
from instruqt_crm.retry import retrying

from .base import ContactChange, CurrentValues, Outcome, PropertyInfo, Value
from .hubspot_batch import Answer, Entry, culprits, entries, read, request, same_id
from .hubspot_daily import (
    USAGE_PATH,
    DailyLimit,
    DailyUsage,
    parse_usage,
    reset_time,
    usage_from_headers,
)
from .hubspot_errors import convert

log = logging.getLogger(__name__)
T = TypeVar("T")
TIMEOUT = (5.0, 30.0)  # connect, read (seconds)
BATCH_SIZE = 100
WINDOW_SECONDS = 10.0  # HubSpot's rolling window for private apps
WINDOW_MARGIN = 0.5  # our window is a little longer: requests reach HubSpot with some jitter
MISSING_RESENDS = 2  # an input in neither results nor errors is sent again, then rejected


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


def _plain(answer: urllib3.BaseHTTPResponse) -> tuple[dict[str, Any], int, Any]:
    """(JSON body, status, headers) of an answer the SDK left unread (a bare JSON list comes
    back as ``{"results": [...]}``)."""
    try:
        body = answer.data
    finally:
        answer.release_conn()
    parsed = json.loads(body) if body else {}
    if isinstance(parsed, list):
        return {"results": parsed}, answer.status, answer.headers
    return (parsed if isinstance(parsed, dict) else {}), answer.status, answer.headers


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
        daily_warn_percent: float = DEFAULT_HUBSPOT_DAILY_WARN_PERCENT,
    ) -> None:
        self.client = HubSpot(access_token=token, host=host)
        self.budget = budget
        self.attempts = attempts
        self.sleep = sleep
        self.id_property = id_property
        self.daily = (
            DailyLimit(budget.conn, budget.name, daily_warn_percent, budget.clock)
            if budget is not None
            else None
        )

    def __repr__(self) -> str:
        return f"HubSpotAdapter(host={self.client.api_client.configuration.host!r})"

    def _call(
        self,
        what: str,
        function: Callable[..., Any],
        *args: Any,
        raw: bool = False,
        watch_daily: bool = True,
    ) -> Any:
        """One SDK call: budget first, timeouts, errors converted, headers fed to the budget.

        ``raw``: the answer's JSON as plain dicts and lists, not the SDK's models (whose
        construction parses every timestamp in the answer: ~10 % of a worker's CPU in a burst).
        ``watch_daily``: now and then note the day's usage, and read ``resetsAt`` after a
        ``DAILY`` 429 (off for the usage read itself).
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
                error = self._hold_off(error, watch_daily)
            raise error from exc
        self._count(str(status))
        self._observe(headers)
        if watch_daily:
            self._watch_daily(headers)
        return data

    def _hold_off(self, error: RateLimited, read_reset: bool) -> RateLimited:
        """Pause every worker after a 429: HubSpot's interval, or until the daily limit resets
        (HubSpot's ``resetsAt``, read within the budget; fallbacks in ``reset_time``)."""
        if self.budget is None or self.daily is None:
            return error
        if error.policy != "DAILY":
            self.budget.pause_for(error.wait or 0.0, error.reason, error.policy)
            return error
        if not read_reset:  # the usage read itself hit the limit: reset_time falls back
            return error
        now = self.daily.clock()
        until, how = reset_time(self._read_usage, self.daily.resets_at(), now)
        reason = f"HubSpot's daily API limit is spent; resuming at {how}"
        self.budget.pause_until(until, reason, "DAILY")  # which logs it
        return RateLimited(reason, max(0.0, until - now), "DAILY")

    def _read_usage(self) -> DailyUsage:
        """The day's usage, noted for all workers: one GET of HubSpot's usage endpoint, within
        the budget, not retried."""
        api = self.client.crm.contacts.batch_api.api_client

        def get(**options: Any) -> Any:
            return api.call_api(
                USAGE_PATH,
                "GET",
                header_params={"Accept": "application/json"},
                auth_settings=["oauth2"],
                **options,
            )

        usage = parse_usage(self._call("read daily usage", get, raw=True, watch_daily=False))
        if self.daily is not None:
            self.daily.record(usage)
        return usage

    def _watch_daily(self, headers: Any) -> None:
        """When it is this worker's turn (``hubspot_daily.CHECK_SECONDS``), note the day's
        usage: from the answer's daily headers if HubSpot sent them, else from its endpoint."""
        if self.daily is None or not self.daily.due():
            return
        usage = usage_from_headers(headers)
        if usage is not None:
            self.daily.record(usage)
            return
        try:
            self._read_usage()
        except (SyncError, ValueError) as exc:
            log.info("hubspot: the day's API usage could not be read: %s", exc)

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
        """Upsert a batch keyed by email (or the mapping's upsert key): one outcome per change.

        Written are the inputs HubSpot's ``results`` hold; rejected those its ``errors`` name
        (by trace id). An input in neither is sent again, ``MISSING_RESENDS`` times at most,
        then rejected with what the answer said.
        """
        keyed, outcomes = self._keyed(changes)
        batch, answer = entries(keyed), None
        for attempt in range(MISSING_RESENDS + 1):
            if not batch:
                return outcomes
            if attempt:
                log.warning(
                    "hubspot: %d contact(s) in neither results nor errors of HubSpot's answer: "
                    "sending them again",
                    len(batch),
                )
            try:
                answer = self._send(batch)
            except (BatchRejected, RetryableError) as exc:
                if not attempt:  # the whole batch: send() splits it, or the flush retries it
                    raise
                return outcomes + _given_up(batch, exc)
            outcomes += answer.outcomes
            batch = entries([(entry.change, entry.record_id) for entry in answer.missing])
        assert answer is not None
        reason = answer.missing_reason(MISSING_RESENDS + 1)
        log.warning("hubspot: %d contact(s) rejected: %s", len(batch), reason)
        return outcomes + [
            Outcome(entry.change.key, "rejected", reason, Category.VALIDATION) for entry in batch
        ]

    def _keyed(
        self, changes: Sequence[ContactChange]
    ) -> tuple[list[tuple[ContactChange, str]], list[Outcome]]:
        """The changes to send with the id value each is upserted on, and the outcomes of the
        others: rejected without an id value, retried later when another change in the batch
        has the same one (HubSpot refuses a batch with duplicate ids)."""
        keyed: list[tuple[ContactChange, str]] = []
        outcomes: list[Outcome] = []
        seen: set[str] = set()
        for change in changes:
            record_id = self._id(change)
            if record_id is None:
                reason = f"no {self.id_property} value to upsert this contact on"
                outcomes.append(Outcome(change.key, "rejected", reason, Category.VALIDATION))
            elif same_id(record_id, self.id_property) in seen:
                reason = f"another contact in the batch has the same {self.id_property}"
                outcomes.append(Outcome(change.key, "retry", reason))
            else:
                seen.add(same_id(record_id, self.id_property))
                keyed.append((change, record_id))
        return keyed, outcomes

    def _send(self, batch: list[Entry]) -> Answer:
        """One batch upsert request, and what its answer says of each input."""
        try:
            data = self.call(
                "batch upsert",
                self.client.crm.contacts.batch_api.upsert_with_http_info,
                request(batch, self.id_property, self._properties),
                raw=True,
            )
        except PermanentError as exc:
            # 400, or 409 for a unique value another contact holds: one input's fault, but an
            # email-keyed batch fails whole; send() sets the named inputs aside or splits it.
            if exc.category in (Category.VALIDATION, Category.CONFLICT):
                said = str(getattr(exc.__cause__, "body", None) or exc.reason)
                by_id = {entry.record_id: entry.change for entry in batch}
                raise BatchRejected(exc.reason, Category.VALIDATION, culprits(said, by_id)) from exc
            raise
        return read(data, batch, self.id_property)

    def _id(self, change: ContactChange) -> str | None:
        """The value of the id property for a change (the email, unless upserting on another
        property: the ledger then sends that property's value with every change)."""
        if self.id_property == "email":
            return change.email
        value = change.properties.get(self.id_property)
        return format_value(value) if value not in (None, "") else None

    def _properties(self, change: ContactChange) -> dict[str, str]:
        """The input's properties as HubSpot wants them, the email always among them (written
        when not keyed on it; when keyed on it, the result that echoes it is this input's)."""
        found = {name: format_value(value) for name, value in change.properties.items()}
        found.setdefault("email", change.email)
        return found

    def current_values(
        self, changes: Sequence[ContactChange], names: Sequence[str]
    ) -> CurrentValues:
        """The contacts' ``names`` properties as HubSpot holds them: one batch read per 100
        (by email, or the upsert key), within the budget. A contact HubSpot says it does not
        have (``OBJECT_NOT_FOUND`` in its 207) is None; one it did not answer for (no id
        value, another error, a result under another email) is left out."""
        found: dict[str, dict[str, str] | None] = {}
        keyed, _ = self._keyed(changes)
        wanted = sorted({*names, self.id_property})
        requests = 0
        for start in range(0, len(keyed), BATCH_SIZE):
            part = keyed[start : start + BATCH_SIZE]
            body = BatchReadInputSimplePublicObjectId(
                id_property=self.id_property,
                inputs=[SimplePublicObjectId(id=record_id) for _, record_id in part],
                properties=wanted,
                properties_with_history=[],
            )
            read_function = self.client.crm.contacts.batch_api.read_with_http_info
            data = self.call("batch read", read_function, body, raw=True)
            requests += 1
            by_id = {same_id(record_id, self.id_property): c.key for c, record_id in part}
            for result in data.get("results") or []:
                values = result.get("properties") or {}
                key = by_id.get(same_id(str(values.get(self.id_property) or ""), self.id_property))
                if key is not None:
                    found[key] = {n: str(v) for n, v in values.items() if v not in (None, "")}
            for error in data.get("errors") or []:
                if isinstance(error, dict) and error.get("category") == "OBJECT_NOT_FOUND":
                    for missing in (error.get("context") or {}).get("ids") or []:
                        key = by_id.get(same_id(str(missing), self.id_property))
                        if key is not None:
                            found.setdefault(key, None)
        return CurrentValues(found, requests)

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


def _given_up(batch: Sequence[Entry], exc: BatchRejected | RetryableError) -> list[Outcome]:
    """Outcomes for inputs whose resend failed as a whole: retried later when that may help,
    else rejected with HubSpot's answer."""
    if isinstance(exc, RetryableError):
        return [Outcome(entry.change.key, "retry", exc.reason) for entry in batch]
    return [Outcome(e.change.key, "rejected", exc.reason, exc.category) for e in batch]
