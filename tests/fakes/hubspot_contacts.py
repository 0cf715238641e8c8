"""Contact records of the fake HubSpot: batch upsert, reads and paging with HubSpot's rules.

A batch upsert's answer is HubSpot's: results in no particular order (each carrying its
input's `objectWriteTraceId` when `echo_trace_ids`), and a 207's errors naming the failed
inputs by their trace id (`context: {"objectWriteTraceId": [...]}`) or, for an input sent
without one, by nothing (`context: {}`); never by the email. Two switches make the answers
HubSpot gives rarely: `errors_without_ids` (the next n errors name no input) and `lost`
(inputs left out of the answer, and unwritten, the next n times they are sent).

Not thread-safe on its own: `FakeHubSpot` calls it under its lock.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tests.fakes.hubspot_model import (
    DEFAULT_READ_PROPERTIES,
    ApiError,
    InvalidValue,
    error_body,
    invalid_values_error,
    is_email,
    iso_ms,
    normalize_value,
    utc_now,
    validation_error,
)

MAX_BATCH = 100
ALWAYS_RETURNED = ("createdate", "hs_object_id", "lastmodifieddate")


@dataclass
class _Plan:
    """What one upsert input will do, decided before anything is written."""

    index: int
    id_value: str
    record_id: str | None  # None: create
    changes: dict[str, str] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    trace: str | None = None  # the input's objectWriteTraceId


class _Conflict(Exception):
    """A unique value already held by another contact."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"Contact already exists. Existing ID: {holder}")
        self.holder = holder


class _NotFound(Exception):
    """An upsert by record id for a record that does not exist."""


class ContactStore:
    """Contacts keyed by record id, with an email index."""

    def __init__(
        self, properties: dict[str, dict[str, Any]], wall_clock: Callable[[], datetime] = utc_now
    ) -> None:
        self.properties = properties
        self.wall_clock = wall_clock  # stamps createdate / lastmodifieddate; tests may fake it
        self.records: dict[str, dict[str, str]] = {}
        self._by_email: dict[str, str] = {}
        self._next_id = 1001
        self.echo_trace_ids = True  # results carry their input's objectWriteTraceId
        self.errors_without_ids = 0  # the next n errors of a 207 name no input at all
        self.lost: dict[str, int] = {}  # id value -> upserts that leave it out of the answer
        self._order = random.Random(0)  # results come back in no particular order

    def now_iso(self) -> str:
        """The wall clock's time as HubSpot writes it."""
        return iso_ms(self.wall_clock())

    # ------------------------------------------------------------ lookups

    def snapshot(self) -> dict[str, dict[str, str]]:
        """Copies of all contacts, keyed by lower-cased email (or record id when none)."""
        return {rec.get("email") or rid: dict(rec) for rid, rec in self.records.items()}

    def find(self, prop: str, value: str) -> str | None:
        """The record id whose `prop` equals `value` (emails compare case-insensitively)."""
        if prop == "hs_object_id":
            return value if value in self.records else None
        if prop == "email":
            return self._by_email.get(value.strip().lower())
        return next((rid for rid, rec in self.records.items() if rec.get(prop) == value), None)

    def _unique_names(self) -> list[str]:
        return ["email"] + [
            n for n, d in self.properties.items() if d.get("hasUniqueValue") and n != "hs_object_id"
        ]

    # ------------------------------------------------------------ batch upsert

    def batch_upsert(self, body: Any) -> tuple[int, dict[str, Any]]:
        """`POST /crm/v3/objects/contacts/batch/upsert` (raises ApiError for whole-batch errors)."""
        started = self.now_iso()
        inputs = batch_inputs(body)
        for item in inputs:
            if not isinstance(item.get("id"), str) or not item["id"]:
                raise validation_error("Invalid input JSON: every input needs a string id")
            if not isinstance(item.get("properties"), dict):
                raise validation_error("Invalid input JSON: every input needs properties")
        self._check_names(inputs)
        email_mode = any(_id_property(i) == "email" for i in inputs)
        inputs = [item for item in inputs if not self._lose(item)]
        plans, failures = self._plan_all(inputs)
        if failures and email_mode:
            raise _whole_batch_error([f for _, f in failures])
        results = [self._apply(plan) for plan in plans]
        self._order.shuffle(results)
        response = _complete(results, started, self.now_iso())
        if not failures:
            return 200, response
        response["numErrors"] = len(failures)
        response["errors"] = [self._error(item, f) for item, f in failures]
        return 207, response

    def _lose(self, item: dict[str, Any]) -> bool:
        """True when this input is to be left out of the answer (and not written) this time."""
        id_property = _id_property(item)
        mine = _same_id(item["id"], id_property)
        for key, left in self.lost.items():
            if left and _same_id(key, id_property) == mine:
                self.lost[key] = left - 1
                return True
        return False

    def _error(self, item: dict[str, Any], failure: Exception) -> dict[str, Any]:
        """One entry of a 207's `errors`: naming the input by its trace id, if it has one."""
        trace = item.get("objectWriteTraceId")
        named = trace is not None and not self.errors_without_ids
        self.errors_without_ids = max(0, self.errors_without_ids - 1)
        return _standard_error({"objectWriteTraceId": [str(trace)]} if named else {}, failure)

    def _check_names(self, inputs: list[dict[str, Any]]) -> None:
        """Whole-batch checks: idProperty usable, property names defined, ids unique."""
        unknown: dict[str, InvalidValue] = {}
        for item in inputs:
            id_prop = _id_property(item)
            definition = self.properties.get(id_prop)
            if definition is None:
                unknown[id_prop] = _doesnt_exist(id_prop)
            elif id_prop not in ("email", "hs_object_id") and not definition.get("hasUniqueValue"):
                raise validation_error(
                    f'Property "{id_prop}" cannot be used as idProperty: only email, '
                    "hs_object_id and properties with hasUniqueValue=true identify a contact"
                )
            for name in item["properties"]:
                if name not in self.properties:
                    unknown.setdefault(name, _doesnt_exist(name))
        if unknown:
            raise invalid_values_error(list(unknown.values()))
        seen: set[tuple[str, str]] = set()
        duplicates: list[str] = []
        for item in inputs:
            id_prop = _id_property(item)
            key = (id_prop, item["id"].strip().lower() if id_prop == "email" else item["id"])
            if key in seen:
                duplicates.append(item["id"])
            seen.add(key)
        if duplicates:
            raise validation_error(
                f"Duplicate IDs found in batch input: {duplicates}. IDs must be unique"
            )

    def _plan_all(
        self, inputs: list[dict[str, Any]]
    ) -> tuple[list[_Plan], list[tuple[dict[str, Any], Exception]]]:
        """Plan every input; collect per-input failures instead of raising."""
        plans: list[_Plan] = []
        failures: list[tuple[dict[str, Any], Exception]] = []
        claimed: dict[tuple[str, str], str] = {}
        for index, item in enumerate(inputs):
            try:
                plan = self._plan(index, item)
                plan.trace = item.get("objectWriteTraceId")
                self._claim_unique(plan, claimed)
            except (_Conflict, _NotFound, _Invalid) as exc:
                failures.append((item, exc))
                continue
            plans.append(plan)
        return plans, failures

    def _plan(self, index: int, item: dict[str, Any]) -> _Plan:
        """Validate one input's id and values."""
        id_prop, id_value = _id_property(item), item["id"]
        problems: list[InvalidValue] = []
        changes: dict[str, str] = {}
        if id_prop == "email":
            id_value = id_value.strip()
            if not is_email(id_value):
                problems.append(
                    InvalidValue("email", "INVALID_EMAIL", f"Email address {id_value} is invalid")
                )
            id_value = id_value.lower()
        elif id_prop != "hs_object_id":
            try:
                id_value = normalize_value(self.properties[id_prop], id_value)
            except InvalidValue as exc:
                problems.append(exc)
        for name, raw in item["properties"].items():
            try:
                changes[name] = normalize_value(self.properties[name], raw)
            except InvalidValue as exc:
                problems.append(exc)
        if id_prop != "hs_object_id" and changes.get(id_prop, id_value) != id_value:
            problems.append(
                InvalidValue(
                    id_prop,
                    "ID_PROPERTY_MISMATCH",
                    f"{id_prop} in properties ({changes[id_prop]}) differs from the id "
                    f"({id_value})",
                )
            )
        if problems:
            raise _Invalid(problems)
        record_id = self.find(id_prop, id_value)
        if record_id is None and id_prop == "hs_object_id":
            raise _NotFound(f"Contact {id_value} does not exist")
        if id_prop != "hs_object_id":
            changes[id_prop] = id_value
        return _Plan(index, id_value, record_id, changes, list(item["properties"]))

    def _claim_unique(self, plan: _Plan, claimed: dict[tuple[str, str], str]) -> None:
        """Raise _Conflict if a unique value is held by another contact or an earlier input."""
        mine = plan.record_id or f"input-{plan.index}"
        for name in self._unique_names():
            value = plan.changes.get(name)
            if not value:
                continue
            key = (name, value.lower() if name == "email" else value)
            holder = self.find(name, value)
            if holder is not None and holder != plan.record_id:
                raise _Conflict(holder)
            if claimed.get(key, mine) != mine:
                raise _Conflict(claimed[key])
        for name in self._unique_names():
            value = plan.changes.get(name)
            if value:
                claimed[(name, value.lower() if name == "email" else value)] = mine

    def _apply(self, plan: _Plan) -> dict[str, Any]:
        """Write one planned upsert and return its `SimplePublicUpsertObject`."""
        stamp = self.now_iso()
        new = plan.record_id is None
        if plan.record_id is None:
            record_id = str(self._next_id)
            self._next_id += 1
            self.records[record_id] = {"hs_object_id": record_id, "createdate": stamp}
        else:
            record_id = plan.record_id
        record = self.records[record_id]
        old_email = record.get("email")
        for name, value in plan.changes.items():
            if value == "":
                record.pop(name, None)
            else:
                record[name] = value
        record["lastmodifieddate"] = stamp
        if old_email != record.get("email"):
            self._by_email.pop(old_email or "", None)
            if record.get("email"):
                self._by_email[record["email"]] = record_id
        names = {*plan.sent, *plan.changes, *ALWAYS_RETURNED}
        result = self.view(record_id, sorted(names))
        result["properties"].update({n: "" for n, v in plan.changes.items() if v == ""})
        result["new"] = new
        if plan.trace is not None and self.echo_trace_ids:
            result["objectWriteTraceId"] = plan.trace
        return result

    # ------------------------------------------------------------ reads

    def view(self, record_id: str, names: list[str] | tuple[str, ...]) -> dict[str, Any]:
        """A `SimplePublicObject` with the named properties (None when unset)."""
        record = self.records[record_id]
        wanted = dict.fromkeys([*names, *ALWAYS_RETURNED])
        return {
            "id": record_id,
            "properties": {n: record.get(n) for n in wanted},
            "createdAt": record["createdate"],
            "updatedAt": record["lastmodifieddate"],
            "archived": False,
        }

    def get(self, id_value: str, id_property: str | None, names: list[str]) -> dict[str, Any]:
        """`GET /crm/v3/objects/contacts/{id}`."""
        record_id = self.find(id_property or "hs_object_id", id_value)
        if record_id is None:
            raise ApiError(404, error_body("resource not found", "OBJECT_NOT_FOUND"))
        return self.view(record_id, names or DEFAULT_READ_PROPERTIES)

    def batch_read(self, body: Any) -> tuple[int, dict[str, Any]]:
        """`POST /crm/v3/objects/contacts/batch/read`: 207 lists ids that were not found."""
        started = self.now_iso()
        inputs = batch_inputs(body)
        id_prop = body.get("idProperty") or "hs_object_id"
        names = body.get("properties") or list(DEFAULT_READ_PROPERTIES)
        results, missing = [], []
        for item in inputs:
            record_id = self.find(id_prop, str(item.get("id", "")))
            if record_id is None:
                missing.append(str(item.get("id", "")))
            else:
                results.append(self.view(record_id, names))
        response = _complete(results, started, self.now_iso())
        if not missing:
            return 200, response
        response["numErrors"] = 1
        response["errors"] = [
            {
                "status": "error",
                "category": "OBJECT_NOT_FOUND",
                "message": "Could not get some CONTACT objects, they may be deleted or not exist. "
                "Check that ids are valid.",
                "context": {"ids": missing},
                "errors": [],
                "links": {},
            }
        ]
        return 207, response

    def page(self, limit: int, after: str | None, names: list[str]) -> dict[str, Any]:
        """`GET /crm/v3/objects/contacts` (ordered by record id; `after` is the next id)."""
        ids = sorted(self.records, key=int)
        if after:
            ids = [rid for rid in ids if int(rid) >= int(after)]
        chosen, rest = ids[:limit], ids[limit:]
        response: dict[str, Any] = {
            "results": [self.view(rid, names or DEFAULT_READ_PROPERTIES) for rid in chosen]
        }
        if rest:
            response["paging"] = {
                "next": {"after": rest[0], "link": f"/crm/v3/objects/contacts?after={rest[0]}"}
            }
        return response


class _Invalid(Exception):
    """Invalid values in one input."""

    def __init__(self, problems: list[InvalidValue]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


def batch_inputs(body: Any, limit: int = MAX_BATCH) -> list[dict[str, Any]]:
    """The `inputs` list of a batch body, 1..limit objects (raises ApiError)."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise validation_error("Invalid input JSON: expected an object with an inputs list")
    inputs = body["inputs"]
    if not inputs:
        raise validation_error("Batch inputs must not be empty")
    if len(inputs) > limit:
        raise validation_error(
            f"Too many inputs: {len(inputs)}. The maximum batch size is {limit}",
            context={"limit": [str(limit)]},
        )
    if not all(isinstance(i, dict) for i in inputs):
        raise validation_error("Invalid input JSON: every input must be an object")
    return inputs


def _id_property(item: dict[str, Any]) -> str:
    return str(item.get("idProperty") or "hs_object_id")


def _same_id(value: str, id_property: str) -> str:
    """An id value as HubSpot compares it (emails ignore case and outer spaces)."""
    return value.strip().lower() if id_property == "email" else value


def _doesnt_exist(name: str) -> InvalidValue:
    return InvalidValue(name, "PROPERTY_DOESNT_EXIST", f'Property "{name}" does not exist')


def _whole_batch_error(failures: list[Exception]) -> ApiError:
    """Email-keyed batches fail whole: 409 if a unique value clashes, else 400."""
    conflicts = [f for f in failures if isinstance(f, _Conflict)]
    if conflicts:
        return ApiError(409, error_body(str(conflicts[0]), "CONFLICT"))
    problems = [p for f in failures if isinstance(f, _Invalid) for p in f.problems]
    if not problems:
        return validation_error(str(failures[0]))
    return invalid_values_error(problems)


def _standard_error(context: dict[str, list[str]], failure: Exception) -> dict[str, Any]:
    """One entry of a 207's `errors` (the SDK's `StandardError`)."""
    category = {_Conflict: "CONFLICT", _NotFound: "OBJECT_NOT_FOUND"}.get(
        type(failure), "VALIDATION_ERROR"
    )
    details = (
        [
            {"message": p.message, "code": p.error, "context": {"propertyName": [p.name]}}
            for p in failure.problems
        ]
        if isinstance(failure, _Invalid)
        else []
    )
    message = (
        invalid_values_error(failure.problems).body["message"]  # type: ignore[index]
        if isinstance(failure, _Invalid)
        else str(failure)
    )
    return {
        "status": "error",
        "category": category,
        "message": message,
        "context": context,
        "errors": details,
        "links": {},
    }


def _complete(results: list[dict[str, Any]], started: str, completed: str) -> dict[str, Any]:
    """HubSpot's batch answer around ``results``."""
    return {
        "status": "COMPLETE",
        "results": results,
        "startedAt": started,
        "completedAt": completed,
    }
