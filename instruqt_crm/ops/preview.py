"""What a mapping would make of some events, without Redis or a CRM: a pure in-memory fold.

Also the event-file reading shared with ``replay``: a file holds one event object, a JSON
list of them, or JSON lines; an item may be a bare Instruqt event or a Svix message
(``{"id": "msg_...", "eventType": ..., "payload": {...}}``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instruqt_crm.engine.identity import email_in
from instruqt_crm.errors import MappingFailure
from instruqt_crm.events import EventError, parse_event
from instruqt_crm.mapping import (
    Mapping,
    apply_event,
    cell_value,
    merge_cells,
    skip_reason,
    to_cell,
)
from instruqt_crm.mapping.merge import Cell
from instruqt_crm.mapping.values import Value

ID_FIELDS = ("svix_id", "svix-id", "msg_id", "message_id")
WAITING = "unknown — would wait for identity"


@dataclass(frozen=True)
class Item:
    """One event read from a file: where it was, its body, its message id, or why it is unusable."""

    where: str
    body: Any = None
    message_id: str | None = None
    error: str | None = None


def split_message(value: Any, id_field: str | None = None) -> tuple[Any, str | None]:
    """The event body and its delivery id (from ``id_field``, a Svix message, or known fields)."""
    if isinstance(value, dict) and isinstance(value.get("payload"), dict) and "eventType" in value:
        message_id = value.get(id_field or "id")
        return value["payload"], str(message_id) if message_id not in (None, "") else None
    if not isinstance(value, dict):
        return value, None
    if id_field is not None:
        found = value.get(id_field)
        return value, str(found) if found not in (None, "") else None
    for name in ID_FIELDS:
        if value.get(name) not in (None, ""):
            return value, str(value[name])
    raw_id = value.get("id")
    if isinstance(raw_id, str) and raw_id.startswith("msg_"):  # a review's own id is not one
        return value, raw_id
    return value, None


def stable_id(body: Any) -> str:
    """A delivery id derived from the event's content (the same event always gets the same id)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "replay-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _item(where: str, value: Any, id_field: str | None) -> Item:
    body, message_id = split_message(value, id_field)
    return Item(where, body, message_id)


def parse_lines(lines: Iterable[str], name: str, id_field: str | None = None) -> list[Item]:
    """JSON lines: one item per non-blank line, an error item for a line that is not JSON."""
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            items.append(_item(where, json.loads(line), id_field))
        except ValueError as exc:
            items.append(Item(where, error=f"not JSON ({getattr(exc, 'msg', exc)})"))
    return items


class EventFileError(ValueError):
    """An event file that cannot be read as text."""


def read_text(path: Path) -> str:
    """A file's UTF-8 text; EventFileError naming the first bad line otherwise."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise EventFileError(f"{path}:{line}: not UTF-8 text") from None


def read_items(path: Path, id_field: str | None = None) -> list[Item]:
    """Every event in a file: one JSON object, a JSON list, or JSON lines."""
    content = read_text(path)
    try:
        whole = json.loads(content)
    except ValueError:
        return parse_lines(content.splitlines(), str(path), id_field)
    if isinstance(whole, list):
        return [_item(f"{path}[{i}]", value, id_field) for i, value in enumerate(whole)]
    return [_item(str(path), whole, id_field)]


@dataclass
class Contact:
    """One learner's folded cells, as the ledger would hold them."""

    email: str | None
    user_ids: set[str] = field(default_factory=set)
    events: list[str] = field(default_factory=list)
    cells: dict[str, Cell] = field(default_factory=dict)

    def values(self, mapping: Mapping) -> dict[str, Value]:
        """The values the CRM would receive, in the mapping's property order."""
        found = {}
        for name, spec in mapping.properties.items():
            value = cell_value(spec.merge, self.cells.get(name), spec.type)
            if value is not None:
                found[name] = value
        return found


@dataclass
class Preview:
    """The result of previewing events: contacts by email, learners waiting, the rest."""

    contacts: dict[str, Contact] = field(default_factory=dict)
    waiting: dict[str, Contact] = field(default_factory=dict)  # by user id
    ignored: list[tuple[str, str]] = field(default_factory=list)  # where, type
    unknown: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # where, the condition
    failed: list[tuple[str, str]] = field(default_factory=list)  # where, reason
    mapped: int = 0

    def as_dict(self, mapping: Mapping) -> dict[str, Any]:
        """JSON-ready form."""

        def contact(c: Contact) -> dict[str, Any]:
            return {
                "email": c.email,
                "user_ids": sorted(c.user_ids),
                "events": c.events,
                "properties": c.values(mapping),
            }

        return {
            "mapping": mapping.source,
            "contacts": [contact(c) for c in self.contacts.values()],
            "waiting_for_identity": [contact(c) for c in self.waiting.values()],
            "mapped": self.mapped,
            "ignored": [{"where": w, "type": t} for w, t in self.ignored],
            "unknown": [{"where": w, "type": t} for w, t in self.unknown],
            "skipped": [{"where": w, "reason": r} for w, r in self.skipped],
            "failed": [{"where": w, "reason": r} for w, r in self.failed],
        }


def preview(
    mapping: Mapping,
    items: Iterable[Item],
    email: str | None = None,
    emails: dict[str, str] | None = None,
) -> Preview:
    """Fold events through the mapping per learner, as the workers would (nothing stored);
    ``emails`` are Instruqt's by user id (they outrank parameter emails, as in the workers),
    ``email`` is for learners no event names an email for."""
    result = Preview()
    events = []
    for item in items:
        if item.error is not None:
            result.failed.append((item.where, item.error))
            continue
        try:
            events.append((item.where, parse_event(item.message_id or item.where, item.body)))
        except EventError as exc:
            result.failed.append((item.where, str(exc)))
    known: dict[str, str] = {}  # user id -> email seen in any event's parameters
    for _, event in events:
        found = email_in(event.params, mapping.identity.email_params)
        if found and event.user_id:
            known.setdefault(event.user_id, found)
    fallback = email.strip().lower() if email else None
    for where, event in events:
        kind = mapping.classify(event.type)
        if kind != "mapped":
            (result.ignored if kind == "ignored" else result.unknown).append((where, event.type))
            continue
        who = (emails or {}).get(event.user_id or "")
        who = who or email_in(event.params, mapping.identity.email_params)
        who = who or known.get(event.user_id or "") or fallback
        try:
            skipped = skip_reason(mapping, event, who)
        except MappingFailure as exc:
            result.failed.append((where, exc.reason))
            continue
        if skipped is not None:
            result.skipped.append((where, skipped))
            continue
        if who is None and not event.user_id:
            result.failed.append((where, "no user_id and no email: the learner is unknown"))
            continue
        try:
            changes = apply_event(mapping, event, who)
            cells = [(change, to_cell(change)) for change in changes]
        except (MappingFailure, ValueError) as exc:
            result.failed.append((where, getattr(exc, "reason", str(exc))))
            continue
        group = result.contacts if who else result.waiting
        key = who or event.user_id or ""
        contact = group.setdefault(key, Contact(who))
        contact.events.append(event.id)
        if event.user_id:
            contact.user_ids.add(event.user_id)
        for change, cell in cells:
            contact.cells[change.name] = merge_cells(
                change.policy, contact.cells.get(change.name), cell
            )
        result.mapped += 1
    return result


def _counted(pairs: list[tuple[str, str]]) -> str:
    """``a (2), b`` from (where, type) pairs."""
    tally: dict[str, int] = {}
    for _, kind in pairs:
        tally[kind] = tally.get(kind, 0) + 1
    return ", ".join(f"{kind} ({n})" if n > 1 else kind for kind, n in sorted(tally.items()))


def render(result: Preview, mapping: Mapping) -> list[str]:
    """A human-readable table: each contact's values, then what was left out and why."""
    lines: list[str] = []
    groups = [(c.email or "", c) for c in result.contacts.values()]
    groups += [(WAITING, c) for c in result.waiting.values()]
    for title, contact in groups:
        users = ", ".join(sorted(contact.user_ids)) or "no user id"
        count = len(contact.events)
        lines.append(f"{title}  (user {users}; {count} event{'s' if count != 1 else ''})")
        values = contact.values(mapping)
        width = max((len(name) for name in values), default=0)
        lines += [f"  {name:<{width}}  {json.dumps(v)}" for name, v in values.items()]
        if not values:
            lines.append("  (no property values)")
        lines.append("")
    total = result.mapped + len(result.ignored) + len(result.unknown) + len(result.failed)
    total += len(result.skipped)
    lines.append(
        f"{total} event(s): {result.mapped} mapped, {len(result.ignored)} ignored, "
        f"{len(result.unknown)} unknown, {len(result.skipped)} skipped, {len(result.failed)} failed"
    )
    if result.ignored:
        lines.append(f"  ignored by the mapping: {_counted(result.ignored)}")
    if result.unknown:
        lines.append(f"  not mapped (no rule matches): {_counted(result.unknown)}")
    if result.skipped:
        lines.append(f"  skipped by a mapping condition: {_counted(result.skipped)}")
    lines += [f"  {where}: {reason}" for where, reason in result.failed]
    return lines
