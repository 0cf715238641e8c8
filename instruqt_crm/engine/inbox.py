"""The inbox: accepted events in a Redis stream, taken by worker jobs in batches.

Why not one RQ job per event: an RQ job costs ~57 Redis commands and, with the forking
worker, a fork (~16 ms), which capped two workers at ~100 events/s while the receiver
accepts 400-600/s. Here the receiver adds an event with ONE script call (dedupe mark,
stream entry, drain mark) and one ``process_inbox`` job takes events 100 at a time.

Crash safety comes from the stream's consumer group: an entry taken by a worker stays
*pending* until acknowledged after its batch was handled, so a killed worker's entries are
claimed by the next job (see ``reclaim``). Handling an event twice is harmless: the ledger
merge is idempotent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

from instruqt_crm import keys
from instruqt_crm.keys import text

from .queueing import DRAIN_JOB, enqueue_job, schedule_once

log = logging.getLogger(__name__)

GROUP = "workers"
DRAIN_MARK = keys.pending_job(DRAIN_JOB)  # schedule_once's mark, also set by the accept script
DRAIN_MARK_MS = 10_000  # at most one queued drain job per 10 s of arrivals
STALE_MS = 300_000  # a live consumer acknowledges far sooner than this (job timeout)

# KEYS: seen mark, inbox, drain mark, the seen mark's earlier name. ARGV: dedupe ttl s,
# message id, body, drain mark ms. Returns -1 for a duplicate, 1 when a drain job must be
# enqueued, 0 when one is pending. The stream entry is written before the marks: if Redis
# refuses it (OOM), nothing is kept. A mark holds 1 (kept) or 0 (refused at the door): an
# integer is the smallest value Redis stores.
_ACCEPT = """
if redis.call('EXISTS', KEYS[1], KEYS[4]) > 0 then return -1 end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[2], 'body', ARGV[3])
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[4]) then return 1 end
return 0
"""
# KEYS: seen mark, its earlier name. ARGV: dedupe ttl s. Returns 1 when the delivery is new.
_REFUSE = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('SET', KEYS[1], '0', 'EX', ARGV[1])
return 1
"""
_scripts: dict[str, Script] = {}


@dataclass(frozen=True)
class Entry:
    """One event taken from the inbox."""

    entry_id: str
    message_id: str
    body: dict[str, Any]


def enqueue_event(
    conn: redis.Redis, message_id: str, body: str | bytes | dict[str, Any], dedupe_ttl: int
) -> bool:
    """Keep an event once per message id (one round trip); False if it was seen before."""
    if isinstance(body, dict):
        body = json.dumps(body)
    names = [keys.seen(message_id), keys.INBOX, DRAIN_MARK, keys.legacy_seen(message_id)]
    reply = int(_run(conn, _ACCEPT, names, [dedupe_ttl, message_id, body, DRAIN_MARK_MS]))
    if reply == 1:  # no drain job pending: queue one (the mark is already set)
        enqueue_job(conn, DRAIN_JOB)
    return reply >= 0


def remember_refused(conn: redis.Redis, message_id: str, dedupe_ttl: int) -> bool:
    """Mark a delivery refused at the door (not kept); False if it was seen before."""
    names = [keys.seen(message_id), keys.legacy_seen(message_id)]
    return bool(_run(conn, _REFUSE, names, [dedupe_ttl]))


def _run(conn: redis.Redis, source: str, names: list[str], args: list[Any]) -> Any:
    """Run one of this module's scripts (registered on first use)."""
    script = _scripts.get(source)
    if script is None:
        script = _scripts[source] = conn.register_script(source)
    return script(names, args, client=conn)


def wake(conn: redis.Redis) -> bool:
    """Queue a drain job if events wait and none is pending (a safety net after failures)."""
    return depth(conn) > 0 and schedule_once(conn, DRAIN_JOB, 0, DRAIN_MARK_MS / 1000)


def add(conn: redis.Redis | Any, message_id: str, body: dict[str, Any]) -> None:
    """Add an event without dedupe (requeues); ``conn`` may be a pipeline."""
    conn.xadd(keys.INBOX, {"id": message_id, "body": json.dumps(body)})


def ensure_group(conn: redis.Redis) -> None:
    """Create the consumer group (and the stream) if missing; reads start at the oldest entry."""
    try:
        conn.xgroup_create(keys.INBOX, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _read(conn: redis.Redis, consumer: str, start: str, count: int) -> list[Any]:
    """XREADGROUP, creating the group on first use."""
    try:
        reply = conn.xreadgroup(GROUP, consumer, {keys.INBOX: start}, count=count)
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        ensure_group(conn)
        reply = conn.xreadgroup(GROUP, consumer, {keys.INBOX: start}, count=count)
    streams: list[Any] = reply or []  # type: ignore[assignment]
    return streams[0][1] if streams else []


def take(conn: redis.Redis, consumer: str, count: int, own_pending: bool = False) -> list[Entry]:
    """Up to ``count`` new events for ``consumer`` (or those it already holds, if asked)."""
    entries, gone = [], []
    for raw_id, fields in _read(conn, consumer, "0" if own_pending else ">", count):
        entry_id = text(raw_id)
        if not fields:  # deleted while pending: nothing to handle
            gone.append(entry_id)
            continue
        decoded = {text(k): text(v) for k, v in fields.items()}
        try:
            body = json.loads(decoded["body"])
        except (KeyError, ValueError):  # never written so by us: kept as a visible failure
            body = {"unreadable_inbox_entry": decoded}
        entries.append(Entry(entry_id, decoded.get("id", entry_id), body))
    if gone:
        ack(conn, gone)
    return entries


def ack(conn: redis.Redis, entry_ids: Iterable[str]) -> None:
    """Acknowledge handled entries and delete them, so the stream holds only open work."""
    ids = list(entry_ids)
    if not ids:
        return
    with conn.pipeline(transaction=True) as pipe:
        pipe.xack(keys.INBOX, GROUP, *ids)
        pipe.xdel(keys.INBOX, *ids)
        pipe.execute()


def reclaim(conn: redis.Redis, consumer: str, gone: Callable[[str], bool]) -> int:
    """Take over entries held by consumers that are ``gone`` or silent too long; drop the dead."""
    try:
        consumers = conn.xinfo_consumers(keys.INBOX, GROUP)
    except redis.ResponseError:  # no stream or group yet
        return 0
    claimed = 0
    for info in consumers:
        name = text(info["name"])
        if name == consumer:
            continue
        dead = gone(name)
        if info["pending"] and (dead or info["idle"] >= STALE_MS):
            claimed += _claim_all(conn, name, consumer)
        if dead:
            conn.xgroup_delconsumer(keys.INBOX, GROUP, name)
    if claimed:
        log.warning("took over %d inbox event(s) left by stopped workers", claimed)
    return claimed


def _claim_all(conn: redis.Redis, holder: str, consumer: str) -> int:
    """Move every pending entry of ``holder`` to ``consumer``."""
    claimed = 0
    while True:
        held = conn.xpending_range(keys.INBOX, GROUP, "-", "+", 500, consumername=holder)
        ids: list[Any] = [item["message_id"] for item in held]
        if not ids:
            return claimed
        conn.xclaim(keys.INBOX, GROUP, consumer, 0, ids, justid=True)
        claimed += len(ids)


def depth(conn: redis.Redis) -> int:
    """Events accepted and not yet handled (waiting or being handled)."""
    return int(conn.xlen(keys.INBOX))


def lag(conn: redis.Redis) -> float:
    """Seconds since the oldest event not yet handled was added (0 when none waits), by
    Redis's clock, which also stamped the entry: how far behind the workers are."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.xrange(keys.INBOX, count=1)
        pipe.time()
        oldest, (seconds, micros) = pipe.execute()
    if not oldest:
        return 0.0
    added_ms = int(text(oldest[0][0]).split("-", 1)[0])  # a stream id is <ms>-<sequence>
    return max(0.0, seconds + micros / 1e6 - added_ms / 1000)
