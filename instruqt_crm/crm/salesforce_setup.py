"""Metadata for the Salesforce admin: mapped custom fields and a permission set, from the mapping.

``package(mapping)`` gives every file (sfdx source format) as bytes; ``write`` puts them in a
folder (idempotent: same bytes, unchanged files untouched); ``mdapi_zip`` converts them to a
Metadata API zip, which ``deploy`` sends through simple-salesforce and polls to the end.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceError, SalesforceExpiredSession

from ..errors import PermanentError
from ..mapping import Mapping, PropertySpec
from .salesforce import EXTERNAL_ID, SalesforceAdapter, field_name
from .salesforce_auth import Connection

NS = "http://soap.sforce.com/2006/04/metadata"
HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n'
OBJECTS = ("Contact", "Lead")
PERMISSION_SET = "Instruqt_CRM_Integration"
ROOT = "force-app/main/default"
MODIFY_METADATA = (
    "the integration user lacks the 'Modify Metadata Through Metadata API Functions' "
    "permission (or 'Customize Application'); deploy the folder written by "
    "`instruqt-crm setup salesforce --out DIR` yourself, or grant it for the deploy"
)


def _element(tag: str, value: object, indent: int = 4) -> str:
    text = str(value).lower() if isinstance(value, bool) else escape(str(value))
    return f"{' ' * indent}<{tag}>{text}</{tag}>\n"


def field_body(name: str, spec: PropertySpec, external: bool, indent: int = 4) -> str:
    """The inner elements of one CustomField, sorted by tag as sfdx writes them."""
    items: dict[str, object] = {"fullName": field_name(name), "label": spec.label[:40]}
    if spec.description:
        items["description"] = spec.description[:1000]
    if spec.type == "bool":
        items.update(type="Checkbox", defaultValue=False)
    elif spec.type == "number":
        items.update(type="Number", precision=18, scale=0, required=False, unique=False)
        items["externalId"] = False
    elif spec.type in ("datetime", "date"):
        items.update(type="DateTime" if spec.type == "datetime" else "Date", required=False)
        items["externalId"] = False
    elif spec.merge == "union" and not external:
        items.update(type="LongTextArea", length=32768, visibleLines=3)
    else:
        items.update(type="Text", length=255, required=False, externalId=external, unique=external)
        if external:
            items["caseSensitive"] = False
    return "".join(_element(tag, items[tag], indent) for tag in sorted(items))


def field_xml(name: str, spec: PropertySpec, external: bool) -> bytes:
    """A ``.field-meta.xml`` file."""
    body = field_body(name, spec, external)
    return f'{HEADER}<CustomField xmlns="{NS}">\n{body}</CustomField>\n'.encode()


def permission_set_xml(mapping: Mapping) -> bytes:
    """A permission set: edit the mapped fields, read/edit Contacts, create/read/edit Leads."""
    parts = [_element("description", "Access for the Instruqt CRM sync integration user.")]
    for sobject in OBJECTS:
        for name in sorted(mapping.properties, key=field_name):
            parts.append(
                "    <fieldPermissions>\n"
                + _element("editable", True, 8)
                + _element("field", f"{sobject}.{field_name(name)}", 8)
                + _element("readable", True, 8)
                + "    </fieldPermissions>\n"
            )
    parts.append(_element("hasActivationRequired", False))
    parts.append(_element("label", "Instruqt CRM Integration"))
    for sobject in OBJECTS:
        flags = {
            "allowCreate": sobject == "Lead" or mapping.object == "Contact",
            "allowDelete": False,
            "allowEdit": True,
            "allowRead": True,
            "modifyAllRecords": False,
            "object": sobject,
            "viewAllRecords": False,
        }
        inner = "".join(_element(tag, value, 8) for tag, value in flags.items())
        parts.append(f"    <objectPermissions>\n{inner}    </objectPermissions>\n")
    return f'{HEADER}<PermissionSet xmlns="{NS}">\n{"".join(parts)}</PermissionSet>\n'.encode()


def _external(mapping: Mapping, name: str) -> bool:
    key = mapping.identity.match_key
    return field_name(name) == (field_name(key) if key else EXTERNAL_ID)


def package(mapping: Mapping, api_version: str = "62.0") -> dict[str, bytes]:
    """Every file of the sfdx source-format project, by relative path."""
    files: dict[str, bytes] = {}
    for sobject in OBJECTS:
        for name, spec in mapping.properties.items():
            path = f"{ROOT}/objects/{sobject}/fields/{field_name(name)}.field-meta.xml"
            files[path] = field_xml(name, spec, _external(mapping, name))
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


def mdapi_zip(mapping: Mapping, api_version: str = "62.0") -> bytes:
    """The same metadata as a Metadata API deploy zip (package.xml, objects/*.object, ...)."""
    names = sorted(mapping.properties, key=field_name)
    members = [f"{o}.{field_name(n)}" for o in OBJECTS for n in names]
    types = "".join(_element("members", m, 8) for m in members) + _element("name", "CustomField", 8)
    perm = _element("members", PERMISSION_SET, 8) + _element("name", "PermissionSet", 8)
    manifest = (
        f'{HEADER}<Package xmlns="{NS}">\n    <types>\n{types}    </types>\n'
        f"    <types>\n{perm}    </types>\n{_element('version', api_version)}</Package>\n"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("package.xml", manifest)
        for sobject in OBJECTS:
            fields = "".join(
                f"    <fields>\n{field_body(n, mapping.properties[n], _external(mapping, n), 8)}"
                "    </fields>\n"
                for n in names
            )
            archive.writestr(
                f"objects/{sobject}.object",
                f'{HEADER}<CustomObject xmlns="{NS}">\n{fields}</CustomObject>\n',
            )
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
                raise PermanentError(f"Salesforce deploy: {MODIFY_METADATA}", "auth") from exc
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
            raise PermanentError(f"Salesforce deploy {state.lower()}: {text}", "validation")
        if waited >= timeout:
            raise PermanentError(
                f"Salesforce deploy {async_id} still {state} after {timeout:.0f} s"
            )
        sleep(poll)
        waited += poll


def missing_fields(adapter: SalesforceAdapter) -> list[str]:
    """Mapped properties missing on Contact or Lead (with their API names), for operators."""
    known = adapter.describe()
    return sorted(
        f"{prop} ({field_name(prop)})" if field_name(prop) != prop else prop
        for prop in adapter.mapping.properties
        if prop not in known
    )
