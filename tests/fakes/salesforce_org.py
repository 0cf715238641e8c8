"""The fake Salesforce org's people and access: users, profiles and permission sets, sharing,
field-level security, and the setup objects SOQL answers from them.

As Salesforce does it: a user's object access is the union of the permission sets assigned to
it, its profile's own permission set included (``PermissionSetAssignment`` lists both). A
record of an object with Private sharing is visible only to its owner and to users with View
All or Modify All on the object, and editable only by its owner and users with Modify All.
Fields deployed through the Metadata API are hidden from every user (describe, SOQL, writes)
until a permission set assigned to the user grants them. ``ObjectPermissions``,
``PermissionSetAssignment``, ``PermissionSet`` (and the Tooling API's ``FieldDefinition``)
answer only users with View Setup and Configuration; creating a ``PermissionSetAssignment``
needs Assign Permission Sets.
"""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

ORG_ID = "00D000000000001AAA"
INTEGRATION = "005000000000001AAA"  # the sync's user (client credentials run as it)
SALES_REP = "005000000000002AAA"  # owns the records sales reps entered
ADMIN = "005000000000003AAA"  # may assign permission sets
NS = {"m": "http://soap.sforce.com/2006/04/metadata"}
GRANTS = {  # PermissionSet metadata flag -> ObjectPermissions field suffix
    "allowRead": "Read",
    "allowCreate": "Create",
    "allowEdit": "Edit",
    "allowDelete": "Delete",
    "viewAllRecords": "ViewAllRecords",
    "modifyAllRecords": "ModifyAllRecords",
}
EVERYTHING = frozenset(GRANTS.values())
BASIC = frozenset({"Read", "Create", "Edit"})
SETUP_OBJECTS = ("ObjectPermissions", "PermissionSetAssignment", "PermissionSet", "FieldDefinition")
NOT_SUPPORTED = (
    "sObject type '{}' is not supported. If you are attempting to use a custom object, be sure "
    "to append the '__c' after the entity name. Please reference your WSDL or the describe call "
    "for the appropriate names."
)
Answer = tuple[int, Any]


class SoqlRefused(Exception):
    """A query Salesforce refuses with 400: its ``errorCode`` and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class PermissionSet:
    """A permission set (or a profile's own one): object permissions, readable fields, and the
    user permissions the sync meets."""

    id: str
    name: str
    objects: dict[str, set[str]] = field(default_factory=dict)
    fields: set[tuple[str, str]] = field(default_factory=set)
    view_setup: bool = False
    assign_permission_sets: bool = False
    profile: bool = False


@dataclass
class User:
    """A user and its profile's permission set."""

    id: str
    username: str
    profile: PermissionSet


def _text(node: ET.Element, tag: str) -> str:
    return str(node.findtext(f"m:{tag}", namespaces=NS))


def permission_set_from(content: bytes, set_id: str, name: str) -> PermissionSet:
    """A PermissionSet from its ``.permissionset-meta.xml``."""
    root = ET.fromstring(content)
    objects = {
        _text(grant, "object"): {
            perm for tag, perm in GRANTS.items() if _text(grant, tag) == "true"
        }
        for grant in root.findall("m:objectPermissions", NS)
    }
    readable = {
        tuple(_text(grant, "field").split(".", 1))
        for grant in root.findall("m:fieldPermissions", NS)
        if _text(grant, "readable") == "true"
    }
    enabled = {
        _text(grant, "name")
        for grant in root.findall("m:userPermissions", NS)
        if _text(grant, "enabled") == "true"
    }
    return PermissionSet(set_id, name, objects, readable, view_setup="ViewSetup" in enabled)  # type: ignore[arg-type]


def _users() -> dict[str, User]:
    """The sync user has a minimal API profile (no View All, no View Setup), the sales rep a
    standard one, the admin every permission."""
    learners = ("Contact", "Lead", "Account")
    integration = PermissionSet(
        "0PS000000000001AAA",
        "X00e000000000001AAA",
        {"Contact": set(BASIC), "Lead": set(BASIC), "Account": {"Read"}},
        profile=True,
    )
    rep = PermissionSet(
        "0PS000000000002AAA", "X00e000000000002AAA", {o: set(BASIC) for o in learners}, profile=True
    )
    admin = PermissionSet(
        "0PS000000000003AAA",
        "X00e000000000003AAA",
        {o: set(EVERYTHING) for o in learners},
        view_setup=True,
        assign_permission_sets=True,
        profile=True,
    )
    return {
        INTEGRATION: User(INTEGRATION, "integration@acme.com", integration),
        SALES_REP: User(SALES_REP, "rep@acme.com", rep),
        ADMIN: User(ADMIN, "admin@acme.com", admin),
    }


def _error(code: str, message: str) -> list[dict[str, Any]]:
    return [{"errorCode": code, "message": message, "fields": []}]


@dataclass
class Access:
    """Who may see and change what in the org."""

    users: dict[str, User] = field(default_factory=_users)
    permission_sets: dict[str, PermissionSet] = field(default_factory=dict)  # by Id
    assignments: list[tuple[str, str, str]] = field(default_factory=list)  # (Id, user, set Id)
    sharing: dict[str, str] = field(default_factory=dict)  # object -> "Private" (else public)
    restricted: set[tuple[str, str]] = field(default_factory=set)  # fields no profile grants
    _ids: Any = field(default_factory=lambda: itertools.count(100))

    # -- what a user may do ----------------------------------------------------------------

    def sets_of(self, user_id: str) -> list[PermissionSet]:
        """A user's permission sets: its profile's, then the assigned ones."""
        assigned = [self.permission_sets[s] for _, u, s in self.assignments if u == user_id]
        return [self.users[user_id].profile, *assigned]

    def can(self, user_id: str, sobject: str, permission: str) -> bool:
        """Whether any of the user's permission sets grants ``permission`` on ``sobject``."""
        return any(permission in p.objects.get(sobject, set()) for p in self.sets_of(user_id))

    def views_setup(self, user_id: str) -> bool:
        """Whether the user has View Setup and Configuration."""
        return any(p.view_setup for p in self.sets_of(user_id))

    def sees(self, user_id: str, sobject: str, record: dict[str, Any]) -> bool:
        """Whether a record is visible to the user (sharing, ownership, View/Modify All)."""
        if self.sharing.get(sobject) != "Private" or record.get("OwnerId") == user_id:
            return True
        return self.can(user_id, sobject, "ViewAllRecords") or self.can(
            user_id, sobject, "ModifyAllRecords"
        )

    def edits(self, user_id: str, sobject: str, record: dict[str, Any]) -> bool:
        """Whether the user may update a record (sharing, ownership, Modify All)."""
        if self.sharing.get(sobject) != "Private" or record.get("OwnerId") == user_id:
            return True
        return self.can(user_id, sobject, "ModifyAllRecords")

    def field_visible(self, user_id: str, sobject: str, name: str) -> bool:
        """Field-level security: a deployed field only through an assigned permission set."""
        if (sobject, name) not in self.restricted:
            return True
        return any((sobject, name) in p.fields for p in self.sets_of(user_id))

    # -- permission sets -------------------------------------------------------------------

    def install(self, name: str, content: bytes) -> str:
        """Deploy (or deploy again) a permission set from its metadata file; its Id."""
        known = next((p.id for p in self.permission_sets.values() if p.name == name), None)
        set_id = known or f"0PS{next(self._ids):015d}"
        self.permission_sets[set_id] = permission_set_from(content, set_id, name)
        return set_id

    def assign(self, actor: str, body: dict[str, Any]) -> Answer:
        """``POST sobjects/PermissionSetAssignment`` by ``actor``."""
        assignee, set_id = str(body.get("AssigneeId")), str(body.get("PermissionSetId"))
        if not any(p.assign_permission_sets for p in self.sets_of(actor)):
            message = f"insufficient access rights on cross-reference id: {set_id}"
            return 400, _error("INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY", message)
        if assignee not in self.users or set_id not in self.permission_sets:
            return 400, _error("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
        if any((u, s) == (assignee, set_id) for _, u, s in self.assignments):
            message = (
                f"Duplicate PermissionSetAssignment. Assignee: {assignee}; Permission Set: {set_id}"
            )
            return 400, _error("DUPLICATE_VALUE", message)
        assignment = f"0Pa{next(self._ids):015d}"
        self.assignments.append((assignment, assignee, set_id))
        return 201, {"id": assignment, "success": True, "errors": []}

    # -- setup objects ---------------------------------------------------------------------

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """The setup objects as SOQL sees them (profiles' permission sets included)."""
        profiles = [(f"0Pa{n:015d}", u.id, u.profile.id) for n, u in enumerate(self.users.values())]
        every = [u.profile for u in self.users.values()] + list(self.permission_sets.values())
        return {
            "User": [{"Id": u.id, "Username": u.username} for u in self.users.values()],
            "PermissionSet": [
                {"Id": p.id, "Name": p.name, "IsOwnedByProfile": p.profile} for p in every
            ],
            "PermissionSetAssignment": [
                {"Id": i, "AssigneeId": u, "PermissionSetId": s}
                for i, u, s in profiles + self.assignments
            ],
            "ObjectPermissions": [
                {
                    "ParentId": p.id,
                    "SobjectType": sobject,
                    **{f"Permissions{perm}": perm in held for perm in EVERYTHING},
                }
                for p in every
                for sobject, held in sorted(p.objects.items())
            ],
        }

    def query(
        self, soql: str, user_id: str, more: dict[str, list[dict[str, Any]]] | None = None
    ) -> dict[str, Any]:
        """Answer a query on a setup object (``more``: further tables, e.g. FieldDefinition)."""
        sobject = from_object(soql)
        if sobject in SETUP_OBJECTS and not self.views_setup(user_id):
            raise SoqlRefused("INVALID_TYPE", NOT_SUPPORTED.format(sobject))
        rows = select(soql, {**self.tables(), **(more or {})})
        return {"totalSize": len(rows), "done": True, "records": rows}


SUBQUERY = re.compile(r"(\w+) IN \((SELECT [^()]*)\)")
CONDITION = re.compile(r"([\w.]+) (?:=|IN) (\([^()]*\)|'(?:[^'\\]|\\.)*')")
LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'")


def from_object(soql: str) -> str:
    """The object a query reads."""
    return re.search(r"\bFROM (\w+)", soql).group(1)  # type: ignore[union-attr]


def select(soql: str, tables: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of ``SELECT a, b FROM T WHERE x = 'v' AND y IN ('w', ...)``: conditions joined
    by AND, a sub-select in ``IN`` answered first."""
    while match := SUBQUERY.search(soql):
        inner = match.group(2)
        column = inner.split()[1]
        values = ", ".join(f"'{row[column]}'" for row in select(inner, tables)) or "''"
        soql = f"{soql[: match.start()]}{match.group(1)} IN ({values}){soql[match.end() :]}"
    head, _, where = soql.partition(" WHERE ")
    columns = [c.strip() for c in head.split(" FROM ")[0].removeprefix("SELECT ").split(",")]
    sobject = from_object(head)
    rows = tables[sobject]
    for name, literal in CONDITION.findall(where):
        wanted = {v.replace("\\'", "'") for v in LITERAL.findall(literal)}
        rows = [row for row in rows if str(row.get(name)) in wanted]
    return [{"attributes": {"type": sobject}, **{c: row.get(c) for c in columns}} for row in rows]
