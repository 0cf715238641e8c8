"""Metadata XML for the Salesforce package: custom fields, the play object, element helpers.

Every element is written in the order of Salesforce's metadata schema (the Metadata API's
``metadata.wsdl``): ``fullName``, which every type inherits from ``Metadata``, first, then the
type's own sequence. ``ORDER`` lists, per schema type, the elements this package writes, in
that order; an element it does not list is a programming error (``KeyError``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

from instruqt_crm.mapping import PropertySpec

from .salesforce_plays import LOOKUPS, PLAY_FIELDS, PLAY_KEY, STATUS_FIELD, STATUSES
from .salesforce_routing import field_name

NS = "http://soap.sforce.com/2006/04/metadata"
HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n'
STEP = 4  # spaces per nesting level
ORDER: dict[str, tuple[str, ...]] = {  # schema type -> the elements written, in schema order
    "CustomField": (
        "fullName",
        "caseSensitive",
        "defaultValue",
        "deleteConstraint",
        "description",
        "displayFormat",
        "externalId",
        "label",
        "length",
        "precision",
        "referenceTo",
        "relationshipLabel",
        "relationshipName",
        "required",
        "scale",
        "type",
        "unique",
        "valueSet",
        "visibleLines",
    ),
    "CustomObject": (
        "fullName",
        "deploymentStatus",
        "description",
        "enableActivities",
        "enableReports",
        "enableSearch",
        "fields",
        "label",
        "nameField",
        "pluralLabel",
        "sharingModel",
    ),
    "CustomValue": ("fullName", "default", "label"),
    "ValueSet": ("restricted", "valueSetDefinition"),
    "ValueSetValuesDefinition": ("sorted", "value"),
    "PermissionSet": (
        "fullName",
        "description",
        "fieldPermissions",
        "hasActivationRequired",
        "label",
        "objectPermissions",
        "userPermissions",
    ),
    "PermissionSetFieldPermissions": ("editable", "field", "readable"),
    "PermissionSetObjectPermissions": (
        "allowCreate",
        "allowDelete",
        "allowEdit",
        "allowRead",
        "modifyAllRecords",
        "object",
        "viewAllRecords",
    ),
    "PermissionSetUserPermission": ("enabled", "name"),
    "Package": ("fullName", "types", "version"),
    "PackageTypeMembers": ("members", "name"),
}


@dataclass(frozen=True)
class Block:
    """Child elements already rendered (one level deeper than their parent)."""

    inner: str


def element(tag: str, value: object, indent: int = STEP) -> str:
    """One element: a text value (booleans as true/false) or a Block."""
    pad = " " * indent
    if isinstance(value, Block):
        return f"{pad}<{tag}>\n{value.inner}{pad}</{tag}>\n"
    text = str(value).lower() if isinstance(value, bool) else escape(str(value))
    return f"{pad}<{tag}>{text}</{tag}>\n"


def elements(kind: str, items: Mapping[str, object], indent: int = STEP) -> str:
    """The children of one ``kind`` (a schema type) in its schema order; a list value is a
    repeated element, one per item."""
    rank = {tag: position for position, tag in enumerate(ORDER[kind])}
    out = []
    for tag in sorted(items, key=rank.__getitem__):
        value = items[tag]
        values = value if isinstance(value, list) else [value]
        out += [element(tag, one, indent) for one in values]
    return "".join(out)


def block(kind: str, items: Mapping[str, object], indent: int) -> Block:
    """A nested element of schema type ``kind`` whose children sit at ``indent``."""
    return Block(elements(kind, items, indent))


def document(root: str, items: Mapping[str, object]) -> bytes:
    """A metadata file: the XML header and ``root`` (a schema type, in the metadata namespace)
    around its children."""
    return f'{HEADER}<{root} xmlns="{NS}">\n{elements(root, items)}</{root}>\n'.encode()


def field_items(name: str, spec: PropertySpec, external: bool) -> dict[str, object]:
    """The elements of one CustomField, from a declared property."""
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
    return items


def _status_items(indent: int) -> dict[str, object]:
    """Status__c: a restricted picklist of the play statuses."""
    value_indent = indent + 3 * STEP
    values: list[object] = [
        block("CustomValue", {"fullName": s, "default": False, "label": s}, value_indent)
        for s in STATUSES
    ]
    definition = block(
        "ValueSetValuesDefinition", {"sorted": False, "value": values}, indent + 2 * STEP
    )
    value_set = block(
        "ValueSet", {"restricted": True, "valueSetDefinition": definition}, indent + STEP
    )
    spec = PLAY_FIELDS[STATUS_FIELD]
    items: dict[str, object] = {"description": spec.description, "fullName": STATUS_FIELD}
    items.update(label=spec.label, required=False, type="Picklist", valueSet=value_set)
    return items


def _lookup_items(name: str) -> dict[str, object]:
    """Contact__c / Lead__c: a lookup to the learner's record, cleared if it is deleted."""
    target = next(sobject for sobject, lookup in LOOKUPS.items() if lookup == name)
    return {
        "deleteConstraint": "SetNull",
        "description": f"The learner's {target}, when the learner is one.",
        "externalId": False,
        "fullName": name,
        "label": target,
        "referenceTo": target,
        "relationshipLabel": "Instruqt Plays",
        "relationshipName": "Instruqt_Plays",
        "required": False,
        "type": "Lookup",
    }


def play_field_items(name: str, indent: int = STEP) -> dict[str, object]:
    """The elements of one ``Instruqt_Play__c`` field (``indent``: where they are written)."""
    if name == STATUS_FIELD:
        return _status_items(indent)
    if name in LOOKUPS.values():
        return _lookup_items(name)
    return field_items(name, PLAY_FIELDS[name], name == PLAY_KEY)


def play_object_items(fields: Sequence[Block] = (), indent: int = STEP) -> dict[str, object]:
    """The elements of the ``Instruqt_Play__c`` CustomObject (``fields``: its ``<fields>``, for
    the Metadata API format)."""
    name_field = {"displayFormat": "PLAY-{000000}", "label": "Play number", "type": "AutoNumber"}
    items: dict[str, object] = {
        "deploymentStatus": "Deployed",
        "description": "One learner's play of one Instruqt track (written by instruqt-crm).",
        "enableActivities": False,
        "enableReports": True,
        "enableSearch": True,
        "label": "Instruqt Play",
        "nameField": block("CustomField", name_field, indent + STEP),
        "pluralLabel": "Instruqt Plays",
        "sharingModel": "Read",
    }
    if fields:
        items["fields"] = list(fields)
    return items
