"""A stateful fake Salesforce org behind `responses`: token, SOQL lookups, collections, describe.

Contact and Lead get custom fields from ``custom_fields`` (a test adds names) or from
``deploy(files)``, which installs the sfdx package ``instruqt-crm setup salesforce`` writes:
its custom objects (``Instruqt_Play__c``) and every field's type and constraints (External ID
and unique, number, restricted picklist, lookup). Writes are checked the way Salesforce checks
them: unknown objects and fields, the 200-record collection limit and non-numbers in number
fields refuse the whole request; a duplicate unique value, a lookup to a missing record, a bad
picklist value or a missing required field fail that record only.
"""

from __future__ import annotations

import itertools
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

import responses

URL = "https://fake.my.salesforce.com"
VERSION = "62.0"
DATA = f"{URL}/services/data/v{VERSION}"
STANDARD = {
    "Contact": ["Id", "Email", "LastName", "FirstName", "AccountId"],
    "Lead": [
        "Id",
        "Email",
        "LastName",
        "FirstName",
        "Company",
        "IsConverted",
        "ConvertedContactId",
    ],
}
CUSTOM_STANDARD = ["Id", "Name", "OwnerId", "CreatedDate"]  # every custom object has these
REQUIRED = {"Contact": ["LastName"], "Lead": ["LastName", "Company"]}
PREFIXES = {"Contact": "003", "Lead": "00Q"}
COLLECTION_LIMIT = 200
NS = {"m": "http://soap.sforce.com/2006/04/metadata"}
Reply = tuple[int, dict[str, str], str]


@dataclass
class Call:
    """One request the fake answered."""

    method: str
    path: str
    body: Any
    status: int


@dataclass(frozen=True)
class FieldDef:
    """A deployed custom field: its type and the constraints Salesforce enforces."""

    name: str
    type: str = "Text"
    unique: bool = False
    external_id: bool = False
    reference_to: str | None = None
    values: tuple[str, ...] = ()  # a restricted picklist's values


def field_def(content: bytes) -> FieldDef:
    """A FieldDef from a ``.field-meta.xml`` file."""
    root = ET.fromstring(content)

    def flag(tag: str) -> bool:
        return root.findtext(f"m:{tag}", namespaces=NS) == "true"

    restricted = root.findtext("m:valueSet/m:restricted", namespaces=NS) == "true"
    values = root.findall("m:valueSet/m:valueSetDefinition/m:value/m:fullName", NS)
    return FieldDef(
        name=str(root.findtext("m:fullName", namespaces=NS)),
        type=str(root.findtext("m:type", namespaces=NS)),
        unique=flag("unique"),
        external_id=flag("externalId"),
        reference_to=root.findtext("m:referenceTo", namespaces=NS),
        values=tuple(str(v.text) for v in values) if restricted else (),
    )


def _error(code: str, message: str) -> dict[str, Any]:
    return {"success": False, "errors": [{"statusCode": code, "message": message, "fields": []}]}


class Refused(Exception):
    """The whole request is refused (400 with Salesforce's error list)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.body = [{"errorCode": code, "message": message}]


@dataclass
class FakeSalesforce:
    """An org with Contacts and Leads; install with ``with FakeSalesforce() as fake:``."""

    custom_fields: set[str] = field(default_factory=set)  # on Contact and Lead
    custom_objects: dict[str, dict[str, FieldDef]] = field(default_factory=dict)
    definitions: dict[tuple[str, str], FieldDef] = field(default_factory=dict)  # deployed ones
    records: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {"Contact": {}, "Lead": {}}
    )
    calls: list[Call] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    grants: list[dict[str, list[str]]] = field(default_factory=list)
    record_errors: dict[str, list[str]] = field(default_factory=dict)  # email/ext id -> codes
    unavailable: int = 0  # answer this many data requests with 503
    limit_exceeded: bool = False
    api_used: int = 0
    api_total: int = 15000
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def __enter__(self) -> FakeSalesforce:
        self.mock = responses.RequestsMock(assert_all_requests_are_fired=False)
        self.mock.start()
        self.mock.add_callback(responses.POST, f"{URL}/services/oauth2/token", callback=self._token)
        for method in ("GET", "POST", "PATCH"):
            self.mock.add_callback(method, re.compile(re.escape(DATA) + r"/.*"), self._data)
        return self

    def __exit__(self, *exc: object) -> None:
        self.mock.stop()
        self.mock.reset()

    # -- helpers for tests ---------------------------------------------------------------

    def deploy(self, files: dict[str, bytes]) -> None:
        """Install an sfdx package (``salesforce_setup.package``): custom objects and fields."""
        for path in files:
            if match := re.search(r"/objects/(\w+)/\1\.object-meta\.xml$", path):
                self.custom_objects.setdefault(match.group(1), {})
                self.records.setdefault(match.group(1), {})
        for path, content in files.items():
            if match := re.search(r"/objects/(\w+)/fields/\w+\.field-meta\.xml$", path):
                sobject, definition = match.group(1), field_def(content)
                self.definitions[sobject, definition.name] = definition
                if sobject in STANDARD:
                    self.custom_fields.add(definition.name)
                else:
                    self.custom_objects[sobject][definition.name] = definition

    def add(self, sobject: str, **fields: Any) -> str:
        """Create a record directly; its Id."""
        record_id = f"{PREFIXES.get(sobject, 'a0P')}{next(self._ids):015d}"
        self.records[sobject][record_id] = {"Id": record_id, **fields}
        return record_id

    def add_converted_lead(self, email: str, contact_id: str) -> str:
        """A Lead with this Email already converted into the given Contact; its Id."""
        return self.add(
            "Lead",
            Email=email,
            LastName="L",
            Company="A",
            IsConverted=True,
            ConvertedContactId=contact_id,
        )

    def issue_token(self) -> str:
        """A valid access token (as if from a session flow)."""
        token = f"00Dfake!token{len(self.tokens_issued) + 1}"
        self.tokens_issued.append(token)
        self.valid_tokens.add(token)
        return token

    def by_email(self, sobject: str) -> dict[str, dict[str, Any]]:
        """Records of an object by lower-cased email."""
        return {str(r.get("Email", "")).lower(): r for r in self.records[sobject].values()}

    def by_field(self, sobject: str, name: str) -> dict[str, dict[str, Any]]:
        """Records of an object by the value of one field."""
        return {str(r.get(name)): r for r in self.records[sobject].values()}

    def data_calls(self, method: str | None = None, contains: str = "") -> list[Call]:
        return [
            c for c in self.calls if (method is None or c.method == method) and contains in c.path
        ]

    def fields_of(self, sobject: str) -> list[str] | None:
        """Every field of an object (None: no such object)."""
        if sobject in STANDARD:
            return STANDARD[sobject] + sorted(self.custom_fields)
        if sobject in self.custom_objects:
            return CUSTOM_STANDARD + sorted(self.custom_objects[sobject])
        return None

    # -- endpoints -----------------------------------------------------------------------

    def _token(self, request: Any) -> Reply:
        form = parse_qs(request.body if isinstance(request.body, str) else request.body.decode())
        self.grants.append(form)
        grant = form.get("grant_type", [""])[0]
        if grant == "client_credentials" and form.get("client_secret") != ["s3cret"]:
            return (
                400,
                {},
                json.dumps(
                    {"error": "invalid_client", "error_description": "invalid client credentials"}
                ),
            )
        if grant not in ("client_credentials", "urn:ietf:params:oauth:grant-type:jwt-bearer"):
            return 400, {}, json.dumps({"error": "unsupported_grant_type"})
        token = self.issue_token()
        return 200, {}, json.dumps({"access_token": token, "instance_url": URL})

    def _data(self, request: Any) -> Reply:
        parsed = urlparse(request.url)
        path = parsed.path.split(f"/v{VERSION}/", 1)[1]
        body = json.loads(request.body) if request.body else None
        try:
            status, payload = self._answer(request, path, parse_qs(parsed.query), body)
        except Refused as exc:
            status, payload = 400, exc.body
        self.calls.append(Call(request.method, path, body, status))
        self.api_used += 1
        headers = {"Sforce-Limit-Info": f"api-usage={self.api_used}/{self.api_total}"}
        return status, headers, json.dumps(payload)

    def _answer(self, request: Any, path: str, query: dict, body: Any) -> tuple[int, Any]:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.valid_tokens:
            return 401, [{"errorCode": "INVALID_SESSION_ID", "message": "Session expired"}]
        if self.limit_exceeded:
            return 403, [{"errorCode": "REQUEST_LIMIT_EXCEEDED", "message": "TotalRequests Limit"}]
        if self.unavailable:
            self.unavailable -= 1
            return 503, [{"errorCode": "SERVER_UNAVAILABLE", "message": "try later"}]
        if path.startswith("query"):
            return 200, self._query(query["q"][0])
        if match := re.fullmatch(r"sobjects/(\w+)/describe/?", path):
            names = self.fields_of(match.group(1))
            if names is None:
                message = "The requested resource does not exist"
                return 404, [{"errorCode": "NOT_FOUND", "message": message}]
            fields = [{"name": n, "type": "string"} for n in names]
            return 200, {"name": match.group(1), "fields": fields}
        if path.startswith("composite/sobjects"):
            parts = path.split("/")
            external = parts[3] if len(parts) == 4 else None
            self._check_request(body["records"], parts[2] if external else None, external)
            return 200, [self._write(r, external) for r in body["records"]]
        return 404, [{"errorCode": "NOT_FOUND", "message": path}]

    def _check_request(
        self, records: list[dict], sobject: str | None, external: str | None
    ) -> None:
        """Refuse the whole request as Salesforce does (Refused)."""
        if len(records) > COLLECTION_LIMIT:
            message = "record limit reached. cannot submit more than 200 records into this call"
            raise Refused("EXCEEDED_ID_LIMIT", message)
        for record in records:
            kind = record["attributes"]["type"]
            known = self.fields_of(kind)
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

    def _query(self, soql: str) -> dict[str, Any]:
        sobject = re.search(r"FROM (\w+)", soql).group(1)  # type: ignore[union-attr]
        found = []
        for field_name, values in re.findall(r"(\w+) IN \(([^)]*)\)", soql):
            wanted = {v.lower() for v in re.findall(r"'((?:[^'\\]|\\.)*)'", values)}
            found += [
                r
                for r in self.records[sobject].values()
                if str(r.get(field_name, "")).lower() in wanted and r not in found
            ]
        return {"totalSize": len(found), "done": True, "records": [dict(r) for r in found]}

    def _write(self, record: dict[str, Any], external: str | None) -> dict[str, Any]:
        sobject = record["attributes"]["type"]
        fields = {k: v for k, v in record.items() if k not in ("attributes", "Id")}
        for key in self._error_keys(sobject, record):
            if self.record_errors.get(key):
                code = self.record_errors[key].pop(0)
                return _error(code, f"{code} here")
        target = record.get("Id")
        if external is not None:
            if not fields.get(external):
                return _error("MISSING_ARGUMENT", f"{external} not specified")
            wanted = str(fields[external]).lower()  # External IDs match case-insensitively
            target = next(
                (
                    i
                    for i, r in self.records[sobject].items()
                    if str(r.get(external, "")).lower() == wanted
                ),
                None,
            )
        existing = self.records[sobject].get(target) if target is not None else None
        if target is not None and existing is None:
            return _error("ENTITY_IS_DELETED", "entity is deleted")
        if existing is not None and existing.get("IsConverted"):
            return _error("CANNOT_UPDATE_CONVERTED_LEAD", "cannot reference converted lead")
        problem = self._field_problem(sobject, target, fields)
        if problem is not None:
            return problem
        if existing is not None:
            existing.update(fields)
            return {"id": target, "success": True, "errors": [], "created": False}
        missing = [f for f in REQUIRED.get(sobject, []) if not fields.get(f)]
        if missing:
            return _error("REQUIRED_FIELD_MISSING", f"Required fields are missing: {missing}")
        if sobject in self.custom_objects:
            fields.setdefault("Name", f"{sobject[:4].upper()}-{len(self.records[sobject]) + 1:06d}")
        return {"id": self.add(sobject, **fields), "success": True, "errors": [], "created": True}

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
                    return _error("DUPLICATE_VALUE", message)
            if definition.values and value not in definition.values:
                message = f"bad value for restricted picklist field: {value}"
                return _error("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", message)
            parent = definition.reference_to
            if parent is not None and value not in self.records.get(parent, {}):
                elsewhere = any(value in records for records in self.records.values())
                if elsewhere:
                    message = f"{parent} ID: id value of incorrect type: {value}"
                    return _error("FIELD_INTEGRITY_EXCEPTION", message)
                return _error("INVALID_CROSS_REFERENCE_KEY", f"invalid cross reference id: {value}")
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
