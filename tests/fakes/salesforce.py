"""A stateful fake Salesforce org behind `responses`: token, SOQL lookups, collections, describe."""

from __future__ import annotations

import itertools
import json
import re
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
REQUIRED = {"Contact": ["LastName"], "Lead": ["LastName", "Company"]}
Reply = tuple[int, dict[str, str], str]


@dataclass
class Call:
    """One request the fake answered."""

    method: str
    path: str
    body: Any
    status: int


@dataclass
class FakeSalesforce:
    """An org with Contacts and Leads; install with ``with FakeSalesforce() as fake:``."""

    custom_fields: set[str] = field(default_factory=set)
    records: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {"Contact": {}, "Lead": {}}
    )
    calls: list[Call] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    grants: list[dict[str, list[str]]] = field(default_factory=list)
    record_errors: dict[str, list[str]] = field(default_factory=dict)  # email -> codes, one per try
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

    def add(self, sobject: str, **fields: Any) -> str:
        """Create a record directly; its Id."""
        prefix = {"Contact": "003", "Lead": "00Q"}[sobject]
        record_id = f"{prefix}{next(self._ids):015d}"
        self.records[sobject][record_id] = {"Id": record_id, **fields}
        return record_id

    def issue_token(self) -> str:
        """A valid access token (as if from a session flow)."""
        token = f"00Dfake!token{len(self.tokens_issued) + 1}"
        self.tokens_issued.append(token)
        self.valid_tokens.add(token)
        return token

    def by_email(self, sobject: str) -> dict[str, dict[str, Any]]:
        """Records of an object by lower-cased email."""
        return {str(r.get("Email", "")).lower(): r for r in self.records[sobject].values()}

    def data_calls(self, method: str | None = None, contains: str = "") -> list[Call]:
        return [
            c for c in self.calls if (method is None or c.method == method) and contains in c.path
        ]

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
        status, payload = self._answer(request, path, parse_qs(parsed.query), body)
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
            names = STANDARD[match.group(1)] + sorted(self.custom_fields)
            return 200, {
                "name": match.group(1),
                "fields": [{"name": n, "type": "string"} for n in names],
            }
        if path.startswith("composite/sobjects"):
            unknown = sorted(
                {k for r in body["records"] for k in r if k not in ("attributes", "Id")}
                - set(STANDARD["Lead"])
                - set(STANDARD["Contact"])
                - self.custom_fields
            )
            if unknown:
                return 400, [
                    {"errorCode": "INVALID_FIELD", "message": f"No such column '{unknown[0]}'"}
                ]
            parts = path.split("/")
            external = parts[3] if len(parts) == 4 else None
            return 200, [self._write(r, request.method, external) for r in body["records"]]
        return 404, [{"errorCode": "NOT_FOUND", "message": path}]

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

    def _write(self, record: dict[str, Any], method: str, external: str | None) -> dict[str, Any]:
        sobject = record["attributes"]["type"]
        fields = {k: v for k, v in record.items() if k not in ("attributes", "Id")}
        email = str(fields.get("Email") or self._email_of(sobject, record.get("Id"))).lower()
        if self.record_errors.get(email):
            code = self.record_errors[email].pop(0)
            return {"success": False, "errors": [{"statusCode": code, "message": f"{code} here"}]}
        target = record.get("Id")
        if external is not None:
            target = next(
                (
                    i
                    for i, r in self.records[sobject].items()
                    if r.get(external) == fields[external]
                ),
                None,
            )
        if target is not None:
            existing = self.records[sobject].get(target)
            if existing is None:
                return _error("ENTITY_IS_DELETED", "entity is deleted")
            if existing.get("IsConverted"):
                return _error("CANNOT_UPDATE_CONVERTED_LEAD", "cannot reference converted lead")
            existing.update(fields)
            return {"id": target, "success": True, "errors": [], "created": False}
        missing = [f for f in REQUIRED[sobject] if not fields.get(f)]
        if missing:
            return _error("REQUIRED_FIELD_MISSING", f"Required fields are missing: {missing}")
        return {"id": self.add(sobject, **fields), "success": True, "errors": [], "created": True}

    def _email_of(self, sobject: str, record_id: str | None) -> str:
        return str(self.records[sobject].get(record_id or "", {}).get("Email", ""))


def _error(code: str, message: str) -> dict[str, Any]:
    return {"success": False, "errors": [{"statusCode": code, "message": message, "fields": []}]}
