"""Operating commands: `replay`, `trace` and `status`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import redis

from instruqt_crm import keys
from instruqt_crm.engine import identity, ledger
from instruqt_crm.engine.inbox import enqueue_event
from instruqt_crm.events import EventError, check_readable
from instruqt_crm.journal import trail
from instruqt_crm.keys import text
from instruqt_crm.mapping import Mapping, cell_value
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


def _ledger_view(conn: redis.Redis, key: str, mapping: Mapping | None) -> dict[str, dict]:
    """A contact's merged values and which of them are not yet sent."""
    cells = ledger.cells(conn, key)
    if mapping is None:
        return {"values": {}, "pending": {}, "cells": cells}
    values = {}
    for name, cell in cells.items():
        spec = mapping.properties.get(name)
        if spec is not None:
            values[name] = cell_value(spec.merge, cell, spec.type)
    found = ledger.pending(conn, key, mapping).change
    return {"values": values, "pending": found.properties if found else {}, "cells": cells}


@click.command("trace", short_help="Show a learner's trail, values and waiting events.")
@click.argument("who", metavar="EMAIL|USER_ID")
@click.option("--limit", default=200, show_default=True, help="Trail entries shown (newest).")
@json_option
def trace_command(who: str, limit: int, as_json: bool) -> None:
    """Show a learner's trail: events, changes, what was sent, the CRM's answers, values, waits."""
    settings = settings_or_exit()
    conn = redis_for(settings)
    mapping = optional_mapping(settings)
    email = trail.resolve(conn, who)
    user_id = None if "@" in who else who.strip()
    if email and user_id is None:
        stored = conn.hget(keys.contact(email), "user_id")
        user_id = text(stored) if stored else None
    entries = trail.entries(conn, who, limit)
    view = (
        _ledger_view(conn, email, mapping) if email else {"values": {}, "pending": {}, "cells": {}}
    )
    waiting = identity.parked_events(conn, user_id) if user_id else []
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
            }
        )
        return
    click.echo(
        f"Learner {email or '(email unknown)'}" + (f" (Instruqt user {user_id})" if user_id else "")
    )
    click.echo("Trail, oldest first:" if entries else "Trail: empty")
    for entry in entries:
        click.echo(trail.describe(entry))
    if view["values"] or view["cells"]:
        shown = view["values"] or view["cells"]
        width = max(len(name) for name in shown)
        click.echo("Values in the ledger:")
        for name, value in shown.items():
            state = "not sent yet" if name in view["pending"] else "sent"
            click.echo(f"  {name:<{width}}  {json.dumps(value)}  ({state})")
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
