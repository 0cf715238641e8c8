"""Provision HubSpot for a mapping: the ``instruqt`` property group and every mapped property."""

from __future__ import annotations

from dataclasses import dataclass, field

from hubspot.crm.properties import Option, PropertyCreate, PropertyGroupCreate

from instruqt_crm.errors import Category, PermanentError
from instruqt_crm.mapping import Mapping

from .base import PropertyInfo
from .hubspot import HubSpotAdapter

GROUP = "instruqt"
GROUP_LABEL = "Instruqt"
# mapping type -> (HubSpot type, fieldType)
TYPES = {
    "string": ("string", "text"),
    "number": ("number", "number"),
    "datetime": ("datetime", "date"),
    "date": ("date", "date"),
    "bool": ("bool", "booleancheckbox"),
}
BUILT_IN = {"email"}


@dataclass
class Plan:
    """What provisioning found and would do."""

    create: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: is X, mapping needs Y"
    create_group: bool = False


def plan(adapter: HubSpotAdapter, mapping: Mapping) -> Plan:
    """Compare the mapping's properties with the account's (two GETs)."""
    known = adapter.describe()
    groups = adapter.call(
        "list property groups",
        adapter.client.crm.properties.groups_api.get_all_with_http_info,
        "contacts",
    )
    result = Plan(create_group=GROUP not in {g.name for g in groups.results})
    for name, spec in mapping.properties.items():
        if name in BUILT_IN:
            continue
        wanted = TYPES[spec.type][0]
        if name not in known:
            result.create.append(name)
        elif known[name].type != wanted:
            result.mismatched.append(f"{name}: is {known[name].type}, the mapping needs {wanted}")
        else:
            result.existing.append(name)
    if problem := upsert_key_problem(mapping, known):
        result.mismatched.append(problem)
    return result


def upsert_key_problem(mapping: Mapping, known: dict[str, PropertyInfo]) -> str | None:
    """Why contacts cannot be upserted on the mapping's upsert key, or None if they can."""
    key = mapping.upsert_key
    if key == "email" or key not in known or known[key].extra.get("unique") == "true":
        return None
    return (
        f"{key}: is not unique, and the mapping upserts contacts on it (hubspot.upsert_by). "
        "HubSpot cannot make an existing property unique: delete the property and run "
        "instruqt-crm setup hubspot again, or upsert by email"
    )


def property_create(name: str, mapping: Mapping) -> PropertyCreate:
    """The HubSpot definition of one mapped property."""
    spec = mapping.properties[name]
    hub_type, field_type = TYPES[spec.type]
    options = None
    if hub_type == "bool":
        options = [
            Option(label="Yes", value="true", display_order=0, hidden=False),
            Option(label="No", value="false", display_order=1, hidden=False),
        ]
    return PropertyCreate(
        name=name,
        label=spec.label,
        type=hub_type,
        field_type=field_type,
        group_name=GROUP,
        description=spec.description or "",
        options=options,
        has_unique_value=(name == mapping.identity.match_key and hub_type == "string") or None,
        form_field=False,
    )


def apply(adapter: HubSpotAdapter, mapping: Mapping, steps: Plan) -> list[str]:
    """Create the group and the missing properties; returns what was created."""
    created = []
    properties = adapter.client.crm.properties
    if steps.create_group:
        group = PropertyGroupCreate(name=GROUP, label=GROUP_LABEL, display_order=-1)
        try:
            adapter.call(
                "create property group",
                properties.groups_api.create_with_http_info,
                "contacts",
                group,
            )
            created.append(f"group {GROUP}")
        except PermanentError as exc:
            if exc.category != Category.CONFLICT:  # an existing group is fine
                raise
    for name in steps.create:
        adapter.call(
            "create property",
            properties.core_api.create_with_http_info,
            "contacts",
            property_create(name, mapping),
        )
        created.append(name)
    return created
