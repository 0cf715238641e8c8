"""Salesforce adapter: Contact / Lead / auto routing, one lookup per object, sObject Collections.

Per batch: ``salesforce_routing`` finds each change's record (one SOQL query per object);
matched records are updated by Id, new ones are upserted by the external id (≤ 200 per
request, ``allOrNone: false``). Per-record errors become outcomes (UNABLE_TO_LOCK_ROW is
retried, the rest rejected with Salesforce's message); whole-request failures become the
engine's errors. Play records (``Instruqt_Play__c``) go through the same writes: see
``salesforce_plays``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceResourceNotFound

from instruqt_crm.errors import BatchRejected, Category, PermanentError, RateLimited
from instruqt_crm.journal import counters
from instruqt_crm.mapping import Mapping
from instruqt_crm.ratelimit import RequestBudget
from instruqt_crm.retry import retrying

from .base import ContactChange, Outcome, PropertyInfo
from .salesforce_auth import Connection
from .salesforce_plays import SalesforcePlays
from .salesforce_routing import BATCH_SIZE, Router, Target, field_name

log = logging.getLogger(__name__)
RETRYABLE_CODES = {"UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE"}
LOCK_RETRIES = 2
LIMIT_RESERVE = 0.05  # keep this share of the daily API quota for the org's other integrations
RESERVE_WAIT = 900.0  # seconds to hold off once only the reserve is left


class SalesforceAdapter:
    """Write learner fields to Contacts and/or Leads, 200 records per request."""

    name = "salesforce"
    batch_size = BATCH_SIZE

    def __init__(
        self,
        connection: Connection,
        mapping: Mapping,
        budget: RequestBudget | None = None,
        attempts: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.connection = connection
        self.mapping = mapping
        self.budget = budget
        self.attempts = attempts
        self.sleep = sleep
        self.router = Router(mapping, self.call, connection.creds.api_version)
        self.object = self.router.object
        self.api_usage: tuple[int, int] | None = None
        self.placed: dict[str, tuple[str, str]] = {}  # learner key -> (object, Id) written
        connection.on_response = self._observe

    def __repr__(self) -> str:
        return f"SalesforceAdapter(object={self.object!r}, {self.connection!r})"

    # -- transport -------------------------------------------------------------------------

    def _request(
        self, what: str, method: str, path: str, missing_ok: bool = False, **kwargs: Any
    ) -> Any:
        """One REST call: budget first, then the connection (login, one refresh, conversion);
        with ``missing_ok`` a 404 answers None."""
        if self.budget is not None:
            self.budget.acquire(1, timeout=60)

        def run(sf: Salesforce) -> Any:
            try:
                return sf.restful(path, method=method, **kwargs)
            except SalesforceResourceNotFound:
                if missing_ok:
                    return None
                raise

        try:
            result = self.connection.call(what, run)
        except RateLimited as exc:
            log.error(
                "SALESFORCE API QUOTA EXHAUSTED (%s): flushes parked for %.0f s",
                exc.reason,
                exc.wait,
            )
            if self.budget is not None:
                counters.incr(self.budget.conn, "crm_rate_limited", self.name, exc.policy)
                self.budget.pause_for(exc.wait or 0.0, exc.reason, exc.policy)
            raise
        return result

    def call(self, what: str, method: str, path: str, **kwargs: Any) -> Any:
        """``_request`` under the shared retry policy."""
        policy = retrying(attempts=self.attempts, sleep=self.sleep, label=f"salesforce {what}")
        return policy(self._request, what, method, path, **kwargs)

    def _observe(self, client: Any) -> None:
        """Read ``Sforce-Limit-Info`` (api-usage=N/M) and keep a reserve in the shared budget."""
        usage = (getattr(client, "api_usage", None) or {}).get("api-usage")
        if usage is None:
            return
        self.api_usage = (int(usage.used), int(usage.total))
        left = usage.total - usage.used - int(usage.total * LIMIT_RESERVE)
        log.debug("salesforce api-usage %d/%d", usage.used, usage.total)
        if self.budget is None:
            return
        if left <= 0:
            reason = f"Salesforce API usage {usage.used}/{usage.total}: reserve reached"
            log.error("SALESFORCE API QUOTA NEARLY EXHAUSTED (%s): flushes paused", reason)
            self.budget.pause_for(RESERVE_WAIT, reason, "api-usage")
        else:
            self.budget.observe_headers(None, left, None)

    # -- lookup (Router, salesforce_routing) -----------------------------------------------

    def located(self, learners: Sequence[ContactChange]) -> dict[str, tuple[str, str]]:
        """(object, Id) of each learner's existing record, by key: written in this flush, else
        found by the usual lookup (one query per object); learners without a record are left out.
        """
        unknown = [c for c in learners if c.key not in self.placed]
        for target in self.router.route(unknown) if unknown else []:
            if target.record_id:
                self.placed[target.key] = (target.sobject, target.record_id)
        return {c.key: self.placed[c.key] for c in learners if c.key in self.placed}

    # -- writes ----------------------------------------------------------------------------

    def upsert(self, changes: Sequence[ContactChange]) -> list[Outcome]:
        """Write a batch: one outcome per change (synced, rejected with a reason, or retry)."""
        targets = self.router.route(changes)
        outcomes = self.write(targets)
        for target in targets:
            outcome = outcomes[target.key]
            if outcome.status == "synced" and outcome.record_id:
                self.placed[target.key] = (target.sobject, outcome.record_id)
        return [outcomes[change.key] for change in changes]

    def write(self, targets: Sequence[Target]) -> dict[str, Outcome]:
        """Send targets, one request per object and kind (≤ 200 each); locked rows are resent
        twice. The outcome of each target, by key."""
        pending = list(targets)
        outcomes: dict[str, Outcome] = {}
        for attempt in range(LOCK_RETRIES + 1):
            locked: list[Target] = []
            for group in self._groups(pending):
                for target, result in zip(group, self._send(group), strict=True):
                    outcome = self._outcome(target, result)
                    outcomes[target.key] = outcome
                    if outcome.status == "retry":
                        locked.append(target)
            if not locked or attempt == LOCK_RETRIES:
                break
            log.info("salesforce: %d record(s) locked, retrying them", len(locked))
            self.sleep(1.0 + attempt)
            pending = locked
        return outcomes

    def _groups(self, targets: list[Target]) -> list[list[Target]]:
        """Targets grouped by request kind (object x update/create), ≤ 200 each."""
        groups: dict[tuple[str, str], list[Target]] = {}
        for target in targets:
            groups.setdefault((target.sobject, self._kind(target)), []).append(target)
        return [
            g[i : i + BATCH_SIZE] for g in groups.values() for i in range(0, len(g), BATCH_SIZE)
        ]

    @staticmethod
    def _kind(target: Target) -> str:
        """``update`` (by Id), ``upsert`` (by external id) or ``create``."""
        if target.record_id:
            return "update"
        return "upsert" if target.external else "create"

    def _send(self, group: list[Target]) -> list[dict[str, Any]]:
        """One sObject Collections request; the per-record results in input order."""
        sobject = group[0].sobject
        records = []
        for target in group:
            record: dict[str, Any] = {"attributes": {"type": sobject}, **target.fields}
            if target.record_id:
                record["Id"] = target.record_id
            records.append(record)
        body = {"allOrNone": False, "records": records}
        kind = self._kind(group[0])
        method, path = {
            "update": ("PATCH", "composite/sobjects"),
            "upsert": ("PATCH", f"composite/sobjects/{sobject}/{group[0].external}"),
            "create": ("POST", "composite/sobjects"),
        }[kind]
        what = f"{kind} {sobject}s"
        try:
            results = self.call(what, method, path, json=body)
        except PermanentError as exc:
            if exc.category == Category.VALIDATION:
                raise BatchRejected(exc.reason, Category.VALIDATION) from exc
            raise
        if not isinstance(results, list) or len(results) != len(group):
            raise BatchRejected(f"Salesforce {what}: unexpected response", Category.VALIDATION)
        return results

    def _outcome(self, target: Target, result: dict[str, Any]) -> Outcome:
        """The outcome of one record's result."""
        key = target.key
        if result.get("success"):
            return Outcome(key, "synced", record_id=result.get("id") or target.record_id)
        errors = result.get("errors") or [{}]
        codes = {str(e.get("statusCode", "")) for e in errors}
        reason = "; ".join(
            f"{e.get('statusCode', 'ERROR')}: {e.get('message', '')}".strip(": ") for e in errors
        )
        reason = f"{target.sobject} {target.record_id or '(new)'}: {reason}"
        if codes & RETRYABLE_CODES:
            return Outcome(key, "retry", reason)
        return Outcome(key, "rejected", reason, Category.VALIDATION)

    # -- describe --------------------------------------------------------------------------

    def fields_of(self, sobject: str) -> dict[str, PropertyInfo] | None:
        """One object's fields by API name (None when the org has no such object)."""
        path = f"sobjects/{sobject}/describe/"
        data = self.call(f"describe {sobject}", "GET", path, missing_ok=True)
        if data is None:
            return None
        return {
            str(f["name"]): PropertyInfo(
                str(f["name"]), str(f.get("type", "")), {"object": sobject}
            )
            for f in data.get("fields") or []
        }

    def learner_fields(self) -> dict[str, PropertyInfo]:
        """Fields on every learner object this mapping writes, under our property names too."""
        objects = ["Contact", "Lead"] if self.object == "auto" else [self.object]
        found = [self.fields_of(sobject) or {} for sobject in objects]
        common = set.intersection(*(set(fields) for fields in found))
        known = {name: found[0][name] for name in common}
        for prop in self.mapping.properties:
            if field_name(prop) in common:
                known[prop] = known[field_name(prop)]
        return known

    def _missing_learner_fields(self, known: dict[str, PropertyInfo]) -> list[str]:
        """Mapped properties not in ``known``, with their API names when those differ."""
        return sorted(
            f"{prop} ({field_name(prop)})" if field_name(prop) != prop else prop
            for prop in self.mapping.properties
            if prop not in known
        )

    def missing_fields(self) -> list[str]:
        """Mapped fields on Contact/Lead and play-record fields the org lacks, for operators."""
        plays = self.play_adapter()
        lacking = plays.missing_fields() if plays is not None else []
        return self._missing_learner_fields(self.learner_fields()) + lacking

    def play_adapter(self) -> SalesforcePlays | None:
        """Play records (``Instruqt_Play__c``) through this adapter, if the mapping has plays."""
        if self.mapping.plays is None:
            return None
        return SalesforcePlays(self)

    def describe(self) -> dict[str, PropertyInfo]:
        """The learner fields (``learner_fields``). The engine's start check compares only
        those, so a play object lacking fields raises PermanentError listing every missing one."""
        known = self.learner_fields()
        plays = self.play_adapter()
        lacking = plays.missing_fields() if plays is not None else []
        if lacking:
            missing = self._missing_learner_fields(known) + lacking
            raise PermanentError(
                f"the Salesforce org lacks {len(missing)} field(s): {', '.join(missing)}. "
                "Create them with: instruqt-crm setup salesforce",
                Category.VALIDATION,
            )
        return known


def salesforce_budget(conn: redis.Redis, requests_per_minute: int) -> RequestBudget:
    """The request budget all workers share for one Salesforce org."""
    return RequestBudget(conn, "salesforce", requests_per_minute, 60.0)
