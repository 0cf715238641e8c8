"""What a learner's Contact or Lead holds, as text the ledger reads (``ReadsCurrentValues``).

A learner new to the ledger (never seen, or back after its state expired) is read before its
first write: the Router's lookup selects the mapped fields too, so the read is the lookup the
write needs anyway (one SOQL query per object and batch). A query answers field API names and
JSON values (numbers as doubles, DateTime as ``2026-11-08T22:58:42.000+0000``, null for an empty
field); ``record_values`` turns them into the mapping's property names and the text forms its
types read.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingOf
from typing import Any

from instruqt_crm.events import EventError, format_timestamp, parse_timestamp
from instruqt_crm.mapping import Mapping

from .salesforce_routing import Found


def read_value(value: Any, value_type: str) -> str | None:
    """A field's value as a query answers it, as text of the mapping's ``value_type`` (None:
    empty): numbers as they are (``3.0`` → ``3``), checkboxes true/false, a DateTime as ISO 8601
    UTC with ``Z``, text and dates as they are."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    if value_type != "datetime":
        return text
    try:
        return format_timestamp(parse_timestamp(text))
    except (EventError, ValueError, OverflowError):
        return text  # not a time: the ledger ignores what the mapping's type cannot read


def record_values(found: Found, fields: MappingOf[str, str], mapping: Mapping) -> dict[str, str]:
    """A record's non-empty ``fields`` (property name → API name) as text of the property's
    type, by property name."""
    answered = {name.lower(): value for name, value in found.fields.items()}  # the org's case
    values = {}
    for prop, api_name in fields.items():
        spec = mapping.properties.get(prop)
        text = read_value(answered.get(api_name.lower()), spec.type if spec else "string")
        if text is not None:
            values[prop] = text
    return values
