"""The fake org's sObject Collections writes, checked the way Salesforce checks them.

``POST composite/sobjects`` creates (a record with an ``Id`` fails: INVALID_FIELD_FOR_INSERT_
UPDATE), ``PATCH composite/sobjects`` updates by ``Id`` (a record without one fails:
MISSING_ARGUMENT), ``PATCH composite/sobjects/{Object}/{ExternalIdField}`` upserts (other
methods there: 405). Unknown objects and fields (hidden ones included), more than 200 records
and non-numbers in number fields refuse the whole request; a duplicate unique value, a lookup
to a missing record, a bad picklist value, a missing required field, a record the user may not
see or change, or a duplicate rule fail that record only. ``allOrNone: true`` rolls every
change of the request back when one record fails: that record keeps its error, every other
one answers ALL_OR_NONE_OPERATION_ROLLED_BACK. A duplicate rule refuses a matching save with
DUPLICATES_DETECTED (its ``duplicateResult`` names the rule and the matches) unless the rule
only alerts and the request carries ``Sforce-Duplicate-Rule-Header: allowSave=true``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

COLLECTION_LIMIT = 200
REQUIRED = {"Contact": ["LastName"], "Lead": ["LastName", "Company"]}
ROLLED_BACK = (
    "Record rolled back because not all records were valid and the request was using "
    "AllOrNone header"
)
DUPLICATE_MESSAGE = "Use one of these records?"


def record_error(code: str, message: str, fields: list[str] | None = None) -> dict[str, Any]:
    """A failed record's result."""
    error = {"statusCode": code, "message": message, "fields": fields or []}
    return {"id": None, "success": False, "errors": [error]}


class Refused(Exception):
    """The whole request is refused (``status`` with Salesforce's error list)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.body = [{"errorCode": code, "message": message}]


@dataclass(frozen=True)
class DuplicateRule:
    """A duplicate rule on one object: records whose ``fields`` all match (ignoring case) are
    duplicates; ``block`` refuses the save, otherwise it only alerts."""

    name: str
    fields: tuple[str, ...] = ("Email",)
    block: bool = False
    matching_rule: str = "Standard_Lead_Match_Rule_v1_0"


def allows_save(header: str | None) -> bool:
    """Whether ``Sforce-Duplicate-Rule-Header`` says ``allowSave=true``."""
    pairs = (part.strip().partition("=") for part in (header or "").split(";"))
    return any(key.strip() == "allowSave" and value.strip() == "true" for key, _, value in pairs)


class CollectionWrites:
    """The write side of ``FakeSalesforce``, which holds this state and provides ``add`` and
    ``fields_of``."""

    records: dict[str, dict[str, dict[str, Any]]]
    definitions: dict[tuple[str, str], Any]
    duplicate_rules: dict[str, DuplicateRule]
    record_errors: dict[str, list[str]]
    access: Any

    def collection(
        self, method: str, path: str, body: dict[str, Any], user: str, header: str | None
    ) -> list[dict[str, Any]]:
        """One sObject Collections request: the per-record results in input order."""
        parts = path.strip("/").split("/")
        external = parts[3] if len(parts) == 4 else None
        if external is not None and method != "PATCH":
            message = f"HTTP Method '{method}' not allowed. Allowed are PATCH"
            raise Refused("METHOD_NOT_ALLOWED", message, 405)
        kind = "upsert" if external else {"POST": "create", "PATCH": "update"}[method]
        records = body["records"]
        self._check_request(records, parts[2] if external else None, external, user)
        before = copy.deepcopy(self.records)
        results = [self._write(r, kind, external, user, allows_save(header)) for r in records]
        if body.get("allOrNone") and not all(r["success"] for r in results):
            self.records.clear()
            self.records.update(before)
            results = [
                r
                if not r["success"]
                else record_error("ALL_OR_NONE_OPERATION_ROLLED_BACK", ROLLED_BACK)
                for r in results
            ]
        return results

    def _check_request(
        self, records: list[dict], sobject: str | None, external: str | None, user: str
    ) -> None:
        """Refuse the whole request as Salesforce does (Refused)."""
        if len(records) > COLLECTION_LIMIT:
            message = "record limit reached. cannot submit more than 200 records into this call"
            raise Refused("EXCEEDED_ID_LIMIT", message)
        for record in records:
            kind = record["attributes"]["type"]
            known = self.fields_of(kind, user)
            if known is None or (sobject is not None and kind != sobject):
                raise Refused("INVALID_TYPE", f"sObject type '{kind}' is not supported")
            unknown = sorted(set(record) - {"attributes", *known})
            if unknown:
                raise Refused("INVALID_FIELD", f"No such column '{unknown[0]}' on entity '{kind}'")
            for name, value in record.items():
                definition = self.definitions.get((kind, name))
                if definition and definition.type == "Number" and isinstance(value, str):
                    message = f"Cannot deserialize instance of double from VALUE_STRING {value!r}"
                    raise Refused("JSON_PARSER_ERROR", message)
        definition = self.definitions.get((str(sobject), str(external)))
        if external is not None and definition is not None and not definition.external_id:
            message = f"Field name provided, {external} is not an External ID or indexed field"
            raise Refused("INVALID_FIELD", message)

    def _write(
        self, record: dict[str, Any], kind: str, external: str | None, user: str, allow: bool
    ) -> dict[str, Any]:
        """One record of a collection: its result."""
        sobject = record["attributes"]["type"]
        fields = {k: v for k, v in record.items() if k not in ("attributes", "Id")}
        for key in self._error_keys(sobject, record):
            if self.record_errors.get(key):
                code = self.record_errors[key].pop(0)
                return record_error(code, f"{code} here")
        if kind == "create" and record.get("Id"):
            return record_error(
                "INVALID_FIELD_FOR_INSERT_UPDATE", "cannot specify Id in an insert call", ["Id"]
            )
        if kind == "update" and not record.get("Id"):
            return record_error("MISSING_ARGUMENT", "Id not specified in an update call")
        target = self._target(sobject, record, fields, kind, external, user)
        if isinstance(target, dict):
            return target
        existing = self.records[sobject].get(target) if target is not None else None
        if existing is not None and existing.get("IsConverted"):
            return record_error("CANNOT_UPDATE_CONVERTED_LEAD", "cannot reference converted lead")
        problem = self._field_problem(sobject, target, fields) or self._duplicate(
            sobject, target, {**(existing or {}), **fields}, allow
        )
        if problem is not None:
            return problem
        if existing is not None:
            existing.update(fields)
            return {"id": target, "success": True, "errors": [], "created": False}
        missing = [f for f in REQUIRED.get(sobject, []) if not fields.get(f)]
        if missing:
            return record_error("REQUIRED_FIELD_MISSING", f"Required fields are missing: {missing}")
        if sobject not in REQUIRED:
            fields.setdefault("Name", f"{sobject[:4].upper()}-{len(self.records[sobject]) + 1:06d}")
        record_id = self.add(sobject, OwnerId=user, **fields)
        return {"id": record_id, "success": True, "errors": [], "created": True}

    def _target(
        self,
        sobject: str,
        record: dict[str, Any],
        fields: dict[str, Any],
        kind: str,
        external: str | None,
        user: str,
    ) -> str | dict[str, Any] | None:
        """The Id a record updates (None: a new record), or the failed result."""
        target = record.get("Id") if kind == "update" else None
        if external is not None:
            if not fields.get(external):
                return record_error("MISSING_ARGUMENT", f"{external} not specified")
            wanted = str(fields[external]).lower()  # External IDs match case-insensitively
            target = next(
                (
                    i
                    for i, r in self.records[sobject].items()
                    if str(r.get(external, "")).lower() == wanted
                    and self.access.sees(user, sobject, r)  # upsert matches what the user sees
                ),
                None,
            )
        if target is None:
            return None
        existing = self.records[sobject].get(target)
        if existing is None:
            return record_error("ENTITY_IS_DELETED", "entity is deleted")
        if not self.access.edits(user, sobject, existing):
            message = "insufficient access rights on object id"
            return record_error("INSUFFICIENT_ACCESS_OR_READONLY", message)
        return target

    def _duplicate(
        self, sobject: str, target: str | None, merged: dict[str, Any], allow: bool
    ) -> dict[str, Any] | None:
        """DUPLICATES_DETECTED when a duplicate rule matches (system sharing: every record)."""
        rule = self.duplicate_rules.get(sobject)
        if rule is None or not all(merged.get(f) for f in rule.fields):
            return None
        key = [str(merged[f]).lower() for f in rule.fields]
        matches = [
            i
            for i, r in self.records[sobject].items()
            if i != target and [str(r.get(f) or "").lower() for f in rule.fields] == key
        ]
        if not matches or (allow and not rule.block):
            return None
        found = record_error("DUPLICATES_DETECTED", DUPLICATE_MESSAGE)
        found["errors"][0]["duplicateResult"] = {
            "allowSave": not rule.block,
            "duplicateRule": rule.name,
            "duplicateRuleEntityType": sobject,
            "errorMessage": DUPLICATE_MESSAGE,
            "matchResults": [
                {
                    "entityType": sobject,
                    "errors": [],
                    "matchEngine": "ExactMatchEngine",
                    "matchRecords": [
                        {
                            "additionalInformation": [],
                            "fieldDiffs": [],
                            "matchConfidence": 100.0,
                            "record": {"attributes": {"type": sobject}, "Id": i},
                        }
                        for i in matches
                    ],
                    "rule": rule.matching_rule,
                    "size": len(matches),
                    "success": True,
                }
            ],
        }
        return found

    def _field_problem(
        self, sobject: str, target: str | None, fields: dict[str, Any]
    ) -> dict[str, Any] | None:
        """A per-record error for a duplicate unique value, a bad lookup or picklist value."""
        for name, value in fields.items():
            definition = self.definitions.get((sobject, name))
            if definition is None or value in (None, ""):
                continue
            if definition.unique:
                clash = next(
                    (
                        i
                        for i, r in self.records[sobject].items()
                        if i != target and str(r.get(name, "")).lower() == str(value).lower()
                    ),
                    None,
                )
                if clash is not None:
                    message = (
                        f"duplicate value found: {name} duplicates value on record with id: {clash}"
                    )
                    return record_error("DUPLICATE_VALUE", message)
            if definition.values and value not in definition.values:
                message = f"bad value for restricted picklist field: {value}"
                return record_error("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", message)
            parent = definition.reference_to
            if parent is not None and value not in self.records.get(parent, {}):
                elsewhere = any(value in records for records in self.records.values())
                if elsewhere:
                    message = f"{parent} ID: id value of incorrect type: {value}"
                    return record_error("FIELD_INTEGRITY_EXCEPTION", message)
                return record_error(
                    "INVALID_CROSS_REFERENCE_KEY", f"invalid cross reference id: {value}"
                )
        return None

    def _error_keys(self, sobject: str, record: dict[str, Any]) -> list[str]:
        """The record_errors keys of a record: its email, and its External ID values."""
        stored = self.records[sobject].get(record.get("Id") or "", {})
        keys = [str(record.get("Email") or stored.get("Email", "")).lower()]
        keys += [
            str(value)
            for name, value in record.items()
            if (d := self.definitions.get((sobject, name))) is not None and d.external_id
        ]
        return [key for key in keys if key]
