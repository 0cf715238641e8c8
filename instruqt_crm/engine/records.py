"""Versioned records in Redis hashes, merged atomically: the state of each play.

One hash per record holds ``c:<name>`` (the merged cell, JSON), ``s:<name>`` (the value last
accepted by the CRM, JSON), ``email``, ``user_id`` and ``version`` (bumped by every merge that
changed something). Merges read the cells, fold the changes in, and write with a script only
if the version is unchanged (else read again), so concurrent workers never lose an update; a
record whose cells changed is put in its dirty sorted set (scored by when it first became
dirty). Learners' state is packed smaller (``ledger``); plays are few per learner and keep
this readable form.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

from instruqt_crm import redis_scripts
from instruqt_crm.crm.base import ContactChange, Value
from instruqt_crm.keys import text
from instruqt_crm.mapping import PropertyChange
from instruqt_crm.mapping.merge import merge_cells, to_cell

log = logging.getLogger(__name__)
MAX_MERGE_ATTEMPTS = 50

# Record what the CRM accepted; leave the dirty set only if no merge happened since the
# values were read, else make sure the record is (still) dirty so the newer values follow.
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) return 1 end
local version = redis.call('HGET', KEYS[1], 'version') or '0'
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if version == ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[2])
  if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
  return 1
end
redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[2])
return 0
"""


# Merge a batch's changes: per record, write only if no merge changed it since it was read
# (same version); returns the 1-based positions of those that did, to be read and tried again.
# KEYS: the dirty set, then each record's hash. ARGV: plan (JSON), now, ttl (0: none).
_MERGE_MANY = """
local plan = cjson.decode(ARGV[1])
local conflicts = {}
for i, c in ipairs(plan) do
  local hash = KEYS[i + 1]
  if (redis.call('HGET', hash, 'version') or '0') ~= c.version then
    conflicts[#conflicts + 1] = i
  else
    redis.call('HSET', hash, unpack(c.fields))
    if c.changed then
      redis.call('HINCRBY', hash, 'version', 1)
      redis.call('ZADD', KEYS[1], 'NX', ARGV[2], c.key)
    end
    if redis.call('ZSCORE', KEYS[1], c.key) then redis.call('PERSIST', hash)
    elseif tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', hash, ARGV[3]) end
  end
end
return conflicts
"""


def encode(value: Any) -> str:
    """A cell or sent value as stored: canonical JSON, so equal values compare equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Records:
    """A kind of versioned record merged here: where its hashes and dirty set live."""

    hash_key: Callable[[str], str]
    dirty_key: str


@dataclass(frozen=True)
class Merge:
    """One event's changes for one record (a learner's, or a play's)."""

    key: str
    changes: Sequence[PropertyChange]
    event_id: str
    email: str
    user_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None


def merge_many(
    conn: redis.Redis, merges: Sequence[Merge], records: Records, idle_seconds: int = 0
) -> list[bool]:
    """Merge many events at once (a read and a script per round); per merge: changed anything?

    Same result as merging them one by one, in any order: records another worker changed
    between the read and the write are read and merged again. A dirty record carries no TTL;
    a clean one lives ``idle_seconds`` (0: for ever) after its last merge or settle, and one
    that expired meanwhile is not settled back.
    """
    positions: dict[str, list[int]] = {}
    for index, item in enumerate(merges):
        positions.setdefault(item.key, []).append(index)
    changed = [False] * len(merges)
    todo = list(positions)
    for _ in range(MAX_MERGE_ATTEMPTS):
        if not todo:
            return changed
        plan, names = [], [records.dirty_key]
        for key, current in zip(todo, read(conn, todo, records), strict=True):
            write, flags = _fold([merges[i] for i in positions[key]], current)
            for index, flag in zip(positions[key], flags, strict=True):
                changed[index] = flag
            plan.append(write)
            names.append(records.hash_key(key))
        args = [encode(plan), time.time(), idle_seconds]
        conflicts = redis_scripts.run(conn, _MERGE_MANY, names, args)
        todo = [todo[int(position) - 1] for position in conflicts]
    raise redis.WatchError(f"records {', '.join(todo[:5])}: too much contention to merge")


def _fold(items: list[Merge], current: dict[str, str]) -> tuple[dict[str, Any], list[bool]]:
    """One record's write (its events' changes folded into the stored cells, in turn) and,
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
    """A dirty record's unsent values and the version they were computed from."""

    change: ContactChange | None
    version: str


def read(conn: redis.Redis, record_keys: Sequence[str], records: Records) -> list[dict[str, str]]:
    """The hashes of several records (empty for one never merged), in one round trip."""
    with conn.pipeline(transaction=False) as pipe:
        for key in record_keys:
            pipe.hgetall(records.hash_key(key))
        found = pipe.execute()
    return [{text(k): text(v) for k, v in raw.items()} for raw in found]


def settle(
    conn: redis.Redis,
    key: str,
    version: str,
    records: Records,
    sent: dict[str, Value] | None = None,
    idle_seconds: int = 0,
) -> bool:
    """Record values the CRM accepted; leave the dirty set if nothing merged meanwhile (and
    from then on live ``idle_seconds``, 0: for ever)."""
    return bool(_settle_script(conn, records, key, version, sent, idle_seconds))


def queue_settle(
    pipe: Pipeline,
    key: str,
    version: str,
    records: Records,
    sent: dict[str, Value] | None = None,
    idle_seconds: int = 0,
) -> None:
    """``settle`` as part of a pipeline: its reply (1: left the dirty set) comes with the
    pipeline's."""
    _settle_script(pipe, records, key, version, sent, idle_seconds)


def _settle_script(
    client: redis.Redis | Pipeline,
    records: Records,
    key: str,
    version: str,
    sent: dict[str, Value] | None,
    idle_seconds: int,
) -> Any:
    """Run (or, on a pipeline, queue) the settle script: its reply, or the pipeline."""
    pairs: list[str] = []
    for name, value in (sent or {}).items():
        pairs += [f"s:{name}", encode(value)]
    names = [records.hash_key(key), records.dirty_key]
    args = [version, key, time.time(), idle_seconds, *pairs]
    return redis_scripts.run(client, _SETTLE, names, args)
