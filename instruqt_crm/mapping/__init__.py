"""The YAML mapping: load and validate it, turn events into property changes, merge them."""

from .apply import DEVELOPER_PLAY, apply_event, skip_reason
from .errors import MappingError
from .loader import load_mapping, parse_mapping
from .merge import POLICIES, canonical_policy, cell_value, fold, merge_cells, to_cell
from .model import (
    EventClass,
    Identity,
    Mapping,
    PlaysOptions,
    PropertySpec,
    Rule,
    RuleProperty,
)
from .values import PropertyChange, Value, ValueType

__all__ = [
    "DEVELOPER_PLAY",
    "POLICIES",
    "EventClass",
    "Identity",
    "Mapping",
    "MappingError",
    "PlaysOptions",
    "PropertyChange",
    "PropertySpec",
    "Rule",
    "RuleProperty",
    "Value",
    "ValueType",
    "apply_event",
    "canonical_policy",
    "cell_value",
    "fold",
    "load_mapping",
    "merge_cells",
    "parse_mapping",
    "skip_reason",
    "to_cell",
]
