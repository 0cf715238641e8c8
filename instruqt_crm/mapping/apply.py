"""Apply a mapping to one event: the property changes it causes, or a MappingFailure."""

from __future__ import annotations

from typing import Any

from instruqt_crm.errors import MappingFailure
from instruqt_crm.events import Event

from .model import Mapping
from .templates import RenderError, render, template_context, truthy
from .values import PropertyChange, coerce


def _render(source: str, context: dict[str, Any], where: str) -> str:
    """Render one template; a failure names where it is (the rule and property, the skip)."""
    try:
        return render(source, context)
    except RenderError as exc:
        raise MappingFailure(f"{where}: template failed: {exc}") from exc


DEVELOPER_PLAY = "developer_play"


def skip_reason(mapping: Mapping, event: Event, email: str | None) -> str | None:
    """Why the mapping skips this (mapped) event: ``developer_play`` or the name of the first
    ``skip`` condition that holds; None when it is not skipped."""
    if mapping.skip_developer_plays and event.is_developer_play:
        return DEVELOPER_PLAY
    if not mapping.skip:
        return None
    context = template_context(event, email)
    for name, condition in mapping.skip.items():
        if truthy(_render(condition, context, f"skip {name!r}")):
            return name
    return None


def apply_event(
    mapping: Mapping,
    event: Event,
    email: str | None,
    names: tuple[str | None, str | None] = (None, None),
) -> list[PropertyChange]:
    """Every property change the mapping's rules make for ``event`` (none if not mapped);
    ``names``: the learner's first and last name, when Instruqt gave them."""
    if mapping.classify(event.type) != "mapped":
        return []
    context = template_context(event, email, names)
    changes: list[PropertyChange] = []
    for pattern, rule in mapping.rules_for(event.type):
        where = f"rule {pattern!r}"
        if rule.when is not None and not truthy(_render(rule.when, context, f"{where}, when")):
            continue
        for name, prop in rule.properties.items():
            text = _render(prop.value, context, f"{where}, property {name!r}")
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
