"""Per-play state in Redis: merged cells per participant id, values last sent, the dirty set.

A *play* is one learner's play of one track (Instruqt's ``participant_id``). One hash per play
(``instruqt_crm:play:<participant id>``) holds ``c:<cell>`` (merged cells, JSON, joined with
the mapping's merge policies, so the order and repetition of events never matter),
``s:<field>`` (the value the CRM last accepted), the learner's ``email`` and ``user_id``, and
``version`` (bumped by every merge that changed a cell). Changed plays wait in the
``plays:dirty`` sorted set; the flush sends them after the learner records, whose Ids their
lookups need, through the adapter's play writer (``PlayRecords``; only Salesforce has one).

Fields: ``track`` (slug, else id), ``status`` (Completed beats Stopped beats Started),
``started_at`` (the play's earliest event), ``completed_at`` (earliest completion),
``challenges_completed`` (distinct challenge ids completed), ``minutes_spent`` (from the start
to the completion, else to the stop, else to the latest event; rounded to whole minutes).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import redis

from . import failures, ledger
from .crm.base import ContactChange, CrmAdapter, PlayRecords, Value
from .events import Event, format_timestamp, parse_timestamp
from .ledger import Pending
from .mapping import Mapping, PlaysOptions, PropertyChange, cell_value
from .queueing import KEY_PREFIX, text

if TYPE_CHECKING:
    from .sync import FlushReport

log = logging.getLogger(__name__)
DIRTY_KEY = f"{KEY_PREFIX}plays:dirty"
CELLS: dict[str, str] = {  # cell -> merge policy
    "track_slug": "min",
    "track_id": "min",
    "started_at": "min",
    "last_at": "max",
    "completed_at": "min",
    "stopped_at": "min",
    "challenges": "count",
}


def play_key(participant: str) -> str:
    """The hash holding one play's state."""
    return f"{KEY_PREFIX}play:{participant}"


PLAYS = ledger.Records(play_key, DIRTY_KEY)  # merged like contacts, without event ids
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
    found: dict[str, str] = {"started_at": moment, "last_at": moment}
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
    return [
        PropertyChange(name, CELLS[name], value, event.timestamp) for name, value in found.items()
    ]


def play_merge(mapping: Mapping, event: Event, email: str) -> ledger.Merge | None:
    """What an event merges into its play; None when the mapping writes no play records or
    the event has no participant id."""
    participant = _given(event.body.get("participant_id"))
    if mapping.plays is None or participant is None:
        return None
    changes = event_cells(mapping.plays, event)
    return ledger.Merge(participant, changes, event.id, email, event.user_id)


def merge_many(conn: redis.Redis, merges: Sequence[ledger.Merge]) -> list[bool]:
    """Merge events into their plays at once, as ``ledger.merge_many`` does for contacts."""
    return ledger.merge_many(conn, merges, PLAYS) if merges else []


def merge_event(conn: redis.Redis, mapping: Mapping, event: Event, email: str) -> bool:
    """Merge one event into its play; True if the play changed (see ``play_merge``)."""
    found = play_merge(mapping, event, email)
    return found is not None and merge_many(conn, [found])[0]


def minutes_between(start: Value, end: Value) -> int | None:
    """Whole minutes (rounded) from one ISO time to another; None without both."""
    if not isinstance(start, str) or not isinstance(end, str):
        return None
    seconds = (parse_timestamp(end) - parse_timestamp(start)).total_seconds()
    return max(0, int((seconds + 30) // 60))


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
        "minutes_spent": minutes_between(
            started, completed or stopped or value("last_at", "datetime")
        ),
    }
    return {name: found for name, found in fields.items() if found is not None}


def cells(conn: redis.Redis, participant: str) -> dict[str, Any]:
    """A play's merged cells by name (for tests and the trace view)."""
    stored = conn.hgetall(play_key(participant))
    return {text(k)[2:]: json.loads(v) for k, v in stored.items() if text(k).startswith("c:")}


def pending(conn: redis.Redis, participant: str) -> Pending:
    """The play's fields that differ from what the CRM last accepted (None: nothing to send)."""
    return pending_many(conn, [participant])[0]


def pending_many(conn: redis.Redis, participants: Sequence[str]) -> list[Pending]:
    """``pending`` for several plays, read in one round trip."""
    found = ledger.read(conn, participants, PLAYS)
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
    conn: redis.Redis, participant: str, version: str, sent: dict[str, Value] | None = None
) -> bool:
    """Record fields the CRM accepted; the play leaves the dirty set unless it changed since."""
    return ledger.settle(conn, participant, version, sent, PLAYS)


def dirty(conn: redis.Redis, limit: int, offset: int = 0) -> list[str]:
    """Up to ``limit`` dirty participant ids from ``offset`` on, oldest first."""
    return [text(p) for p in conn.zrange(DIRTY_KEY, offset, offset + limit - 1)]


def mark_dirty(conn: redis.Redis, participant: str) -> None:
    """Put a play back in the dirty set (to requeue it after a rejection)."""
    conn.zadd(DIRTY_KEY, {participant: time.time()}, nx=True)


def dirty_count(conn: redis.Redis) -> int:
    """How many plays wait to be sent."""
    return int(conn.zcard(DIRTY_KEY))


def flush_plays(
    conn: redis.Redis, adapter: CrmAdapter, report: FlushReport, deadline: float
) -> None:
    """Send dirty plays in batches until none is left or ``deadline`` (monotonic) passes.

    A play whose learner is still dirty waits for a later flush (its Contact or Lead may not
    exist yet); plays left when time runs out ask for another flush through ``report.wait``.
    """
    writer = adapter.play_adapter() if isinstance(adapter, PlayRecords) else None
    if writer is None:
        return
    offset, tally = 0, Counter[str]()
    while time.monotonic() < deadline:
        found = dirty(conn, writer.batch_size, offset)
        if not found:
            break
        offset += _send_batch(conn, writer, found, report, tally)
    else:  # out of time: unless the job is retried anyway, ask for another flush soon
        if dirty_count(conn) > offset and report.wait is None and not report.retry:
            report.wait = 1.0
    if tally:
        log.info(
            "plays: %d synced, %d rejected, %d to retry, %d waiting for their learner",
            tally["synced"],
            tally["rejected"],
            tally["retry"],
            tally["waiting"],
        )


def _send_batch(
    conn: redis.Redis,
    writer: CrmAdapter,
    participants: list[str],
    report: FlushReport,
    tally: Counter[str],
) -> int:
    """Send one batch of dirty plays and apply the outcomes; how many stay dirty. The plays
    and their learners are read in two round trips, the outcomes written in one."""
    from .sync import send  # late: sync imports this module

    found = dict(zip(participants, pending_many(conn, participants), strict=True))
    changed = [(p, f.change, f.version) for p, f in found.items() if f.change is not None]
    with conn.pipeline(transaction=False) as pipe:
        for _, change, _ in changed:
            pipe.zscore(ledger.DIRTY_KEY, change.email)
        learner_dirty = pipe.execute()
    kept = _settle_all(conn, [(p, f.version, None) for p, f in found.items() if f.change is None])
    batch = {}
    for (participant, change, version), score in zip(changed, learner_dirty, strict=True):
        if score is not None:  # its Contact or Lead may not exist yet: wait for it
            kept += 1
            tally["waiting"] += 1
        else:
            batch[participant] = (change, version)
    outcomes = send(writer, [change for change, _ in batch.values()], report) if batch else []
    settles: list[Settle] = []
    for outcome in outcomes:
        change, version = batch[outcome.key]
        tally[outcome.status] += 1
        if outcome.status == "retry":
            report.retry += 1
            kept += 1
            continue
        if outcome.status == "rejected":
            _reject(conn, change, outcome.reason, outcome.category)
        sent = change.properties if outcome.status == "synced" else None
        settles.append((change.key, version, sent))
    return kept + _settle_all(conn, settles)


def _settle_all(conn: redis.Redis, settles: Sequence[Settle]) -> int:
    """Settle plays (participant, version, fields sent) in one round trip; how many stay dirty."""
    if not settles:
        return 0
    with conn.pipeline(transaction=False) as pipe:
        for participant, version, sent in settles:
            ledger.queue_settle(pipe, participant, version, sent, PLAYS)
        return sum(not reply for reply in pipe.execute())


def _reject(conn: redis.Redis, change: ContactChange, reason: str, category: str) -> None:
    """Keep a rejected play visible and requeueable (``failed requeue``, or its next event)."""
    payload = {"participant_id": change.key, "email": change.email, "fields": change.properties}
    failures.record(
        conn, category or "validation", reason, f"play:{change.key}", ledger.encode(payload)
    )
    log.warning("play %s of %s rejected by the CRM: %s", change.key, change.email, reason)
