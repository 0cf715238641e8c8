"""Per-play state in Redis: merged cells per participant id, values last sent, the dirty set.

A *play* is one learner's play of one track (Instruqt's ``participant_id``). One hash per play
(``instruqt_crm:play:<participant id>``) holds ``c:<cell>`` (merged cells, JSON, joined with
the mapping's merge policies, so the order and repetition of events never matter),
``s:<field>`` (the value the CRM last accepted), the learner's ``email`` and ``user_id``, and
``version`` (bumped by every merge that changed a cell); it lives ``STATE_IDLE_DAYS`` after
the play's last event. Changed plays wait in the
``plays:dirty`` sorted set; ``flush_plays`` sends them after the learner records, whose Ids
their lookups need, through the adapter's play writer (``PlayRecords``; only Salesforce has one).

Fields: ``track`` (slug, else id), ``status`` (Completed beats Stopped beats Started),
``started_at`` (the play's earliest event), ``completed_at`` (earliest completion),
``challenges_completed`` (distinct challenge ids completed), ``minutes_spent`` (Instruqt's
``duration`` when an event carried one, else from the start to the completion, else to the
stop, else to the latest event; rounded to whole minutes).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import redis

from instruqt_crm import keys
from instruqt_crm.crm.base import ContactChange, Value
from instruqt_crm.events import Event, format_timestamp, parse_timestamp
from instruqt_crm.keys import text
from instruqt_crm.mapping import Mapping, PlaysOptions, PropertyChange, cell_value

from . import records
from .records import Merge, Pending

CELLS: dict[str, str] = {  # cell -> merge policy
    "track_slug": "min",
    "track_id": "min",
    "started_at": "min",
    "last_at": "max",
    "completed_at": "min",
    "stopped_at": "min",
    "challenges": "count",
    "duration": "max",  # seconds played, as Instruqt reports them on completion or stop
}


PLAYS = records.Records(keys.play, keys.DIRTY_PLAYS)
Settle = tuple[str, str, dict[str, Value] | None]  # participant, version, fields the CRM took


def _given(value: Any) -> str | None:
    """An event value as text, or None when it is missing or empty."""
    return None if value is None or isinstance(value, dict | list) or value == "" else str(value)


def _matches(patterns: Sequence[str], event_type: str) -> bool:
    return any(fnmatchcase(event_type, pattern) for pattern in patterns)


def event_cells(options: PlaysOptions, event: Event) -> list[PropertyChange]:
    """What one event tells about its play, one change per cell."""
    body = event.body
    moment = format_timestamp(event.timestamp)
    found: dict[str, str | float] = {"started_at": moment, "last_at": moment}
    for name in ("track_slug", "track_id"):
        if (value := _given(body.get(name))) is not None:
            found[name] = value
    if _matches(options.completed, event.type):
        found["completed_at"] = moment
    if _matches(options.stopped, event.type):
        found["stopped_at"] = moment
    challenge = _given(body.get("challenge_id"))
    failed = str(body.get("completed")).lower() in ("false", "0")
    if challenge and not failed and _matches(options.challenge_completed, event.type):
        found["challenges"] = challenge
    if (seconds := _seconds(body.get("duration"))) is not None:
        found["duration"] = seconds
    return [
        PropertyChange(name, CELLS[name], value, event.timestamp) for name, value in found.items()
    ]


def play_merge(mapping: Mapping, event: Event, email: str) -> Merge | None:
    """What an event merges into its play; None when the mapping writes no play records or
    the event has no participant id."""
    participant = _given(event.body.get("participant_id"))
    if mapping.plays is None or participant is None:
        return None
    changes = event_cells(mapping.plays, event)
    return Merge(participant, changes, event.id, email, event.user_id)


def merge_many(conn: redis.Redis, merges: Sequence[Merge], idle_seconds: int = 0) -> list[bool]:
    """Merge events into their plays at once (see ``records.merge_many``)."""
    return records.merge_many(conn, merges, PLAYS, idle_seconds) if merges else []


def merge_event(conn: redis.Redis, mapping: Mapping, event: Event, email: str) -> bool:
    """Merge one event into its play; True if the play changed (see ``play_merge``)."""
    found = play_merge(mapping, event, email)
    return found is not None and merge_many(conn, [found])[0]


def minutes_played(seconds: Value) -> int | None:
    """Whole minutes (rounded) of Instruqt's ``duration``."""
    return max(0, int((float(seconds) + 30) // 60)) if isinstance(seconds, int | float) else None


def minutes_between(start: Value, end: Value) -> int | None:
    """Whole minutes (rounded) from one ISO time to another; None without both."""
    if not isinstance(start, str) or not isinstance(end, str):
        return None
    seconds = (parse_timestamp(end) - parse_timestamp(start)).total_seconds()
    return max(0, int((seconds + 30) // 60))


def _seconds(value: Any) -> float | None:
    """A ``duration`` in seconds, or None when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def play_fields(cells: dict[str, Any]) -> dict[str, Value]:
    """A play record's field values from its merged cells (fields without a value left out)."""

    def value(cell: str, kind: str) -> Value:
        return cell_value(CELLS[cell], cells.get(cell), kind)

    started, completed = value("started_at", "datetime"), value("completed_at", "datetime")
    stopped = value("stopped_at", "datetime")
    fields: dict[str, Value] = {
        "track": value("track_slug", "string") or value("track_id", "string"),
        "status": "Completed" if completed else "Stopped" if stopped else "Started",
        "started_at": started,
        "completed_at": completed,
        "challenges_completed": value("challenges", "number") or 0,
        "minutes_spent": minutes_played(value("duration", "number"))
        if cells.get("duration") is not None
        else minutes_between(started, completed or stopped or value("last_at", "datetime")),
    }
    return {name: found for name, found in fields.items() if found is not None}


def cells(conn: redis.Redis, participant: str) -> dict[str, Any]:
    """A play's merged cells by name (for tests and the trace view)."""
    stored = conn.hgetall(keys.play(participant))
    return {text(k)[2:]: json.loads(v) for k, v in stored.items() if text(k).startswith("c:")}


def pending(conn: redis.Redis, participant: str) -> Pending:
    """The play's fields that differ from what the CRM last accepted (None: nothing to send)."""
    return pending_many(conn, [participant])[0]


def pending_many(conn: redis.Redis, participants: Sequence[str]) -> list[Pending]:
    """``pending`` for several plays, read in one round trip."""
    found = records.read(conn, participants, PLAYS)
    return [_unsent(p, stored) for p, stored in zip(participants, found, strict=True)]


def _unsent(participant: str, stored: dict[str, str]) -> Pending:
    """A play's pending change, from its hash."""
    merged = {name: json.loads(stored[f"c:{name}"]) for name in CELLS if f"c:{name}" in stored}
    unsent = {
        name: found
        for name, found in play_fields(merged).items()
        if f"s:{name}" not in stored or json.loads(stored[f"s:{name}"]) != found
    }
    version = stored.get("version", "0")
    if not unsent or "email" not in stored:
        return Pending(None, version)
    return Pending(
        ContactChange(participant, stored["email"], unsent, stored.get("user_id")), version
    )


def settle(
    conn: redis.Redis,
    participant: str,
    version: str,
    sent: dict[str, Value] | None = None,
    idle_seconds: int = 0,
) -> bool:
    """Record fields the CRM accepted; the play leaves the dirty set unless it changed since."""
    return records.settle(conn, participant, version, PLAYS, sent, idle_seconds)


def dirty(conn: redis.Redis, limit: int, offset: int = 0) -> list[str]:
    """Up to ``limit`` dirty participant ids from ``offset`` on, oldest first."""
    return [text(p) for p in conn.zrange(keys.DIRTY_PLAYS, offset, offset + limit - 1)]


def mark_dirty(conn: redis.Redis, participant: str) -> None:
    """Put a play back in the dirty set (to requeue it after a rejection)."""
    with conn.pipeline() as pipe:  # no TTL until it is sent
        pipe.zadd(keys.DIRTY_PLAYS, {participant: time.time()}, nx=True)
        pipe.persist(keys.play(participant))
        pipe.execute()


def dirty_count(conn: redis.Redis) -> int:
    """How many plays wait to be sent."""
    return int(conn.zcard(keys.DIRTY_PLAYS))


def settle_many(conn: redis.Redis, settles: Sequence[Settle], idle_seconds: int = 0) -> int:
    """Settle plays (participant, version, fields sent) in one round trip; how many stay dirty."""
    if not settles:
        return 0
    with conn.pipeline(transaction=False) as pipe:
        for participant, version, sent in settles:
            records.queue_settle(pipe, participant, version, PLAYS, sent, idle_seconds)
        return sum(not reply for reply in pipe.execute())
