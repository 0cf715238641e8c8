"""Which event fields templates read, and which fields the events they apply to carry.

A template reading a field that no event of its rule's types carries renders nothing, so the
property is never written: ``checks`` refuses it, naming the field and the closest one those
events do carry. The fields of each documented type are ``events.EVENT_FIELDS``; a mapping
adds those its events carry beyond them under ``extra_event_fields``.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from jinja2 import nodes

from instruqt_crm.events import EVENT_FIELDS, KNOWN_TYPES

from .errors import suggest
from .templates import ENV

DICT_METHODS = frozenset({"get", "items", "keys", "values"})  # event.get('x') reads x


def fields_read(source: str) -> list[str]:
    """The top-level fields of ``event`` a template reads (``event.x``, ``event['x']``,
    ``event.get('x')``), sorted; none for a template that cannot be parsed (reported apart)."""
    try:
        ast = ENV.parse(source)
    except Exception:  # a syntax error is reported by the template check
        return []
    found: set[str] = set()
    for node in ast.find_all(nodes.Getattr):  # event._x is no field: the sandbox refuses it
        if _is_event(node.node) and node.attr not in DICT_METHODS and node.attr[:1] != "_":
            found.add(node.attr)
    for item in ast.find_all(nodes.Getitem):
        if _is_event(item.node) and isinstance(item.arg, nodes.Const):
            found.add(str(item.arg.value))
    for call in ast.find_all(nodes.Call):
        target, args = call.node, call.args
        if not (isinstance(target, nodes.Getattr) and target.attr == "get"):
            continue
        if _is_event(target.node) and args and isinstance(args[0], nodes.Const):
            found.add(str(args[0].value))
    return sorted(found)


def _is_event(node: nodes.Node) -> bool:
    """Whether a node is the template's ``event`` name."""
    return isinstance(node, nodes.Name) and node.name == "event"


def documented_types(pattern: str) -> list[str]:
    """The documented event types a rule's pattern matches."""
    return [t for t in KNOWN_TYPES if fnmatchcase(t, pattern)]


def carried(event_types: Iterable[str], extra: Iterable[str] = ()) -> frozenset[str]:
    """Every field some event of these (documented) types carries, and the ``extra`` ones."""
    return frozenset(extra).union(*(EVENT_FIELDS[t] for t in event_types))


def missing_field(field: str, label: str, fields: frozenset[str]) -> str:
    """Why ``event.<field>`` renders nothing for events of ``label``, with the closest field
    they carry, or which types carry it."""
    hint = suggest(field, fields)
    if not hint:
        others = sorted(t for t, names in EVENT_FIELDS.items() if field in names)
        hint = (
            f" ({', '.join(others)} events carry it)"
            if others
            else "; if your events carry it, list it under extra_event_fields"
        )
    return f"event.{field}: no {label} event carries it, so this never writes anything{hint}"
