"""Operating commands: `replay`, `trace` and `status`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import redis

from instruqt_crm.engine import identity, ledger
from instruqt_crm.engine.inbox import enqueue_event
from instruqt_crm.events import EventError, check_readable
from instruqt_crm.journal import trail
from instruqt_crm.mapping import Mapping
from instruqt_crm.ops import preview, status

from .common import (
    json_option,
    optional_mapping,
    print_json,
    redis_for,
    settings_or_exit,
)


@click.command(short_help="Enqueue exported events, skipping repeats.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--id-field",
    default=None,
    help="Field holding each event's delivery id (default: svix_id, msg_id, message_id, "
    "or an id starting with msg_; else a hash of the event).",
)
def replay(file: Path, id_field: str | None) -> None:
    """Enqueue exported events (JSON lines) as the receiver does, skipping ids already seen."""
    settings = settings_or_exit()
    try:
        items = preview.parse_lines(preview.read_text(file).splitlines(), str(file), id_field)
    except preview.EventFileError as exc:
        raise click.ClickException(str(exc)) from None
    conn = redis_for(settings)
    queued = duplicates = 0
    invalid: list[tuple[str, str]] = []
    with click.progressbar(items, label=f"Replaying {file.name}", file=sys.stderr) as bar:
        for item in bar:
            message_id = item.message_id or preview.stable_id(item.body)
            try:
                if item.error is not None:
                    raise EventError(item.error)
                check_readable(item.body)  # what the receiver would refuse at the door
                done = enqueue_event(conn, message_id, item.body, settings.dedupe_ttl_seconds)
            except EventError as exc:
                invalid.append((item.where, str(exc)))
                continue
            except redis.RedisError as exc:
                raise click.ClickException(
                    f"Redis failed at {item.where} ({queued} queued so far): {exc}"
                ) from None
            duplicates += not done
            queued += done
    click.echo(
        f"{file}: {queued} queued, {duplicates} duplicate(s) skipped, {len(invalid)} invalid"
    )
    for where, reason in invalid:
        click.echo(f"  {where}: {reason}")
    if invalid:
        raise click.exceptions.Exit(1)


def crm_values(entries: list[dict]) -> dict[str, object]:
    """The value the CRM last accepted for each property, from the trail's ``sent`` entries."""
    found: dict[str, object] = {}
    for entry in entries:  # oldest first: later sends win
        if entry.get("kind") == "sent" and isinstance(entry.get("properties"), dict):
            found.update(entry["properties"])
    return found


def _ledger_view(conn: redis.Redis, key: str, mapping: Mapping | None) -> dict[str, dict]:
    """A contact's merged values, which of them are not yet sent, and the CRM's values."""
    state = ledger.state(conn, key)
    cells, crm = state.cells, crm_values(trail.entries(conn, key))
    if mapping is None:
        return {"values": {}, "pending": {}, "cells": cells, "crm": crm}
    values = ledger.current_values(state, mapping)
    found = ledger.pending(conn, key, mapping).change
    pending = found.properties if found else {}
    return {"values": values, "pending": pending, "cells": cells, "crm": crm}


def value_line(name: str, view: dict[str, dict]) -> str:
    """One property as trace shows it: the CRM's value (as last accepted), and the ledger's
    when it differs or is not sent yet."""
    value, pending = view["values"].get(name), view["pending"]
    if name not in view["crm"]:
        shown = view["values"].get(name, view["cells"].get(name))
        return f"{json.dumps(shown)}  ({'not sent yet' if name in pending else 'sent'})"
    crm = json.dumps(view["crm"][name])
    if name in pending:
        return f"{crm}  (in the CRM; {json.dumps(pending[name])} not sent yet)"
    if value is None:
        return f"{crm}  (in the CRM; no stored value: the next event writing it sets it)"
    if value != view["crm"][name]:
        return f"{crm}  (in the CRM; the ledger holds {json.dumps(value)})"
    return f"{crm}  (in the CRM)"


@click.command("trace", short_help="Show a learner's trail, values and waiting events.")
@click.argument("who", metavar="EMAIL|USER_ID")
@click.option("--limit", default=200, show_default=True, help="Trail entries shown (newest).")
@json_option
def trace_command(who: str, limit: int, as_json: bool) -> None:
    """Show a learner's trail: events, changes, what was sent, the CRM's answers, values, waits."""
    settings = settings_or_exit()
    conn = redis_for(settings)
    mapping = optional_mapping(settings)
    email = identity.email_of(conn, who)
    user_id = None if "@" in who else who.strip()
    if email and user_id is None:
        user_id = ledger.state(conn, email).user_id
    entries = trail.entries(conn, email, limit) if email else []
    empty: dict[str, dict] = {"values": {}, "pending": {}, "cells": {}, "crm": {}}
    view = _ledger_view(conn, email, mapping) if email else empty
    waiting = identity.parked_events(conn, user_id) if user_id else []
    held = bool(email) and ledger.is_held(conn, str(email))
    if not entries and not view["cells"] and not waiting:
        raise click.ClickException(
            f"nothing known about {who} (no trail, values or waiting events)"
        )
    if as_json:
        parked = [{"event_id": i, "body": b} for i, b in waiting]
        print_json(
            {
                "email": email,
                "user_id": user_id,
                "trail": entries,
                "ledger": view,
                "waiting": parked,
                "held_for_backfill": held,
            }
        )
        return
    click.echo(
        f"Learner {email or '(email unknown)'}" + (f" (Instruqt user {user_id})" if user_id else "")
    )
    click.echo("Trail, oldest first:" if entries else "Trail: empty")
    for entry in entries:
        click.echo(trail.describe(entry))
    names = sorted({*view["crm"], *(view["values"] or view["cells"])})
    if names:
        width = max(len(name) for name in names)
        click.echo("Values (the CRM's as it last accepted them, and what the ledger holds):")
        for name in names:
            click.echo(f"  {name:<{width}}  {value_line(name, view)}")
    if held:
        click.echo("Held for a backfill: its values are sent when the backfill is done")
    if waiting:
        click.echo(f"Waiting for the learner's email: {len(waiting)} event(s)")
        for event_id, body in waiting:
            click.echo(f"  {event_id}  {body.get('type')}  {body.get('timestamp')}")


@click.command("status", short_help="Show queues, backlog, failures, counters, CRM budget.")
@json_option
def status_command(as_json: bool) -> None:
    """Show queues, dirty contacts, waiting learners, failures, counters, CRM budget."""
    settings = settings_or_exit()
    conn = redis_for(settings)
    figures = status.collect(conn, settings)
    if as_json:
        print_json(figures)
        return
    for line in status.render(figures):
        click.echo(line)
