"""Metadata for the Salesforce admin: mapped custom fields, the play object, a permission set.

``package(mapping)`` gives every file (sfdx source format) as bytes; ``write`` puts them in a
folder (idempotent: same bytes, unchanged files untouched); ``mdapi_zip`` converts them to a
Metadata API zip, which ``deploy`` sends through simple-salesforce and polls to the end. The
``Instruqt_Play__c`` object (fields, permissions) is included when the mapping writes plays.
The permission set grants what the sync user needs (``salesforce_access.needed_access``):
every mapped field, every Contact and Lead whoever owns it, Account read (Contacts depend on
it) and View Setup and Configuration (to read its own access).
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceError, SalesforceExpiredSession

from instruqt_crm.config import DEFAULT_SALESFORCE_API_VERSION
from instruqt_crm.errors import Category, PermanentError
from instruqt_crm.mapping import Mapping

from .salesforce import SalesforceAdapter
from .salesforce_access import PERMISSION_SET, needed_access
from .salesforce_auth import Connection
from .salesforce_plays import PLAY_OBJECT, REQUIRED_FIELDS
from .salesforce_routing import EXTERNAL_ID, field_name
from .salesforce_xml import NS, block, document, field_items, play_field_items, play_object_items

__all__ = [
    "NS",
    "PERMISSION_SET",
    "changes",
    "deploy",
    "field_definitions",
    "mdapi_zip",
    "missing_fields",
    "package",
    "permission_set_xml",
    "write",
]
OBJECTS = ("Contact", "Lead")
ROOT = "force-app/main/default"
MODIFY_METADATA = (
    "the integration user lacks the 'Modify Metadata Through Metadata API Functions' "
    "permission (or 'Customize Application'); deploy the folder written by "
    "`instruqt-crm setup salesforce --out DIR` yourself, or grant it for the deploy"
)


def _external(mapping: Mapping, name: str) -> bool:
    key = mapping.identity.match_key
    return field_name(name) == (field_name(key) if key else EXTERNAL_ID)


def field_definitions(mapping: Mapping, indent: int = 4) -> dict[str, dict[str, dict[str, object]]]:
    """Every CustomField's elements, by object and field API name (``indent``: where nested
    elements are written)."""
    definitions = {
        sobject: {
            field_name(name): field_items(name, spec, _external(mapping, name))
            for name, spec in mapping.properties.items()
        }
        for sobject in OBJECTS
    }
    if mapping.plays is not None:
        definitions[PLAY_OBJECT] = {
            name: play_field_items(name, indent) for name in REQUIRED_FIELDS
        }
    return definitions


def _members(mapping: Mapping) -> list[str]:
    """Every field as ``Object.Field``, sorted."""
    return sorted(f"{o}.{n}" for o, fields in field_definitions(mapping).items() for n in fields)


def object_grants(mapping: Mapping) -> dict[str, dict[str, bool]]:
    """The permission set's object permissions, by object: Contact and Lead as the sync needs
    them (Salesforce grants Modify All only with Delete; the sync never deletes), Account read
    (Contact access depends on it), play records created and edited by the sync itself."""
    grants = {"Account": {"allowRead": True}}
    for sobject, needed in needed_access(mapping.object).items():
        grants[sobject] = {
            "allowCreate": "Create" in needed,
            "allowDelete": "Modify All" in needed,
            "allowEdit": "Edit" in needed,
            "allowRead": "Read" in needed,
            "modifyAllRecords": "Modify All" in needed,
            "viewAllRecords": "View All" in needed,
        }
    if mapping.plays is not None:
        grants[PLAY_OBJECT] = {"allowCreate": True, "allowEdit": True, "allowRead": True}
    return grants


def permission_set_xml(mapping: Mapping) -> bytes:
    """The sync user's permission set (``object_grants``, every field, View Setup)."""
    fields = [
        block("PermissionSetFieldPermissions", {"editable": True, "field": m, "readable": True}, 8)
        for m in _members(mapping)
    ]
    flags = dict.fromkeys(("allowCreate", "allowDelete", "allowEdit", "allowRead"), False)
    flags |= {"modifyAllRecords": False, "viewAllRecords": False}
    objects = [
        block("PermissionSetObjectPermissions", {**flags, **granted, "object": sobject}, 8)
        for sobject, granted in sorted(object_grants(mapping).items())
    ]
    items: dict[str, object] = {
        "description": (
            "Instruqt CRM sync user: its fields; every Contact and Lead, whoever owns it (View "
            "All, Modify All; the sync never deletes); Account read; View Setup and "
            "Configuration, to check its own access."
        ),
        "fieldPermissions": fields,
        "hasActivationRequired": False,
        "label": "Instruqt CRM Integration",
        "objectPermissions": objects,
        "userPermissions": [
            block("PermissionSetUserPermission", {"enabled": True, "name": "ViewSetup"}, 8)
        ],
    }
    return document("PermissionSet", items)


def package(
    mapping: Mapping, api_version: str = DEFAULT_SALESFORCE_API_VERSION
) -> dict[str, bytes]:
    """Every file of the sfdx source-format project, by relative path."""
    files: dict[str, bytes] = {}
    for sobject, fields in field_definitions(mapping).items():
        for name, items in fields.items():
            files[f"{ROOT}/objects/{sobject}/fields/{name}.field-meta.xml"] = document(
                "CustomField", items
            )
    if mapping.plays is not None:
        path = f"{ROOT}/objects/{PLAY_OBJECT}/{PLAY_OBJECT}.object-meta.xml"
        files[path] = document("CustomObject", play_object_items())
    path = f"{ROOT}/permissionsets/{PERMISSION_SET}.permissionset-meta.xml"
    files[path] = permission_set_xml(mapping)
    project = {
        "name": "instruqt-crm",
        "namespace": "",
        "packageDirectories": [{"default": True, "path": "force-app"}],
        "sourceApiVersion": api_version,
    }
    files["sfdx-project.json"] = (json.dumps(project, indent=2, sort_keys=True) + "\n").encode()
    return dict(sorted(files.items()))


def changes(files: dict[str, bytes], out: Path) -> dict[str, str]:
    """What writing would do to each file: ``new``, ``changed`` or ``unchanged``."""
    result = {}
    for relative, content in files.items():
        target = out / relative
        if not target.exists():
            result[relative] = "new"
        else:
            result[relative] = "unchanged" if target.read_bytes() == content else "changed"
    return result


def write(files: dict[str, bytes], out: Path) -> dict[str, str]:
    """Write the files that are new or changed; what happened to each."""
    result = changes(files, out)
    for relative, state in result.items():
        if state != "unchanged":
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(files[relative])
    return result


def _manifest(mapping: Mapping, api_version: str) -> bytes:
    """``package.xml``: the fields, the play object (when written), the permission set."""
    types = {"CustomField": _members(mapping), "PermissionSet": [PERMISSION_SET]}
    if mapping.plays is not None:
        types["CustomObject"] = [PLAY_OBJECT]
    listed: list[object] = [
        block("PackageTypeMembers", {"members": members, "name": kind}, 8)
        for kind, members in sorted(types.items())
    ]
    return document("Package", {"types": listed, "version": api_version})


def mdapi_zip(mapping: Mapping, api_version: str = DEFAULT_SALESFORCE_API_VERSION) -> bytes:
    """The same metadata as a Metadata API deploy zip (package.xml, objects/*.object, ...)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("package.xml", _manifest(mapping, api_version))
        for sobject, fields in field_definitions(mapping, 8).items():
            nested = [block("CustomField", fields[n], 8) for n in sorted(fields)]
            items = play_object_items(nested) if sobject == PLAY_OBJECT else {"fields": nested}
            archive.writestr(f"objects/{sobject}.object", document("CustomObject", items))
        archive.writestr(
            f"permissionsets/{PERMISSION_SET}.permissionset", permission_set_xml(mapping)
        )
    return buffer.getvalue()


def deploy(
    connection: Connection,
    mapping: Mapping,
    sandbox: bool = False,
    poll: float = 2.0,
    timeout: float = 600.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Deploy the package and wait for the result; PermanentError naming what failed."""
    archive = mdapi_zip(mapping, connection.creds.api_version)

    def start(sf: Salesforce) -> dict[str, Any]:
        try:
            return dict(sf.deploy(io.BytesIO(archive), sandbox=sandbox))
        except SalesforceExpiredSession:
            raise
        except SalesforceError as exc:
            content = str(exc.content)
            if "INSUFFICIENT_ACCESS" in content or "insufficient access" in content.lower():
                raise PermanentError(
                    f"Salesforce deploy: {MODIFY_METADATA}", Category.AUTH
                ) from exc
            raise

    started = connection.call("deploy metadata", start)
    async_id = str(started.get("asyncId"))
    waited = 0.0
    while True:
        status: dict[str, Any] = connection.call(
            "deploy status", lambda sf: dict(sf.checkDeployStatus(async_id))
        )
        state = str(status.get("state"))
        if state in ("Succeeded", "SucceededPartial"):
            return status
        if state in ("Failed", "Canceled"):
            detail: Any = status.get("deployment_detail") or {}
            problems = [
                f"{e.get('file')}: {e.get('message')}" for e in detail.get("errors") or []
            ] or [str(status.get("state_detail") or state)]
            text = "; ".join(problems)
            if "insufficient access" in text.lower():
                text += f" ({MODIFY_METADATA})"
            raise PermanentError(f"Salesforce deploy {state.lower()}: {text}", Category.VALIDATION)
        if waited >= timeout:
            raise PermanentError(
                f"Salesforce deploy {async_id} still {state} after {timeout:.0f} s"
            )
        sleep(poll)
        waited += poll


def missing_fields(adapter: SalesforceAdapter) -> list[str]:
    """Mapped fields missing on Contact or Lead (with their API names) and missing play-record
    fields (``Instruqt_Play__c.Track__c``), for operators."""
    return adapter.missing_fields()
