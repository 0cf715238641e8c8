"""What the running Salesforce user may do: its access to Contacts and Leads, the mapped fields
it cannot see, and the assignment of the permission set that grants both.

Sharing decides which records SOQL returns: with Private sharing on Lead or Contact, the sync
user finds and updates records other users own only with View All and Modify All on the
object. ``access_problem`` reads the user's effective object permissions (the union over every
permission set assigned to it, its profile's own included) from ``ObjectPermissions``;
``FieldReport`` tells a field missing in the org from one that exists but that field-level
security hides from the user, through the Tooling API's ``FieldDefinition``;
``assign_permission_set`` creates the ``PermissionSetAssignment``. Reading
``ObjectPermissions``, ``PermissionSetAssignment`` and ``FieldDefinition`` needs View Setup and
Configuration, which the permission set grants.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from instruqt_crm.errors import Category, NotReady, PermanentError

from .salesforce_auth import RunningUser
from .salesforce_routing import soql_quote

PERMISSION_SET = "Instruqt_CRM_Integration"
LEARNER_OBJECTS = ("Contact", "Lead")
COLUMNS = {  # object permission -> its ObjectPermissions field
    "Read": "PermissionsRead",
    "Create": "PermissionsCreate",
    "Edit": "PermissionsEdit",
    "View All": "PermissionsViewAllRecords",
    "Modify All": "PermissionsModifyAllRecords",
}
ASSIGN = (
    f"assign the permission set {PERMISSION_SET} to the sync user: instruqt-crm setup salesforce "
    "--assign-to USERNAME (or in Setup: Users, the user, Permission Set Assignments)"
)
UPDATE_ANY = ("Edit", "View All", "Modify All")  # update records whoever owns them
DEPLOY = "instruqt-crm setup salesforce --deploy (or --out DIR, then deploy that folder)"
Call = Callable[..., Any]  # the adapter's REST call: (what, method, path, **kwargs) -> JSON


def needed_access(mapping_object: str) -> dict[str, tuple[str, ...]]:
    """The object permissions the sync user needs on Contact and Lead: every mode updates both
    (a converted Lead's Contact too), owned by anyone; it creates Contacts (``Contact``) or
    Leads (``auto``, ``Lead``)."""
    creates = "Contact" if mapping_object == "Contact" else "Lead"
    return {
        sobject: ("Read", *(("Create",) if sobject == creates else ()), *UPDATE_ANY)
        for sobject in LEARNER_OBJECTS
    }


def _rows(call: Call, what: str, soql: str, tooling: bool = False) -> list[dict[str, Any]]:
    """The records of one SOQL query (REST, or the Tooling API's)."""
    data = call(what, "GET", "tooling/query/" if tooling else "query/", params={"q": soql})
    return list((data or {}).get("records") or [])


def access_gaps(
    call: Call, user: RunningUser, needed: Mapping[str, tuple[str, ...]]
) -> dict[str, list[str]]:
    """What ``user`` lacks of ``needed``, by object (objects it lacks nothing on left out)."""
    columns = ", ".join(COLUMNS.values())
    objects = ", ".join(soql_quote(sobject) for sobject in sorted(needed))
    soql = (
        f"SELECT SobjectType, {columns} FROM ObjectPermissions WHERE ParentId IN "
        "(SELECT PermissionSetId FROM PermissionSetAssignment WHERE AssigneeId = "
        f"{soql_quote(user.id)}) AND SobjectType IN ({objects})"
    )
    granted: dict[str, set[str]] = {sobject: set() for sobject in needed}
    for row in _rows(call, "read the user's object permissions", soql):
        held = {name for name, column in COLUMNS.items() if row.get(column) is True}
        granted.setdefault(str(row.get("SobjectType")), set()).update(held)
    gaps = {
        sobject: [p for p in wanted if p not in granted[sobject]]
        for sobject, wanted in needed.items()
    }
    return {sobject: lacking for sobject, lacking in gaps.items() if lacking}


def access_problem(call: Call, user: RunningUser, mapping_object: str) -> str | None:
    """One line naming what ``user`` lacks on Contact and Lead (or why that cannot be read), or
    None when it has every permission the sync needs."""
    try:
        gaps = access_gaps(call, user, needed_access(mapping_object))
    except PermanentError as exc:
        return (
            f"Salesforce: cannot read the object permissions of {user} ({exc.reason}); the "
            f"permission set grants View Setup and Configuration for this check: {ASSIGN}"
        )
    if not gaps:
        return None
    lacks = "; ".join(f"{', '.join(perms)} on {sobject}" for sobject, perms in sorted(gaps.items()))
    return (
        f"Salesforce: {user} lacks {lacks}: without View All and Modify All it cannot find or "
        "update the Contacts and Leads other users own (Private sharing) and would create "
        f"duplicates; {ASSIGN}"
    )


@dataclass(frozen=True)
class FieldReport:
    """Mapped fields describe does not show, as operators name them: missing in the org,
    present but hidden from the user (field-level security), or either (``FieldDefinition``
    could not be read, ``reason`` says why)."""

    missing: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    reason: str = ""

    def lines(self) -> list[str]:
        """One line per kind, each with its fix."""
        lines = []
        if self.missing:
            lines.append(
                f"Salesforce: {len(self.missing)} mapped field(s) missing in the org: "
                f"{', '.join(self.missing)}. Create them with: {DEPLOY}"
            )
        if self.hidden:
            lines.append(
                f"Salesforce: {len(self.hidden)} mapped field(s) exist but the user cannot see "
                f"them (field-level security): {', '.join(self.hidden)}. {ASSIGN[0].upper()}"
                f"{ASSIGN[1:]}"
            )
        if self.unknown:
            lines.append(
                f"Salesforce: {len(self.unknown)} mapped field(s) missing in the org or not "
                f"visible to the user: {', '.join(self.unknown)} (cannot read FieldDefinition: "
                f"{self.reason}). Create them with {DEPLOY} and {ASSIGN}"
            )
        return lines


def classify_fields(call: Call, absent: Mapping[str, Mapping[str, str]]) -> FieldReport:
    """Classify the fields describe lacks (``absent``: object -> API name -> the name operators
    know) with one Tooling API query per object; a name absent from several objects counts
    as missing when it is missing from any."""
    status: dict[str, str] = {}
    for sobject, names in absent.items():
        listed = ", ".join(soql_quote(name) for name in sorted(names))
        soql = (
            "SELECT QualifiedApiName FROM FieldDefinition WHERE "
            f"EntityDefinition.QualifiedApiName = {soql_quote(sobject)} "
            f"AND QualifiedApiName IN ({listed})"
        )
        try:
            rows = _rows(call, f"find {sobject} field definitions", soql, tooling=True)
        except PermanentError as exc:
            every = dict.fromkeys(label for names in absent.values() for label in names.values())
            return FieldReport(unknown=tuple(every), reason=exc.reason)
        exists = {str(row.get("QualifiedApiName")) for row in rows}
        for name, label in names.items():
            if status.get(label) != "missing":
                status[label] = "hidden" if name in exists else "missing"
    return FieldReport(
        missing=tuple(label for label, kind in status.items() if kind == "missing"),
        hidden=tuple(label for label, kind in status.items() if kind == "hidden"),
    )


def user_named(call: Call, username: str) -> RunningUser:
    """The user with this username (PermanentError naming it when there is none)."""
    soql = f"SELECT Id, Username FROM User WHERE Username = {soql_quote(username)}"
    rows = _rows(call, "find the user", soql)
    if not rows:
        raise PermanentError(
            f"Salesforce: no user has the username {username!r} (--assign-to)", Category.CONFIG
        )
    return RunningUser(str(rows[0]["Id"]), str(rows[0].get("Username") or username))


def assign_permission_set(call: Call, user: RunningUser) -> bool:
    """Assign the permission set to ``user``: True when assigned now, False when it already was;
    PermanentError saying what to do when the set is not deployed or assigning is refused."""
    try:
        permission_set = _permission_set_id(call)
        soql = (
            "SELECT Id FROM PermissionSetAssignment WHERE AssigneeId = "
            f"{soql_quote(user.id)} AND PermissionSetId = {soql_quote(permission_set)}"
        )
        if _rows(call, "find the assignment", soql):
            return False
        body = {"AssigneeId": user.id, "PermissionSetId": permission_set}
        call("assign the permission set", "POST", "sobjects/PermissionSetAssignment/", json=body)
    except NotReady:
        raise
    except PermanentError as exc:
        if "DUPLICATE_VALUE" in exc.reason:
            return False
        raise PermanentError(
            f"{exc.reason}. Assigning needs View Setup and Configuration and Assign Permission "
            f"Sets: run this with an administrator's credentials, or assign {PERMISSION_SET} to "
            f"{user} in Setup (Users, the user, Permission Set Assignments)",
            Category.AUTH,
        ) from exc
    return True


def _permission_set_id(call: Call) -> str:
    """The Id of the deployed permission set (NotReady when it is not deployed)."""
    soql = f"SELECT Id FROM PermissionSet WHERE Name = {soql_quote(PERMISSION_SET)}"
    found = _rows(call, "find the permission set", soql)
    if not found:
        raise NotReady(
            f"Salesforce: the permission set {PERMISSION_SET} is not in the org: deploy it "
            f"first with {DEPLOY}",
            Category.CONFIG,
        )
    return str(found[0]["Id"])
