"""Apply a mapping to one event: the property changes it causes, or a MappingFailure."""

from __future__ import annotations

from typing import Any

from instruqt_crm.errors import MappingFailure
from instruqt_crm.events import Event

from .model import Mapping
from .templates import RenderError, render, template_context, truthy
from .values import PropertyChange, coerce


def _render(source: str, context: dict[str, Any], pattern: str, what: str) -> str:
    """Render one template; a failure names the rule and the property."""
    try:
        return render(source, context)
    except RenderError as exc:
        raise MappingFailure(f"rule {pattern!r}, {what}: template failed: {exc}") from exc


def apply_event(mapping: Mapping, event: Event, email: str | None) -> list[PropertyChange]:
    """Every property change the mapping's rules make for ``event`` (none if not mapped)."""
    if mapping.classify(event.type) != "mapped":
        return []
    context = template_context(event, email)
    changes: list[PropertyChange] = []
    for pattern, rule in mapping.rules_for(event.type):
        if rule.when is not None and not truthy(_render(rule.when, context, pattern, "when")):
            continue
        for name, prop in rule.properties.items():
            text = _render(prop.value, context, pattern, f"property {name!r}")
            if not text:
                continue
            spec = mapping.properties[name]
            try:
                value = coerce(text, spec.input_type)
            except ValueError as exc:
                reason = f"rule {pattern!r}, property {name!r}: {exc} (declared type {spec.type})"
                raise MappingFailure(reason) from exc
            changes.append(PropertyChange(name, spec.merge, value, event.timestamp))
    return changes
