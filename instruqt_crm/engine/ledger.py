"""Per-contact state in Redis: merged property cells, values last sent, and the dirty set.

One hash per contact (``instruqt_crm:contact:<key>``) holds ``c:<property>`` (the merged
cell, JSON), ``s:<property>`` (the value last accepted by the CRM, JSON), ``email``,
``user_id``, the ``first_name`` and ``last_name`` Instruqt gave (if any), and ``version``
(bumped by every merge that changed something). Merges read the
cells, fold the changes in, and write with a script only if the version is unchanged (else
read again), so concurrent workers never lose an update; a contact whose cells changed is
put in the ``dirty`` sorted set (scored by when it first became dirty).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

from instruqt_crm import keys
from instruqt_crm.crm.base import ContactChange, Value
from instruqt_crm.keys import text
from instruqt_crm.mapping import Mapping, PropertyChange
from instruqt_crm.mapping.merge import cell_value, merge_cells, to_cell

log = logging.getLogger(__name__)
MAX_MERGE_ATTEMPTS = 50

# Record what the CRM accepted; leave the dirty set only if no merge happened since the
# values were read, else make sure the contact is (still) dirty so the newer values follow.
_SETTLE = """
local version = redis.call('HGET', KEYS[1], 'version') or '0'
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if version == ARGV[1] then redis.call('ZREM', KEYS[2], ARGV[2]) return 1 end
redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[2])
return 0
"""


# Merge a batch's changes: per record, write only if no merge changed it since it was read
# (same version); returns the 1-based positions of those that did, to be read and tried again.
# KEYS: the dirty set, then per record its hash and its events set (its hash again when event
# ids are not kept: it then has none to add). ARGV: plan (JSON), now.
_MERGE_MANY = """
local plan = cjson.decode(ARGV[1])
local conflicts = {}
for i, c in ipairs(plan) do
  local hash, events = KEYS[2 * i], KEYS[2 * i + 1]
  if (redis.call('HGET', hash, 'version') or '0') ~= c.version then
    conflicts[#conflicts + 1] = i
  else
    redis.call('HSET', hash, unpack(c.fields))
    for _, id in ipairs(c.events) do redis.call('SADD', events, id) end
    if c.changed then
      redis.call('HINCRBY', hash, 'version', 1)
      redis.call('ZADD', KEYS[1], 'NX', ARGV[2], c.key)
    end
  end
end
return conflicts
"""


def encode(value: Any) -> str:
    """A cell or sent value as stored: canonical JSON, so equal values compare equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Records:
    """A kind of versioned record merged here: where its hashes, dirty set and event ids live."""

    hash_key: Callable[[str], str]
    dirty_key: str
    events_key: Callable[[str], str] | None = None  # None: event ids are not kept


CONTACTS = Records(keys.contact, keys.DIRTY_CONTACTS, keys.contact_events)


@dataclass(frozen=True)
class Merge:
    """One event's changes for one record (a contact unless merged as other ``Records``)."""

    key: str
    changes: Sequence[PropertyChange]
    event_id: str
    email: str
    user_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None


def merge(
    conn: redis.Redis,
    key: str,
    changes: Sequence[PropertyChange],
    event_id: str,
    email: str,
    user_id: str | None = None,
) -> bool:
    """Merge one event's changes into the contact atomically; True if any cell changed."""
    return merge_many(conn, [Merge(key, changes, event_id, email, user_id)])[0]


def merge_many(
    conn: redis.Redis, merges: Sequence[Merge], records: Records = CONTACTS
) -> list[bool]:
    """Merge many events at once (a read and a script per round); per merge: changed anything?

    Same result as ``merge`` one by one, in any order: records another worker changed
    between the read and the write are read and merged again.
    """
    positions: dict[str, list[int]] = {}
    for index, item in enumerate(merges):
        positions.setdefault(item.key, []).append(index)
    changed = [False] * len(merges)
    todo = list(positions)
    script = conn.register_script(_MERGE_MANY)
    for _ in range(MAX_MERGE_ATTEMPTS):
        if not todo:
            return changed
        plan, names = [], [records.dirty_key]
        for key, current in zip(todo, read(conn, todo, records), strict=True):
            write, flags = _fold([merges[i] for i in positions[key]], current)
            for index, flag in zip(positions[key], flags, strict=True):
                changed[index] = flag
            hash_key = records.hash_key(key)
            if records.events_key is None:
                write["events"] = []
            plan.append(write)
            names += [hash_key, records.events_key(key) if records.events_key else hash_key]
        conflicts = script(keys=names, args=[encode(plan), time.time()])
        todo = [todo[int(position) - 1] for position in conflicts]
    raise redis.WatchError(f"records {', '.join(todo[:5])}: too much contention to merge")


def _fold(items: list[Merge], current: dict[str, str]) -> tuple[dict[str, Any], list[bool]]:
    """One contact's write (its events' changes folded into the stored cells, in turn) and,
    per event, whether it changed a cell."""
    updates: dict[str, str] = {}
    written = {"email": items[0].email}
    flags = []
    for item in items:
        fields = [f"c:{change.name}" for change in item.changes]
        step = merged_cells(item.changes, [current.get(field) for field in fields])
        current.update(step)
        updates.update(step)
        flags.append(bool(step))
        if item.user_id:
            written["user_id"] = item.user_id
        for name in ("first_name", "last_name"):
            if value := getattr(item, name):
                written[name] = value
    write = {
        "key": items[0].key,
        "version": current.get("version", "0"),
        "fields": [part for pair in {**written, **updates}.items() for part in pair],
        "events": sorted({item.event_id for item in items}),
        "changed": bool(updates),
    }
    return write, flags


def merged_cells(changes: Sequence[PropertyChange], stored: Sequence[Any]) -> dict[str, str]:
    """The cell fields the changes alter (several changes to one property fold together)."""
    original = {f"c:{c.name}": raw for c, raw in zip(changes, stored, strict=True)}
    cells: dict[str, dict[str, Any]] = {}
    for change in changes:
        field = f"c:{change.name}"
        raw = original[field]
        current = cells[field] if field in cells else (json.loads(raw) if raw else None)
        cells[field] = merge_cells(change.policy, current, to_cell(change))
    encoded = {field: encode(cell) for field, cell in cells.items()}
    return {
        field: value
        for field, value in encoded.items()
        if original[field] is None or text(original[field]) != value
    }


@dataclass(frozen=True)
class Pending:
    """A dirty contact's unsent values and the version they were computed from."""

    change: ContactChange | None
    version: str


def pending(conn: redis.Redis, key: str, mapping: Mapping) -> Pending:
    """The values that differ from what the CRM last accepted (None: nothing to send)."""
    return pending_many(conn, [key], mapping)[0]


def pending_many(conn: redis.Redis, contact_keys: Sequence[str], mapping: Mapping) -> list[Pending]:
    """``pending`` for several contacts, read in one round trip."""
    found = read(conn, contact_keys)
    return [_unsent(key, stored, mapping) for key, stored in zip(contact_keys, found, strict=True)]


def read(
    conn: redis.Redis, record_keys: Sequence[str], records: Records = CONTACTS
) -> list[dict[str, str]]:
    """The hashes of several records (empty for one never merged), in one round trip."""
    with conn.pipeline(transaction=False) as pipe:
        for key in record_keys:
            pipe.hgetall(records.hash_key(key))
        found = pipe.execute()
    return [{text(k): text(v) for k, v in raw.items()} for raw in found]


def _unsent(key: str, stored: dict[str, str], mapping: Mapping) -> Pending:
    """A contact's pending change, from its hash."""
    current: dict[str, Value] = {}
    for name, spec in mapping.properties.items():
        cell = stored.get(f"c:{name}")
        value = None if cell is None else cell_value(spec.merge, json.loads(cell), spec.type)
        if value is not None:
            current[name] = value
    values = {
        name: value
        for name, value in current.items()
        if (sent := stored.get(f"s:{name}")) is None or json.loads(sent) != value
    }
    version = stored.get("version", "0")
    if not values:
        return Pending(None, version)
    upsert_key = mapping.upsert_key  # the CRM finds the record by it: sent with every change
    if upsert_key != "email" and upsert_key in current:
        values.setdefault(upsert_key, current[upsert_key])
    email = stored.get("email", key)
    names = (stored.get("first_name"), stored.get("last_name"))
    return Pending(ContactChange(key, email, values, stored.get("user_id"), *names), version)


def settle(
    conn: redis.Redis,
    key: str,
    version: str,
    sent: dict[str, Value] | None = None,
    records: Records = CONTACTS,
) -> bool:
    """Record values the CRM accepted; leave the dirty set if nothing merged meanwhile."""
    return bool(_settle_script(conn, records, key, version, sent))


def queue_settle(
    pipe: Pipeline,
    key: str,
    version: str,
    sent: dict[str, Value] | None = None,
    records: Records = CONTACTS,
) -> None:
    """``settle`` as part of a pipeline: its reply (1: left the dirty set) comes with the
    pipeline's."""
    _settle_script(pipe, records, key, version, sent)


def _settle_script(
    client: redis.Redis | Pipeline,
    records: Records,
    key: str,
    version: str,
    sent: dict[str, Value] | None,
) -> Any:
    """Run (or, on a pipeline, queue) the settle script: its reply, or the pipeline."""
    pairs: list[str] = []
    for name, value in (sent or {}).items():
        pairs += [f"s:{name}", encode(value)]
    script = client.register_script(_SETTLE)
    names = [records.hash_key(key), records.dirty_key]
    return script(keys=names, args=[version, key, time.time(), *pairs])


def dirty(conn: redis.Redis, limit: int) -> list[str]:
    """Up to ``limit`` dirty contact keys, oldest first."""
    return [key for key, _ in dirty_since(conn, limit)]


def dirty_since(conn: redis.Redis, limit: int) -> list[tuple[str, float]]:
    """Up to ``limit`` dirty contact keys with when each became dirty, oldest first."""
    entries: Any = conn.zrange(keys.DIRTY_CONTACTS, 0, limit - 1, withscores=True)
    return [(text(key), float(score)) for key, score in entries]


def dirty_count(conn: redis.Redis) -> int:
    """How many contacts wait to be sent."""
    return int(conn.zcard(keys.DIRTY_CONTACTS))


def mark_dirty(conn: redis.Redis, contact_keys: Iterable[str]) -> None:
    """Put contacts back in the dirty set (e.g. to requeue them)."""
    now = time.time()
    with conn.pipeline() as pipe:
        for key in contact_keys:
            pipe.zadd(keys.DIRTY_CONTACTS, {key: now}, nx=True)
        pipe.execute()


def event_ids(conn: redis.Redis, key: str) -> list[str]:
    """The ids of the events merged into a contact, sorted."""
    return sorted(text(member) for member in conn.smembers(keys.contact_events(key)))


def cells(conn: redis.Redis, key: str) -> dict[str, Any]:
    """A contact's merged cells, by property name (for tests and the trace view)."""
    stored = conn.hgetall(keys.contact(key))
    return {text(k)[2:]: json.loads(v) for k, v in stored.items() if text(k).startswith("c:")}
