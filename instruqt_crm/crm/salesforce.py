"""Salesforce adapter: Contact / Lead / auto routing, one lookup per object, sObject Collections.

Per batch: ``salesforce_routing`` finds each change's record (one SOQL query per object);
matched records are updated by Id, new ones are upserted by the external id (≤ 200 per
request, ``allOrNone: false``), with ``Sforce-Duplicate-Rule-Header: allowSave=true`` unless
SALESFORCE_ALLOW_DUPLICATE_SAVE is false (duplicate rules that only alert then save). Per-record
errors become outcomes (``salesforce_results``); whole-request failures become the engine's
errors. Play records (``Instruqt_Play__c``) go through the same writes: see
``salesforce_plays``. ``current_values`` reads the mapped fields of learners new to the ledger
with that lookup (``salesforce_reads``); the write that follows reuses what it found.
``describe`` is the worker's start check: it raises ``NotReady`` naming the mapped fields the
org lacks or hides from the user, and the access to Contacts and Leads the user lacks
(``salesforce_access``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceResourceNotFound

from instruqt_crm.errors import BatchRejected, Category, NotReady, PermanentError, RateLimited
from instruqt_crm.journal import counters
from instruqt_crm.mapping import Mapping
from instruqt_crm.ratelimit import RequestBudget
from instruqt_crm.retry import retrying

from .base import ContactChange, CurrentValues, Outcome, PropertyInfo
from .salesforce_access import FieldReport, access_problem, classify_fields
from .salesforce_auth import Connection
from .salesforce_plays import PLAY_OBJECT, REQUIRED_FIELDS, SalesforcePlays
from .salesforce_reads import record_values
from .salesforce_results import DUPLICATE_RULE_HEADER, outcome
from .salesforce_routing import BATCH_SIZE, Router, Target, field_name

log = logging.getLogger(__name__)
Described = dict[str, dict[str, PropertyInfo] | None]  # object -> its fields (None: unreadable)
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
        allow_duplicate_save: bool = True,
    ) -> None:
        self.connection = connection
        self.allow_duplicate_save = allow_duplicate_save
        self.mapping = mapping
        self.budget = budget
        self.attempts = attempts
        self.sleep = sleep
        self.router = Router(mapping, self.call, connection.creds.api_version)
        self.object = self.router.object
        self.api_usage: tuple[int, int] | None = None
        self.placed: dict[str, tuple[str, str]] = {}  # learner key -> (object, Id) written/found
        self.unplaced: set[str] = set()  # learner keys this flush's read found no record for
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
        """(object, Id) of each learner's existing record, by key: written or found in this
        flush, else found by the usual lookup (one query per object); learners without a record
        are left out."""
        unknown = [c for c in learners if c.key not in self.placed]
        found = self.router.lookup(unknown).records if unknown else {}
        self.placed.update({key: record.place for key, record in found.items() if record})
        return {c.key: self.placed[c.key] for c in learners if c.key in self.placed}

    def current_values(
        self, changes: Sequence[ContactChange], names: Sequence[str]
    ) -> CurrentValues:
        """The ``names`` properties of the Contact or Lead each change would update (None: no
        record), read by the lookup itself: one query per object, within the budget. What it
        found is kept for the write that follows, which then looks nothing up."""
        fields = {name: field_name(name) for name in names}
        lookup = self.router.lookup(changes, sorted(set(fields.values())))
        found: dict[str, dict[str, str] | None] = {}
        for key, record in lookup.records.items():
            if record is None:
                self.unplaced.add(key)
                found[key] = None
            else:
                self.placed[key] = record.place
                self.unplaced.discard(key)
                found[key] = record_values(record, fields, self.mapping)
        return CurrentValues(found, lookup.queries)

    # -- writes ----------------------------------------------------------------------------

    def upsert(self, changes: Sequence[ContactChange]) -> list[Outcome]:
        """Write a batch: one outcome per change (synced, rejected with a reason, or retry); a
        learner whose record this flush already found (or found missing) is not looked up."""
        known = {
            c.key: self.placed.get(c.key)
            for c in changes
            if c.key in self.placed or c.key in self.unplaced
        }
        targets = self.router.route(changes, known)
        outcomes = self.write(targets)
        for target in targets:
            outcome = outcomes[target.key]
            if outcome.status == "synced" and outcome.record_id:
                self.placed[target.key] = (target.sobject, outcome.record_id)
                self.unplaced.discard(target.key)
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
                    found = outcome(target, result, self.allow_duplicate_save)
                    outcomes[target.key] = found
                    if found.status == "retry":
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
        headers = {DUPLICATE_RULE_HEADER: "allowSave=true"} if self.allow_duplicate_save else {}
        try:
            results = self.call(what, method, path, json=body, headers=headers)
        except PermanentError as exc:
            if exc.category == Category.VALIDATION:
                raise BatchRejected(exc.reason, Category.VALIDATION) from exc
            raise
        if not isinstance(results, list) or len(results) != len(group):
            raise BatchRejected(f"Salesforce {what}: unexpected response", Category.VALIDATION)
        return results

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

    def described(self) -> Described:
        """The fields of every object this mapping writes (the learner objects, the play object),
        by object; None for an object the org lacks or the user may not read."""
        objects: list[str] = ["Contact", "Lead"] if self.object == "auto" else [self.object]
        if self.mapping.plays is not None:
            objects.append(PLAY_OBJECT)
        return {sobject: self.fields_of(sobject) for sobject in objects}

    def learner_fields(self, found: Described | None = None) -> dict[str, PropertyInfo]:
        """Fields on every learner object this mapping writes, under our property names too
        (``found``: ``described``, when already asked)."""
        found = self.described() if found is None else found
        learners = [fields or {} for sobject, fields in found.items() if sobject != PLAY_OBJECT]
        common = set.intersection(*(set(fields) for fields in learners))
        known = {name: learners[0][name] for name in common}
        for prop in self.mapping.properties:
            if field_name(prop) in common:
                known[prop] = known[field_name(prop)]
        return known

    def absent(self, found: Described) -> dict[str, dict[str, str]]:
        """The mapped fields describe does not show, by object: API name -> the name operators
        know (a property with its API name when they differ, ``Instruqt_Play__c.Track__c``)."""
        absent: dict[str, dict[str, str]] = {}
        for sobject, fields in found.items():
            if sobject == PLAY_OBJECT:
                wanted = {name: f"{PLAY_OBJECT}.{name}" for name in REQUIRED_FIELDS}
            else:
                wanted = {
                    field_name(p): f"{p} ({field_name(p)})" if field_name(p) != p else p
                    for p in sorted(self.mapping.properties)
                }
            lacking = {name: label for name, label in wanted.items() if name not in (fields or {})}
            if lacking:
                absent[sobject] = lacking
        return absent

    def missing_fields(self) -> list[str]:
        """Mapped fields on Contact/Lead (sorted) and play-record fields describe does not show."""
        labels = [
            label for names in self.absent(self.described()).values() for label in names.values()
        ]
        return list(dict.fromkeys(labels))

    def field_report(self, found: Described | None = None) -> FieldReport:
        """The fields describe does not show: missing in the org, or hidden from the user."""
        absent = self.absent(self.described() if found is None else found)
        return classify_fields(self.call, absent) if absent else FieldReport()

    def problems(self, found: Described | None = None) -> list[str]:
        """What keeps the sync from working, one line each with its fix: mapped fields missing
        or hidden, and access to Contacts and Leads the user lacks."""
        lines = self.field_report(found).lines()
        try:
            user = self.connection.running_user()
        except PermanentError as exc:
            return [*lines, f"Salesforce: cannot check the user's access: {exc.reason}"]
        access = access_problem(self.call, user, self.object)
        return [*lines, access] if access else lines

    def play_adapter(self) -> SalesforcePlays | None:
        """Play records (``Instruqt_Play__c``) through this adapter, if the mapping has plays."""
        if self.mapping.plays is None:
            return None
        return SalesforcePlays(self)

    def describe(self) -> dict[str, PropertyInfo]:
        """The learner fields (``learner_fields``) once the org is ready for the mapping (the
        worker's start check); NotReady naming every problem (``problems``) otherwise."""
        found = self.described()
        problems = self.problems(found)
        if problems:
            raise NotReady(" | ".join(problems))
        return self.learner_fields(found)


def salesforce_budget(conn: redis.Redis, requests_per_minute: int) -> RequestBudget:
    """The request budget all workers share for one Salesforce org."""
    return RequestBudget(conn, "salesforce", requests_per_minute, 60.0)
