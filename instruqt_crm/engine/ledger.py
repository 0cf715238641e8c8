"""Per-learner state in Redis: merged property cells, what the CRM has not accepted yet, and
the dirty set.

One packed string per learner (``instruqt_crm:learner:<key>``, see ``learner_state``) holds
the merged cells, the names of the properties whose value changed since the CRM last
accepted one, the email, user id and name Instruqt gave, and a version bumped by every merge
that changed something. Writes are compare-and-set: a script writes a record only if it still
holds what was read (else it is read and folded again), so concurrent workers never lose an
update. A learner whose values changed waits in the ``dirty`` sorted set (scored by when it
first became dirty).

State lives ``STATE_IDLE_DAYS`` after the learner's last write, and carries no TTL while the
learner is dirty (so neither expiry nor a ``volatile-*`` eviction can drop unsent values). A
learner the ledger holds nothing for (new, or back after that) starts with ``needs_read``: the
first flush reads the CRM record's current values and merges them in (``rebase_many``), so
every merge policy continues from what the CRM holds. (Which events went into a learner is in
their trail, ``journal.trail``.)

State written by earlier versions (one hash per contact, ``instruqt_crm:contact:<key>``) is
read where found and replaced by the packed form on the learner's next write.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from collections.abc import Mapping as MappingOf
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis

from instruqt_crm import keys, redis_scripts
from instruqt_crm.crm.base import ContactChange, Value
from instruqt_crm.keys import text
from instruqt_crm.mapping import Mapping, PropertyChange
from instruqt_crm.mapping.merge import Cell, cell_value, merge_cells, to_cell
from instruqt_crm.mapping.values import coerce, fit

from .learner_state import (
    CorruptState,
    LearnerState,
    Stored,
    decode,
    fingerprint,
    pack,
    schema_id,
)
from .records import MAX_MERGE_ATTEMPTS, Merge, Pending

__all__ = ["Merge", "Pending"]
log = logging.getLogger(__name__)

BEFORE_ANY_EVENT = -1  # the time given to a CRM value read in: any event's value is newer

# Read each learner's packed state (false if none) and the hash an earlier version wrote (an
# empty list if none: both exist while old and new workers overlap during a deploy).
_READ = """
local found = {}
for i = 1, #KEYS, 2 do
  found[#found + 1] = {redis.call('GET', KEYS[i]), redis.call('HGETALL', KEYS[i + 1])}
end
return found
"""

# Compare-and-set many learners: each is written only if it still holds what was read
# ('P' + the packed state or 'N', then '|L' + an earlier version's hash version or '|-');
# returns the 1-based positions of those that changed meanwhile, to be read and tried again.
# A schema id already naming other names fails the whole call before anything is written.
# KEYS: dirty set, held set, then per learner: state, an earlier version's hash and event
# ids, schema. ARGV: now, state ttl (0: none), then per learner: expected, packed state,
# dirty action ('A' add, 'B' hold until the backfill ends unless dirty, 'R' remove, ''
# none), dirty member, schema names, '1' if values are unsent.
_WRITE = """
local now, ttl = ARGV[1], tonumber(ARGV[2])
local count = (#KEYS - 2) / 4
for i = 1, count do
  local known = redis.call('GET', KEYS[4 * i + 2])
  if known and known ~= ARGV[2 + 6 * (i - 1) + 5] then
    return redis.error_reply('schema id collision: ' .. KEYS[4 * i + 2])
  end
end
local conflicts = {}
for i = 1, count do
  local state, legacy = KEYS[4 * i - 1], KEYS[4 * i]
  local events, schema = KEYS[4 * i + 1], KEYS[4 * i + 2]
  local a = 2 + 6 * (i - 1)
  local packed = redis.call('GET', state)
  local held = packed and ('P' .. packed) or 'N'
  local old = redis.call('EXISTS', legacy) == 1
  if old then held = held .. '|L' .. (redis.call('HGET', legacy, 'version') or '0')
  else held = held .. '|-' end
  if held ~= ARGV[a + 1] then
    conflicts[#conflicts + 1] = i
  else
    redis.call('SET', schema, ARGV[a + 5], 'NX')
    local action, member = ARGV[a + 3], ARGV[a + 4]
    if action == 'A' then
      redis.call('ZADD', KEYS[1], 'NX', now, member)
      redis.call('ZREM', KEYS[2], member)
    elseif action == 'B' and not redis.call('ZSCORE', KEYS[1], member) then
      redis.call('ZADD', KEYS[2], 'NX', now, member)
    elseif action == 'R' then
      redis.call('ZREM', KEYS[1], member)
      redis.call('ZREM', KEYS[2], member)
    end
    local waiting = ARGV[a + 6] == '1' or redis.call('ZSCORE', KEYS[1], member)
      or redis.call('ZSCORE', KEYS[2], member)
    if ttl > 0 and not waiting then
      redis.call('SET', state, ARGV[a + 2], 'EX', ttl)
    else  -- values not accepted yet: never evicted or expired
      redis.call('SET', state, ARGV[a + 2])
    end
    if old then redis.call('DEL', legacy, events) end
  end
end
return conflicts
"""

_schemas: dict[bytes, tuple[str, ...]] = {}  # content-addressed: never stale


@dataclass
class _Held:
    """A learner's state as read, and what a write must find to replace it."""

    state: LearnerState
    expected: bytes


@dataclass(frozen=True)
class _Write:
    """One learner's new state and what else its write does."""

    key: str
    held: _Held
    state: LearnerState
    dirty: str = ""  # 'A': put in the dirty set, 'B': in the held set, 'R': out of both


# --- reading ------------------------------------------------------------------------------


def _names(conn: redis.Redis, ids: Iterable[bytes]) -> None:
    """Load the schemas named by ``ids`` that this process has not seen yet (those missing
    from Redis stay unknown: their states read as lost)."""
    missing = sorted({i for i in ids if i not in _schemas})
    if not missing:
        return
    for schema, raw in zip(
        missing, conn.mget([keys.state_schema(i) for i in missing]), strict=True
    ):
        if raw is not None:
            _schemas[schema] = tuple(json.loads(raw))


def _read(conn: redis.Redis, learner_keys: Sequence[str]) -> list[_Held]:
    """The state of several learners (new ones empty, needing a read), in one round trip,
    with what an earlier version's hash still holds folded in."""
    names = [name for key in learner_keys for name in (keys.learner(key), keys.contact(key))]
    replies = redis_scripts.run(conn, _READ, names) if learner_keys else []
    stored = [_decoded(bytes(packed)) if packed else None for packed, _ in replies]
    _names(conn, [found.schema for found in stored if isinstance(found, Stored)])
    return [
        _held(key, packed, found, legacy)
        for key, (packed, legacy), found in zip(learner_keys, replies, stored, strict=True)
    ]


def _decoded(blob: bytes) -> Stored | CorruptState:
    """A packed record decoded, or why it cannot be."""
    try:
        return decode(blob)
    except CorruptState as exc:
        return exc


def _held(key: str, packed: Any, found: Stored | CorruptState | None, legacy: list[Any]) -> _Held:
    """One learner's state from its packed record (as decoded) and an earlier version's
    hash."""
    fields = {text(legacy[i]): text(legacy[i + 1]) for i in range(0, len(legacy), 2)}
    old = f"|L{fields.get('version', '0')}" if legacy else "|-"
    if not packed:
        state = _from_legacy(fields) if legacy else LearnerState()
        return _Held(state, ("N" + old).encode())
    blob = bytes(packed)
    state = _unpacked(key, found or CorruptState("no record"))
    state.email = state.email or key
    if legacy:  # an old worker wrote after the conversion: merge it in (merges repeat safely)
        state = _folded(state, _from_legacy(fields))
    return _Held(state, b"P" + blob + old.encode())


def _merge_cell(state: LearnerState, name: str, policy: str, cell: Cell) -> bool:
    """Merge one cell into ``state`` (a value that changes becomes unsent); changed?"""
    current = state.cells.get(name)
    merged = merge_cells(policy, current, cell)
    if merged == current:
        return False
    state.cells[name] = merged
    if _raw_value(merged) != _raw_value(current):
        state.unsent.add(name)
    return True


def _unpacked(key: str, found: Stored | CorruptState) -> LearnerState:
    """The state a decoded record holds; an empty one, read from the CRM again, when it
    cannot be read (never a reason to stop the flush)."""
    try:
        if isinstance(found, CorruptState):
            raise found
        names = _schemas.get(found.schema)
        if names is None:
            raise CorruptState(f"schema {found.schema.hex()} is missing from Redis")
        return found.state(names)
    except CorruptState as exc:
        log.error("learner %s: state unreadable (%s): starting over from the CRM", key, exc)
        return LearnerState()


def _folded(state: LearnerState, other: LearnerState) -> LearnerState:
    """``state`` with another state's cells merged in (what changes becomes unsent)."""
    new = state.copy()
    changed = False
    for name, cell in other.cells.items():
        current = new.cells.get(name)
        if current is not None and current.get("p") != cell.get("p"):
            continue  # merged under another policy: the mapping changed; keep ours
        changed = _merge_cell(new, name, str(cell["p"]), cell) or changed
    new.version += int(changed)
    new.user_id = new.user_id or other.user_id
    new.first_name = new.first_name or other.first_name
    new.last_name = new.last_name or other.last_name
    return new


def _from_legacy(fields: dict[str, str]) -> LearnerState:
    """A contact hash an earlier version wrote (``c:``/``s:`` JSON fields), as a state: a
    property is unsent where its cell's value differs from the value last sent."""
    state = LearnerState(
        version=int(fields.get("version", "0")),
        email=fields.get("email"),
        user_id=fields.get("user_id"),
        first_name=fields.get("first_name"),
        last_name=fields.get("last_name"),
        needs_read=False,  # it holds the learner's whole history
    )
    for field, raw in fields.items():
        if not field.startswith("c:"):
            continue
        name, cell = field[2:], json.loads(raw)
        sent = fields.get(f"s:{name}")
        if sent is None or json.loads(sent) != _raw_value(cell):
            state.unsent.add(name)
        state.cells[name] = _fingerprinted(cell)
    return state


def _raw_value(cell: Cell | None) -> Any:
    """What a cell sends, before the property's type is applied (None: nothing)."""
    if not isinstance(cell, dict):
        return None
    if cell.get("p") == "union":
        return ";".join(str(v) for v in cell.get("s") or []) or None
    if cell.get("p") == "count":
        return len(cell.get("s") or [])
    return cell.get("v")


def _fingerprinted(cell: Cell) -> Cell:
    """A count cell keeps fingerprints of its values, not the values."""
    if cell.get("p") != "count":
        return cell
    return {"p": "count", "s": sorted({fingerprint(v) for v in cell.get("s") or []})}


# --- writing ------------------------------------------------------------------------------


def _write(conn: redis.Redis, writes: Sequence[_Write], idle_seconds: int) -> list[str]:
    """Compare-and-set the writes in one script; the keys of those that must be read again."""
    if not writes:
        return []
    names = [keys.DIRTY_CONTACTS, keys.HELD_CONTACTS]
    args: list[str | bytes] = [str(time.time()), str(idle_seconds)]
    for item in writes:
        stored = item.state.copy()
        stored.email = None if stored.email == item.key else stored.email  # the key says it
        blob, schema = pack(stored)
        names += [
            keys.learner(item.key),
            keys.contact(item.key),
            keys.contact_events(item.key),
            keys.state_schema(schema_id(schema)),
        ]
        args += [item.held.expected, blob, item.dirty, item.key, json.dumps(schema)]
        args.append("1" if item.state.unsent else "0")
    conflicts = redis_scripts.run(conn, _WRITE, names, args)
    return [writes[int(position) - 1].key for position in conflicts]


def _until_written(
    conn: redis.Redis,
    learner_keys: Sequence[str],
    step: Any,
    idle_seconds: int,
) -> int:
    """Read, change (``step(key, held) -> _Write | None``) and write learners until every
    write found what it read; how many were written."""
    todo, written = list(dict.fromkeys(learner_keys)), 0
    for _ in range(MAX_MERGE_ATTEMPTS):
        if not todo:
            return written
        writes = [
            w for key, held in zip(todo, _read(conn, todo), strict=True) if (w := step(key, held))
        ]
        todo = _write(conn, writes, idle_seconds)
        written += len(writes) - len(todo)
    raise redis.WatchError(f"learners {', '.join(todo[:5])}: too much contention to write")


# --- merging ------------------------------------------------------------------------------


def merge(
    conn: redis.Redis,
    key: str,
    changes: Sequence[PropertyChange],
    event_id: str,
    email: str,
    user_id: str | None = None,
    idle_seconds: int = 0,
) -> bool:
    """Merge one event's changes into the learner atomically; True if any cell changed."""
    return merge_many(conn, [Merge(key, changes, event_id, email, user_id)], idle_seconds)[0]


def merge_many(
    conn: redis.Redis, merges: Sequence[Merge], idle_seconds: int = 0, hold: bool = False
) -> list[bool]:
    """Merge many events at once (a read and a script per round); per merge: changed anything?

    Same result as ``merge`` one by one, in any order. ``idle_seconds``: how long the state
    lives after this write (0: for ever). ``hold``: learners these events changed wait in
    the held set until the backfill ends (``release_held``), unless already dirty.
    """
    mark = "B" if hold else "A"
    positions: dict[str, list[int]] = {}
    for index, item in enumerate(merges):
        positions.setdefault(item.key, []).append(index)
    changed = [False] * len(merges)

    def step(key: str, held: _Held) -> _Write:
        items = [merges[i] for i in positions[key]]
        state, flags = _fold(items, held.state)
        for index, flag in zip(positions[key], flags, strict=True):
            changed[index] = flag
        return _Write(key, held, state, mark if any(flags) else "")

    _until_written(conn, list(positions), step, idle_seconds)
    return changed


def _fold(items: list[Merge], stored: LearnerState) -> tuple[LearnerState, list[bool]]:
    """The learner's state with its events' changes folded in, in turn, and per event
    whether it changed a cell."""
    state = stored.copy()
    state.email = items[0].email
    flags = []
    for item in items:
        changed = False
        for change in item.changes:
            cell = _fingerprinted(to_cell(change))
            changed = _merge_cell(state, change.name, change.policy, cell) or changed
        flags.append(changed)
        if item.user_id:
            state.user_id = item.user_id
        for name in ("first_name", "last_name"):
            if value := getattr(item, name):
                setattr(state, name, value)
    if any(flags):
        state.version += 1
    return state, flags


# --- flushing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Unsent(Pending):
    """A learner's unsent values, the version they come from, and whether the CRM's current
    values must be read first."""

    needs_read: bool = False


def pending(conn: redis.Redis, key: str, mapping: Mapping) -> Unsent:
    """The values the CRM has not accepted yet (None: nothing to send)."""
    return pending_many(conn, [key], mapping)[0]


def pending_many(conn: redis.Redis, learner_keys: Sequence[str], mapping: Mapping) -> list[Unsent]:
    """``pending`` for several learners, read in one round trip."""
    held = _read(conn, learner_keys)
    return [_unsent(key, h.state, mapping) for key, h in zip(learner_keys, held, strict=True)]


def current_values(state: LearnerState, mapping: Mapping) -> dict[str, Value]:
    """What the ledger would send for each mapped property it has a value for."""
    found: dict[str, Value] = {}
    for name, spec in mapping.properties.items():
        value = cell_value(spec.merge, state.cells.get(name), spec.type)
        if spec.merge == "count" and name in state.bases:
            value = fit(state.bases[name] + int(value or 0), spec.type)
        if value is not None:
            found[name] = value
    return found


def _unsent(key: str, state: LearnerState, mapping: Mapping) -> Unsent:
    current = current_values(state, mapping)
    values = {name: current[name] for name in sorted(state.unsent) if name in current}
    version = str(state.version)
    if not values:
        return Unsent(None, version, state.needs_read)
    upsert_key = mapping.upsert_key  # the CRM finds the record by it: sent with every change
    if upsert_key != "email" and upsert_key in current:
        values.setdefault(upsert_key, current[upsert_key])
    change = ContactChange(
        key, state.email or key, values, state.user_id, state.first_name, state.last_name
    )
    return Unsent(change, version, state.needs_read)


@dataclass(frozen=True)
class Settle:
    """What came of sending a learner's values: ``accepted`` by the CRM, or None (rejected,
    or nothing to send) to leave them as they are."""

    key: str
    version: str
    accepted: MappingOf[str, Value] | None = None


def settle_many(
    conn: redis.Redis, settles: Sequence[Settle], mapping: Mapping, idle_seconds: int = 0
) -> int:
    """Record what the CRM accepted; each learner leaves the dirty set unless a merge changed
    it since its values were read. How many stay dirty."""
    by_key = {item.key: item for item in settles}
    stays: set[str] = set()

    def step(key: str, held: _Held) -> _Write:
        item, state = by_key[key], held.state
        now = current_values(state, mapping)
        unchanged = str(state.version) == item.version
        accepted = item.accepted or {}
        new = state.copy()
        for name, value in accepted.items():  # what the CRM holds now: unsent where it differs
            (new.unsent.discard if unchanged or now.get(name) == value else new.unsent.add)(name)
        new.needs_read = state.needs_read and not accepted
        (stays.discard if unchanged else stays.add)(key)
        return _Write(key, held, new, "R" if unchanged else "A")

    _until_written(conn, list(by_key), step, idle_seconds)
    return len(stays)


def settle(
    conn: redis.Redis,
    key: str,
    version: str,
    accepted: MappingOf[str, Value] | None,
    mapping: Mapping,
    idle_seconds: int = 0,
) -> bool:
    """``settle_many`` for one learner: True if it left the dirty set."""
    return settle_many(conn, [Settle(key, version, accepted)], mapping, idle_seconds) == 0


def rebase_many(
    conn: redis.Redis,
    found: MappingOf[str, MappingOf[str, str] | None],
    mapping: Mapping,
    idle_seconds: int = 0,
) -> None:
    """Merge what the CRM holds for learners new to the ledger (``found``: per learner key,
    the record's values as text, or None when the CRM has no record), so every merge policy
    continues from it, and mark as unsent only what differs from it."""

    def step(key: str, held: _Held) -> _Write | None:
        if not held.state.needs_read:
            return None  # read in by another flush meanwhile
        return _Write(key, held, rebased(held.state, found[key] or {}, mapping))

    _until_written(conn, list(found), step, idle_seconds)


def rebased(state: LearnerState, crm: MappingOf[str, str], mapping: Mapping) -> LearnerState:
    """``state`` with the CRM's values (text, as the CRM answers) merged in; unsent are the
    properties whose merged value differs from the CRM's."""
    new = state.copy()
    new.needs_read = False
    held: dict[str, Value] = {}
    for name, spec in mapping.properties.items():
        raw = str(crm.get(name) or "")
        try:
            base = _base(spec.merge, spec.type, raw) if raw else None
        except ValueError:
            continue  # a value the mapping's type cannot read: ours replaces it
        if base is None:
            continue
        if isinstance(base, int):  # count: only the CRM's number is known, not the values
            new.bases[name] = base
        else:
            new.cells[name] = merge_cells(spec.merge, new.cells.get(name), base)
        held[name] = fit(coerce(raw, "number" if spec.merge == "count" else spec.type), spec.type)
    values = current_values(new, mapping)
    new.unsent = {name for name, value in values.items() if held.get(name) != value}
    return new


def _base(policy: str, value_type: str, raw: str) -> Cell | int | None:
    """A CRM value as a cell of ``policy`` (for count, the number); ValueError if it does not
    fit the type."""
    if policy == "count":
        return int(coerce(raw, "number"))
    if policy == "union":
        members = [coerce(part, value_type) for part in raw.split(";") if part]
        return {"p": "union", "s": members} if members else None
    value = coerce(raw, value_type)
    if policy in ("latest", "first", "set_once"):
        return {"p": "first" if policy == "set_once" else policy, "t": BEFORE_ANY_EVENT, "v": value}
    return {"p": policy, "v": value}


# --- the dirty set and views -----------------------------------------------------------------


def dirty(conn: redis.Redis, limit: int) -> list[str]:
    """Up to ``limit`` dirty learner keys, oldest first."""
    return [key for key, _ in dirty_since(conn, limit)]


def dirty_since(conn: redis.Redis, limit: int) -> list[tuple[str, float]]:
    """Up to ``limit`` dirty learner keys with when each became dirty, oldest first."""
    entries: Any = conn.zrange(keys.DIRTY_CONTACTS, 0, limit - 1, withscores=True)
    return [(text(key), float(score)) for key, score in entries]


def dirty_count(conn: redis.Redis) -> int:
    """How many learners wait to be sent."""
    return int(conn.zcard(keys.DIRTY_CONTACTS))


def is_held(conn: redis.Redis, key: str) -> bool:
    """Whether the learner waits for a backfill to end before it is sent."""
    return conn.zscore(keys.HELD_CONTACTS, key) is not None


def held_count(conn: redis.Redis) -> int:
    """How many learners changed by a backfill wait for it to end before they are sent."""
    return int(conn.zcard(keys.HELD_CONTACTS))


# KEYS: held set, dirty set. ARGV: now. Every held learner becomes dirty (as of now).
_RELEASE = """
local held = redis.call('ZRANGE', KEYS[1], 0, -1)
for i = 1, #held do redis.call('ZADD', KEYS[2], 'NX', ARGV[1], held[i]) end
redis.call('DEL', KEYS[1])
return #held
"""


def release_held(conn: redis.Redis) -> int:
    """Make every held learner dirty, to be sent; how many there were."""
    names = [keys.HELD_CONTACTS, keys.DIRTY_CONTACTS]
    return int(redis_scripts.run(conn, _RELEASE, names, [str(time.time())]))


def mark_dirty(conn: redis.Redis, learner_keys: Iterable[str]) -> None:
    """Put learners back in the dirty set (e.g. to requeue them); their state then carries no
    TTL until it is sent."""
    now = time.time()
    with conn.pipeline() as pipe:
        for key in learner_keys:
            pipe.zadd(keys.DIRTY_CONTACTS, {key: now}, nx=True)
            pipe.persist(keys.learner(key))
        pipe.execute()


def migrate(conn: redis.Redis, idle_seconds: int = 0, batch: int = 200) -> int:
    """Rewrite in the packed form the state earlier versions kept (one hash per contact,
    event ids without a TTL) of learners with no event since; how many were converted. A key
    hashed for its length cannot be spelt out again: converted at the learner's next event."""
    prefix = keys.contact("")
    found: list[str] = []
    done = 0

    def step(key: str, held: _Held) -> _Write | None:
        legacy = not held.expected.endswith(b"|-")
        return _Write(key, held, held.state) if legacy else None

    for raw in conn.scan_iter(f"{prefix}*", count=1000, _type="hash"):
        key = unquote(text(raw)[len(prefix) :])
        if keys.contact(key) == text(raw):  # spelt out again exactly (not hashed)
            found.append(key)
        if len(found) >= batch:
            done, found = done + _until_written(conn, found, step, idle_seconds), []
    return done + _until_written(conn, found, step, idle_seconds)


def state(conn: redis.Redis, key: str) -> LearnerState:
    """A learner's state (empty if the ledger holds none)."""
    return _read(conn, [key])[0].state


def cells(conn: redis.Redis, key: str) -> dict[str, Any]:
    """A learner's merged cells, by property name (count cells hold fingerprints)."""
    return state(conn, key).cells
