"""Cross-reference checks a schema cannot express: declared properties, policies, patterns."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from instruqt_crm.events import KNOWN_TYPES

from .errors import short_repr, suggest
from .fields import carried, documented_types, fields_read, missing_field
from .values import coerce
from .yamlsource import Path

if TYPE_CHECKING:
    from .model import Mapping

OBJECTS: dict[str, tuple[str, ...]] = {
    "hubspot": ("contact",),
    "salesforce": ("Contact", "Lead", "auto"),
}
NAME_RULES: dict[str, tuple[re.Pattern[str], int, str]] = {
    "hubspot": (re.compile(r"[a-z][a-z0-9_]*"), 100, "lowercase letters, digits and _"),
    "salesforce": (
        re.compile(r"[A-Za-z](?:[A-Za-z0-9]|_(?!_))*(?<!_)(?:__c)?"),
        40,
        "a field API name such as Instruqt_User_Id__c",
    ),
}
IDENTITY_FIELDS = frozenset({"email", "Email"})
_GLOB_TEXT = re.compile(r"[A-Za-z0-9_.:*?\[\]!-]+")
_TEMPLATE_MARKS = ("{{", "{%", "{#")


@dataclass(frozen=True)
class Problem:
    """A message about ``path``; ``see`` points at a second place it involves."""

    path: Path
    message: str
    see: Path | None = None


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable event-type glob, or None."""
    if not pattern:
        return "empty event pattern"
    if not _GLOB_TEXT.fullmatch(pattern):
        return (
            f"{short_repr(pattern)} is not a glob: use letters, digits, '.', '_', '-' and "
            "the glob characters * ? [abc] (regular expressions and spaces are not supported)"
        )
    depth = 0
    for char in pattern:
        if char == "[":
            if depth:
                return f"{short_repr(pattern)}: '[' inside '[...]'"
            depth = 1
        elif char == "]":
            if not depth:
                return f"{short_repr(pattern)}: ']' without '['"
            depth = 0
    return f"{short_repr(pattern)}: '[' is never closed" if depth else None


def _is_glob(pattern: str) -> bool:
    """Whether a pattern uses glob characters."""
    return any(c in pattern for c in "*?[")


def _header_problems(m: Mapping) -> list[Problem]:
    """The object fits the CRM; property names fit the CRM; salesforce options fit."""
    problems = []
    objects = OBJECTS[m.crm]
    if m.object not in objects:
        hint = suggest(m.object, objects) or f"; {m.crm} supports {', '.join(objects)}"
        problems.append(
            Problem(("object",), f"unknown {m.crm} object {short_repr(m.object)}{hint}")
        )
    if not m.properties:
        problems.append(Problem(("properties",), "declare at least one property"))
    rule, longest, wording = NAME_RULES[m.crm]
    for name in m.properties:
        if name in IDENTITY_FIELDS:
            problems.append(
                Problem(("properties", name), "the email is the match key, not a property")
            )
        elif not rule.fullmatch(name) or len(name) > longest:
            message = f"not a {m.crm} property name: {wording}, at most {longest} characters"
            problems.append(Problem(("properties", name), message))
    problems += _hubspot_problems(m)
    if m.salesforce is not None:
        if m.crm != "salesforce":
            problems.append(Problem(("salesforce",), "only allowed when crm is salesforce"))
        elif m.object != "Contact":
            for field in ("LastName", "Company"):
                if not m.salesforce.lead_defaults.get(field, "").strip():
                    problems.append(
                        Problem(
                            ("salesforce", "lead_defaults"), f"{field} is required to create a Lead"
                        )
                    )
    return problems


def _property_problems(m: Mapping) -> list[Problem]:
    """Merge policies fit the declared types."""
    problems = []
    for name, spec in m.properties.items():
        if spec.merge == "union" and spec.type != "string":
            problems.append(
                Problem(("properties", name, "type"), "merge 'union' needs type string")
            )
        if spec.merge == "count" and spec.type != "number":
            problems.append(
                Problem(("properties", name, "type"), "merge 'count' needs type number")
            )
    return problems


def _hubspot_problems(m: Mapping) -> list[Problem]:
    """HubSpot options fit: upserting on the match key needs one, declared as a string."""
    if m.hubspot is None:
        return []
    if m.crm != "hubspot":
        return [Problem(("hubspot",), "only allowed when crm is hubspot")]
    if m.hubspot.upsert_by != "match_key":
        return []
    key = m.identity.match_key
    if key is None:
        return [Problem(("hubspot", "upsert_by"), "match_key needs identity.match_key set")]
    spec = m.properties.get(key)
    if spec is not None and spec.type != "string":
        message = f"HubSpot upserts only on unique string properties; {key} is a {spec.type}"
        return [Problem(("hubspot", "upsert_by"), message)]
    return []


def _identity_problems(m: Mapping) -> list[Problem]:
    """The identity section can produce an email and names only declared properties."""
    problems = []
    identity = m.identity
    if not identity.email_params and not identity.lookup:
        problems.append(
            Problem(("identity",), "no way to find an email: add email_params or lookup: true")
        )
    for index, param in enumerate(identity.email_params):
        if not param.strip():
            problems.append(Problem(("identity", "email_params", index), "empty parameter name"))
    key = identity.match_key
    if key is not None and key not in m.properties:
        problems.append(
            Problem(
                ("identity", "match_key"),
                f"match_key {key!r} is not declared under properties{suggest(key, m.properties)}",
            )
        )
    return problems


def _pattern_problems(m: Mapping) -> list[Problem]:
    """Every pattern is a glob; no exact rule is shadowed by an ignore pattern."""
    problems = []
    for index, pattern in enumerate(m.ignore):
        reason = pattern_problem(pattern)
        if reason:
            problems.append(Problem(("ignore", index), reason))
    for pattern in m.events:
        reason = pattern_problem(pattern)
        if reason:
            problems.append(Problem(("events", pattern), reason))
            continue
        shadow = m.ignored_by(pattern) if not _is_glob(pattern) else None
        if shadow is not None:
            where = ("ignore", m.ignore.index(shadow))
            message = f"this rule never applies: ignore pattern {shadow!r} matches it first"
            problems.append(Problem(("events", pattern), message, see=where))
    return problems


def _rule_problems(m: Mapping) -> list[Problem]:
    """Rules write only declared properties, with the declared policy and fitting constants."""
    problems = []
    for pattern, rule in m.events.items():
        if not rule.properties:
            message = "a rule needs at least one property (to skip an event type, use ignore)"
            problems.append(Problem(("events", pattern, "properties"), message))
        for name, prop in rule.properties.items():
            path: Path = ("events", pattern, "properties", name)
            spec = m.properties.get(name)
            if spec is None:
                hint = suggest(name, m.properties)
                message = f"property {name!r} is not declared under properties{hint}"
                problems.append(Problem(path, message))
                continue
            if prop.merge is not None and prop.merge != spec.merge:
                message = f"merge {prop.merge!r} conflicts with the declared merge {spec.merge!r}"
                problems.append(
                    Problem((*path, "merge"), message, see=("properties", name, "merge"))
                )
            if not prop.value.strip():
                problems.append(Problem(path, "empty value: this would never write anything"))
            elif not any(mark in prop.value for mark in _TEMPLATE_MARKS):
                try:
                    coerce(prop.value.strip(), spec.input_type)
                except ValueError as exc:
                    message = f"constant does not fit type {spec.input_type}: {exc}"
                    problems.append(Problem(path, message))
    return problems


PLAY_LISTS: tuple[str, ...] = ("completed", "stopped", "challenge_completed")


def _play_patterns(m: Mapping) -> list[tuple[Path, str]]:
    """Every event pattern of the plays section, with its key path."""
    options = m.salesforce.plays if m.salesforce is not None else None
    if options is None:
        return []
    return [
        (("salesforce", "plays", name, index), pattern)
        for name in PLAY_LISTS
        for index, pattern in enumerate(getattr(options, name))
    ]


def _plays_problems(m: Mapping) -> list[Problem]:
    """Play patterns are globs; an exact type must reach the plays (mapped, not ignored)."""
    problems = []
    for path, pattern in _play_patterns(m):
        reason = pattern_problem(pattern)
        if reason:
            problems.append(Problem(path, reason))
        elif m.plays is not None and not _is_glob(pattern):
            kind = m.classify(pattern)
            if kind == "ignored":
                shadow = m.ignored_by(pattern) or ""
                message = (
                    f"play records never see {pattern!r}: ignore pattern {shadow!r} matches it"
                )
                problems.append(Problem(path, message, see=("ignore", m.ignore.index(shadow))))
            elif kind == "unknown":
                message = (
                    f"play records never see {pattern!r}: no rule under events matches it "
                    "(only mapped events reach the plays)"
                )
                problems.append(Problem(path, message))
    return problems


def mapping_problems(m: Mapping) -> list[Problem]:
    """Everything wrong with a structurally valid mapping."""
    return [
        *_header_problems(m),
        *_property_problems(m),
        *_identity_problems(m),
        *_pattern_problems(m),
        *_rule_problems(m),
        *_plays_problems(m),
        *_skip_problems(m),
        *_field_problems(m),
    ]


def _field_problems(m: Mapping) -> list[Problem]:
    """Templates read only event fields that events of their rules' documented types carry
    (rules matching no documented type are not checked); skip conditions, those of any
    mapped type."""
    problems = []
    for pattern, rule in m.events.items():
        types = [t for t in documented_types(pattern) if m.ignored_by(t) is None]
        if not types:
            continue
        where: list[tuple[Path, str]] = [(("events", pattern, "when"), rule.when or "")]
        for name, prop in rule.properties.items():
            where.append((("events", pattern, "properties", name), prop.value))
        problems += _unread(where, repr(pattern), carried(types, m.extra_event_fields))
    mapped = [t for t in KNOWN_TYPES if m.classify(t) == "mapped"]
    if mapped:
        where = [(("skip", name), condition) for name, condition in m.skip.items()]
        problems += _unread(where, "mapped", carried(mapped, m.extra_event_fields))
    for index, field in enumerate(m.extra_event_fields):
        if not field.strip():
            problems.append(Problem(("extra_event_fields", index), "empty field name"))
    return problems


def _unread(templates: list[tuple[Path, str]], label: str, fields: frozenset[str]) -> list[Problem]:
    """A problem for each event field a template reads that none of ``fields`` is."""
    return [
        Problem(path, missing_field(field, label, fields))
        for path, source in templates
        for field in fields_read(source)
        if field not in fields
    ]


SKIP_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


def _skip_problems(m: Mapping) -> list[Problem]:
    """Skip conditions are counted under their names: short snake_case, not a built-in."""
    problems = []
    for name in m.skip:
        if not SKIP_NAME.fullmatch(name):
            message = f"skip name {short_repr(name)}: use lowercase letters, digits and _"
            problems.append(Problem(("skip", name), message))
        elif name == "developer_play":
            message = "'developer_play' is built in: use skip_developer_plays instead"
            problems.append(Problem(("skip", name), message))
    return problems


def mapping_warnings(m: Mapping) -> list[Problem]:
    """Valid but suspicious: exact event types Instruqt does not document (typos?), declared
    properties no rule writes."""
    places: list[tuple[Path, str]] = [(("events", p), p) for p in m.events]
    places += [(("ignore", index), p) for index, p in enumerate(m.ignore)]
    places += _play_patterns(m)
    warnings = []
    for path, pattern in places:
        if not _is_glob(pattern) and pattern not in KNOWN_TYPES:
            hint = suggest(pattern, KNOWN_TYPES)
            message = f"{pattern!r} is not a documented Instruqt event type{hint}"
            warnings.append(Problem(path, message))
    written = {name for rule in m.events.values() for name in rule.properties}
    for name in m.properties:
        if name not in written:
            message = "no rule under events writes it: it is never sent (a rule could, or drop it)"
            warnings.append(Problem(("properties", name), message))
    return warnings
