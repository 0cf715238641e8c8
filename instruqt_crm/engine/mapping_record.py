"""What the workers run and what stored values were merged under, kept in Redis so that a
changed mapping file says what it changes.

Each worker records the mapping it runs (its digest and file) when it starts: ``status``
compares that with the file. Each batch of merges records, per property it merged, the merge
policy and type it merged under: ``check`` warns when the file changes either, saying what
will happen to the stored values (``mapping.merge.change_effect``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from instruqt_crm import keys
from instruqt_crm.keys import text
from instruqt_crm.mapping import Mapping
from instruqt_crm.mapping.merge import canonical_policy, change_effect


def record_running(
    conn: redis.Redis, worker_name: str, mapping: Mapping, gone: Callable[[str], bool]
) -> None:
    """Note that ``worker_name`` runs ``mapping``; forget the workers that are ``gone``."""
    entry = {"digest": mapping.digest, "path": mapping.source, "at": time.time()}
    conn.hset(keys.WORKER_MAPPINGS, worker_name, json.dumps(entry))
    stale = [name for name in running(conn) if name != worker_name and gone(name)]
    if stale:
        conn.hdel(keys.WORKER_MAPPINGS, *stale)


def running(conn: redis.Redis, live: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """The mapping each worker recorded (digest, path, at), by worker name; with ``live``,
    only those workers."""
    found = {}
    for name, raw in conn.hgetall(keys.WORKER_MAPPINGS).items():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found[text(name)] = entry
    if live is None:
        return found
    wanted = set(live)
    return {name: entry for name, entry in found.items() if name in wanted}


def note_merged(pipe: Any, mapping: Mapping, names: Iterable[str]) -> None:
    """Queue (on a pipeline) the policy and type the properties ``names`` were merged under."""
    fields = {
        name: json.dumps({"merge": spec.merge, "type": spec.type})
        for name in sorted(set(names))
        if (spec := mapping.properties.get(name)) is not None
    }
    if fields:
        pipe.hset(keys.MERGED_UNDER, mapping=fields)


def merged_under(conn: redis.Redis) -> dict[str, tuple[str, str]]:
    """Per property: the (merge policy, type) its stored values were last merged under."""
    found = {}
    for name, raw in conn.hgetall(keys.MERGED_UNDER).items():
        try:
            entry = json.loads(raw)
            found[text(name)] = (canonical_policy(entry["merge"]), str(entry["type"]))
        except (ValueError, TypeError, KeyError):
            continue
    return found


def stored_value_changes(conn: redis.Redis, mapping: Mapping) -> list[str]:
    """For each property whose merge policy or type in ``mapping`` differs from what its stored
    values were merged under: a line saying so and what will happen to them."""
    lines = []
    stored = merged_under(conn)
    for name, spec in mapping.properties.items():
        if name not in stored:
            continue
        effect = change_effect(stored[name], (canonical_policy(spec.merge), spec.type))
        if effect is not None:
            lines.append(f"{name}: {effect}")
    return lines
