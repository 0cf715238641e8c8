"""Metadata XML for the Salesforce package: custom fields, the play object, element helpers.

Elements are written sorted by tag, as sfdx writes them (the Metadata API reads them in its
schema's order, which is alphabetical for the types used here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from xml.sax.saxutils import escape

from instruqt_crm.mapping import PropertySpec

from .salesforce_plays import LOOKUPS, PLAY_FIELDS, PLAY_KEY, STATUS_FIELD, STATUSES
from .salesforce_routing import field_name

NS = "http://soap.sforce.com/2006/04/metadata"
HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n'
STEP = 4  # spaces per nesting level


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


def elements(items: Mapping[str, object], indent: int = STEP, ordered: bool = True) -> str:
    """Several elements, sorted by tag unless ``ordered`` is False."""
    tags = sorted(items) if ordered else list(items)
    return "".join(element(tag, items[tag], indent) for tag in tags)


def document(root: str, body: str) -> bytes:
    """A metadata file: the XML header and ``root`` in the metadata namespace around ``body``."""
    return f'{HEADER}<{root} xmlns="{NS}">\n{body}</{root}>\n'.encode()


def field_body(name: str, spec: PropertySpec, external: bool, indent: int = STEP) -> str:
    """The inner elements of one CustomField, from a declared property."""
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
    return elements(items, indent)


def _status_body(indent: int) -> str:
    """Status__c: a restricted picklist of the play statuses."""
    values = "".join(
        element(
            "value",
            Block(
                elements({"fullName": s, "default": False, "label": s}, indent + 3 * STEP, False)
            ),
            indent + 2 * STEP,
        )
        for s in STATUSES
    )
    definition = Block(element("sorted", False, indent + 2 * STEP) + values)
    value_set = Block(
        elements({"restricted": True, "valueSetDefinition": definition}, indent + STEP)
    )
    spec = PLAY_FIELDS[STATUS_FIELD]
    items: dict[str, object] = {"description": spec.description, "fullName": STATUS_FIELD}
    items.update(label=spec.label, required=False, type="Picklist", valueSet=value_set)
    return elements(items, indent)


def _lookup_body(name: str, indent: int) -> str:
    """Contact__c / Lead__c: a lookup to the learner's record, cleared if it is deleted."""
    target = next(sobject for sobject, lookup in LOOKUPS.items() if lookup == name)
    items: dict[str, object] = {
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
    return elements(items, indent)


def play_field_body(name: str, indent: int = STEP) -> str:
    """The inner elements of one ``Instruqt_Play__c`` field."""
    if name == STATUS_FIELD:
        return _status_body(indent)
    if name in LOOKUPS.values():
        return _lookup_body(name, indent)
    return field_body(name, PLAY_FIELDS[name], name == PLAY_KEY, indent)


def play_object_body(fields: str = "", indent: int = STEP) -> str:
    """The inner elements of the ``Instruqt_Play__c`` CustomObject (``fields``: rendered
    ``<fields>`` elements, for the Metadata API format)."""
    name_field = {"displayFormat": "PLAY-{000000}", "label": "Play number", "type": "AutoNumber"}
    items: dict[str, object] = {
        "deploymentStatus": "Deployed",
        "description": "One learner's play of one Instruqt track (written by instruqt-crm).",
        "enableActivities": False,
        "enableReports": True,
        "enableSearch": True,
        "label": "Instruqt Play",
        "nameField": Block(elements(name_field, indent + STEP)),
        "pluralLabel": "Instruqt Plays",
        "sharingModel": "Read",
    }
    before = {tag: value for tag, value in items.items() if tag < "fields"}
    after = {tag: value for tag, value in items.items() if tag > "fields"}
    return elements(before, indent) + fields + elements(after, indent)
