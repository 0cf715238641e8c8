"""A stateful fake Salesforce org behind `responses`: token, userinfo, SOQL lookups, the Tooling
API's FieldDefinition, collections, describe, permission set assignments.

Contact and Lead get custom fields from ``custom_fields`` (a test adds names, visible to every
user) or from ``deploy(files)``, which installs the sfdx package ``instruqt-crm setup
salesforce`` writes: its custom objects (``Instruqt_Play__c``), every field's type and
constraints (External ID and unique, number, restricted picklist, lookup) and the permission
set; deployed fields are hidden from users the permission set is not assigned to. Every token
belongs to a user (``salesforce_org``: the sync user unless said otherwise), whose profile and
permission sets decide what it sees: sharing, object permissions, field-level security.
Queries are answered as ``salesforce_soql`` describes, writes checked as ``salesforce_writes``
does.
"""

from __future__ import annotations

import itertools
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
import responses

from .salesforce_org import ADMIN, INTEGRATION, ORG_ID, Access, SoqlRefused
from .salesforce_soql import SoqlQueries
from .salesforce_writes import CollectionWrites, DuplicateRule, Refused

URL = "https://fake.my.salesforce.com"
VERSION = "62.0"
DATA = f"{URL}/services/data/v{VERSION}"
STANDARD = {
    "Contact": ["Id", "OwnerId", "Email", "LastName", "FirstName", "AccountId"],
    "Lead": [
        "Id",
        "OwnerId",
        "Email",
        "LastName",
        "FirstName",
        "Company",
        "IsConverted",
        "ConvertedContactId",
    ],
}
CUSTOM_STANDARD = ["Id", "Name", "OwnerId", "CreatedDate"]  # every custom object has these
PREFIXES = {"Contact": "003", "Lead": "00Q"}
NS = {"m": "http://soap.sforce.com/2006/04/metadata"}
PERMISSION_SET_FILE = re.compile(r"/permissionsets/(\w+)\.permissionset-meta\.xml$")
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


@dataclass
class FakeSalesforce(CollectionWrites, SoqlQueries):
    """An org with Contacts and Leads; install with ``with FakeSalesforce() as fake:``."""

    custom_fields: set[str] = field(default_factory=set)  # on Contact and Lead
    custom_objects: dict[str, dict[str, FieldDef]] = field(default_factory=dict)
    definitions: dict[tuple[str, str], FieldDef] = field(default_factory=dict)  # deployed ones
    records: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {"Contact": {}, "Lead": {}}
    )
    calls: list[Call] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)  # every SOQL on its records
    tokens_issued: list[str] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    token_users: dict[str, str] = field(default_factory=dict)  # token -> user Id
    grants: list[dict[str, list[str]]] = field(default_factory=list)
    access: Access = field(default_factory=Access)
    duplicate_rules: dict[str, DuplicateRule] = field(default_factory=dict)  # by object
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
        self.mock.add_callback(
            responses.GET,
            f"{URL}/services/oauth2/userinfo",
            callback=self._userinfo,
            content_type="application/json",
        )
        for method in ("GET", "POST", "PATCH"):
            self.mock.add_callback(method, re.compile(re.escape(DATA) + r"/.*"), self._data)
        return self

    def __exit__(self, *exc: object) -> None:
        self.mock.stop()
        self.mock.reset()

    # -- helpers for tests ---------------------------------------------------------------

    def deploy(self, files: dict[str, bytes], assign_to: str | None = INTEGRATION) -> None:
        """Install an sfdx package (``salesforce_setup.package``): custom objects, fields (hidden
        from users without a permission set granting them) and the permission set, assigned to
        ``assign_to`` as the admin's checklist says (None: not assigned)."""
        for path in files:
            if match := re.search(r"/objects/(\w+)/\1\.object-meta\.xml$", path):
                self.custom_objects.setdefault(match.group(1), {})
                self.records.setdefault(match.group(1), {})
        for path, content in files.items():
            if match := re.search(r"/objects/(\w+)/fields/\w+\.field-meta\.xml$", path):
                sobject, definition = match.group(1), field_def(content)
                self.definitions[sobject, definition.name] = definition
                self.access.restricted.add((sobject, definition.name))
                if sobject in STANDARD:
                    self.custom_fields.add(definition.name)
                else:
                    self.custom_objects[sobject][definition.name] = definition
        for path, content in files.items():
            if match := PERMISSION_SET_FILE.search(path):
                set_id = self.access.install(match.group(1), content)
                if assign_to is not None:
                    self.access.assign(ADMIN, {"AssigneeId": assign_to, "PermissionSetId": set_id})

    def add(self, sobject: str, **fields: Any) -> str:
        """Create a record directly (owned by the sync user unless ``OwnerId`` says); its Id."""
        record_id = f"{PREFIXES.get(sobject, 'a0P')}{next(self._ids):015d}"
        self.records[sobject][record_id] = {"Id": record_id, "OwnerId": INTEGRATION, **fields}
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

    def issue_token(self, user: str = INTEGRATION) -> str:
        """A valid access token of ``user`` (as if from a session flow)."""
        token = f"00Dfake!token{len(self.tokens_issued) + 1}"
        self.tokens_issued.append(token)
        self.valid_tokens.add(token)
        self.token_users[token] = user
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

    def fields_of(self, sobject: str, user: str | None = None) -> list[str] | None:
        """Every field of an object (None: no such object); with ``user``, those it may see
        (None also when it may not read the object)."""
        if sobject in STANDARD:
            names = STANDARD[sobject] + sorted(self.custom_fields)
        elif sobject in self.custom_objects:
            names = CUSTOM_STANDARD + sorted(self.custom_objects[sobject])
        else:
            return None
        if user is None:
            return names
        if sobject not in STANDARD and not self.access.can(user, sobject, "Read"):
            return None
        return [n for n in names if self.access.field_visible(user, sobject, n)]

    def field_definitions(self) -> list[dict[str, Any]]:
        """The Tooling API's FieldDefinition rows: every field of every object, seen or not."""
        objects = [*STANDARD, *self.custom_objects]
        return [
            {"EntityDefinition.QualifiedApiName": sobject, "QualifiedApiName": name}
            for sobject in objects
            for name in self.fields_of(sobject) or []
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
        user = INTEGRATION  # client credentials run as the connected app's Run As user
        if grant != "client_credentials":
            claims = jwt.decode(form["assertion"][0], options={"verify_signature": False})
            named = [u.id for u in self.access.users.values() if u.username == claims.get("sub")]
            if not named:
                error = {
                    "error": "invalid_grant",
                    "error_description": "user hasn't approved this consumer",
                }
                return 400, {}, json.dumps(error)
            user = named[0]
        token = self.issue_token()
        self.token_users[token] = user
        answer = {
            "access_token": token,
            "instance_url": URL,
            "id": f"https://login.salesforce.com/id/{ORG_ID}/{user}",
            "token_type": "Bearer",
            "scope": "api",
        }
        return 200, {}, json.dumps(answer)

    def _userinfo(self, request: Any) -> Reply:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.valid_tokens:
            return 403, {}, json.dumps("Bad_OAuth_Token")
        user = self.access.users[self.token_users[token]]
        self.calls.append(Call("GET", "oauth2/userinfo", None, 200))
        info = {
            "sub": f"https://login.salesforce.com/id/{ORG_ID}/{user.id}",
            "user_id": user.id,
            "organization_id": ORG_ID,
            "preferred_username": user.username,
        }
        return 200, {}, json.dumps(info)

    def _data(self, request: Any) -> Reply:
        parsed = urlparse(request.url)
        path = parsed.path.split(f"/v{VERSION}/", 1)[1]
        body = json.loads(request.body) if request.body else None
        try:
            status, payload = self._answer(request, path, parse_qs(parsed.query), body)
        except Refused as exc:
            status, payload = exc.status, exc.body
        except SoqlRefused as exc:
            status, payload = 400, [{"errorCode": exc.code, "message": str(exc)}]
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
        user = self.token_users[token]
        if path.startswith("query"):
            return 200, self._query(query["q"][0], user, VERSION)
        if path.startswith("tooling/query"):
            tables = {"FieldDefinition": self.field_definitions()}
            return 200, self.access.query(query["q"][0], user, tables)
        if re.fullmatch(r"sobjects/PermissionSetAssignment/?", path) and request.method == "POST":
            return self.access.assign(user, body)
        if match := re.fullmatch(r"sobjects/(\w+)/describe/?", path):
            names = self.fields_of(match.group(1), user)
            if names is None:
                message = "The requested resource does not exist"
                return 404, [{"errorCode": "NOT_FOUND", "message": message}]
            fields = [{"name": n, "type": "string"} for n in names]
            return 200, {"name": match.group(1), "fields": fields}
        if path.startswith("composite/sobjects"):
            header = request.headers.get("Sforce-Duplicate-Rule-Header")
            return 200, self.collection(request.method, path, body, user, header)
        return 404, [{"errorCode": "NOT_FOUND", "message": path}]
