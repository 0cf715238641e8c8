"""The inbox: accepted events in a Redis stream, taken by worker jobs in batches.

Why not one RQ job per event: an RQ job costs ~57 Redis commands and, with the forking
worker, a fork (~16 ms), which capped two workers at ~100 events/s while the receiver
accepts 400-600/s. Here the receiver adds an event with ONE script call (dedupe mark,
stream entry, drain mark) and one ``process_inbox`` job takes events 100 at a time.

Crash safety comes from the stream's consumer group: an entry taken by a worker stays
*pending* until acknowledged after its batch was handled, so a killed worker's entries are
claimed by the next job (see ``reclaim``). Handling an event twice is harmless: the ledger
merge is idempotent.

Two lanes, taken in order (``LANES``): the live inbox, then the backfill lane, which holds
the events ``instruqt-crm backfill`` made from past plays. A drain job takes backfill events
only while no live event waits, and looks again before each batch, so live events queued
mid-backfill wait for at most one batch. Learners changed by backfill events are held
(``ledger.release_held``) until the backfill is done (``backfill_done``), so each is sent
once, not once per page of the report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from instruqt_crm import keys, redis_scripts
from instruqt_crm.keys import text

from .queueing import DRAIN_JOB, enqueue_job, schedule_once

log = logging.getLogger(__name__)

GROUP = "workers"
LIVE, BACKFILL = keys.INBOX, keys.BACKFILL_INBOX
LANES = (LIVE, BACKFILL)  # highest priority first
BACKFILL_ID = "backfill:"  # how the ids of the events a backfill made begin
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


@dataclass(frozen=True)
class Entry:
    """One event taken from the inbox."""

    entry_id: str
    message_id: str
    body: dict[str, Any]
    lane: str = LIVE


def enqueue_event(
    conn: redis.Redis, message_id: str, body: str | bytes | dict[str, Any], dedupe_ttl: int
) -> bool:
    """Keep an event once per message id (one round trip); False if it was seen before."""
    if isinstance(body, dict):
        body = json.dumps(body)
    names = [keys.seen(message_id), keys.INBOX, DRAIN_MARK, keys.legacy_seen(message_id)]
    args = [dedupe_ttl, message_id, body, DRAIN_MARK_MS]
    reply = int(redis_scripts.run(conn, _ACCEPT, names, args))
    if reply == 1:  # no drain job pending: queue one (the mark is already set)
        enqueue_job(conn, DRAIN_JOB)
    return reply >= 0


def remember_refused(conn: redis.Redis, message_id: str, dedupe_ttl: int) -> bool:
    """Mark a delivery refused at the door (not kept); False if it was seen before."""
    names = [keys.seen(message_id), keys.legacy_seen(message_id)]
    return bool(redis_scripts.run(conn, _REFUSE, names, [dedupe_ttl]))


def wake(conn: redis.Redis) -> bool:
    """Queue a drain job if events wait and none is pending (a safety net after failures)."""
    waiting = any(depth(conn, lane) for lane in LANES)
    return waiting and schedule_once(conn, DRAIN_JOB, 0, DRAIN_MARK_MS / 1000)


def add(
    conn: redis.Redis | Any, message_id: str, body: dict[str, Any] | str, lane: str | None = None
) -> None:
    """Add an event without dedupe (requeues, backfill); ``conn`` may be a pipeline. Unless
    ``lane`` is given, an event a backfill made (a requeued failure) goes back to its lane."""
    lane = lane or (BACKFILL if message_id.startswith(BACKFILL_ID) else LIVE)
    encoded = body if isinstance(body, str) else json.dumps(body)
    conn.xadd(lane, {"id": message_id, "body": encoded})


def ensure_group(conn: redis.Redis, lane: str = LIVE) -> None:
    """Create the consumer group (and the stream) if missing; reads start at the oldest entry."""
    try:
        conn.xgroup_create(lane, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _read(conn: redis.Redis, consumer: str, lane: str, start: str, count: int) -> list[Any]:
    """XREADGROUP on one lane, creating the group on first use."""
    try:
        reply = conn.xreadgroup(GROUP, consumer, {lane: start}, count=count)
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        ensure_group(conn, lane)
        reply = conn.xreadgroup(GROUP, consumer, {lane: start}, count=count)
    streams: list[Any] = reply or []  # type: ignore[assignment]
    return streams[0][1] if streams else []


def take(conn: redis.Redis, consumer: str, count: int, own_pending: bool = False) -> list[Entry]:
    """Up to ``count`` events of one lane for ``consumer``: new ones from the first lane that
    has any (or, if asked, those it already holds): never a mix of lanes."""
    for lane in LANES:
        if entries := _take(conn, consumer, lane, count, own_pending):
            return entries
    return []


def _take(
    conn: redis.Redis, consumer: str, lane: str, count: int, own_pending: bool
) -> list[Entry]:
    """Up to ``count`` events of ``lane`` (new, or held by ``consumer``)."""
    entries, gone = [], []
    for raw_id, fields in _read(conn, consumer, lane, "0" if own_pending else ">", count):
        entry_id = text(raw_id)
        if not fields:  # deleted while pending: nothing to handle
            gone.append(entry_id)
            continue
        decoded = {text(k): text(v) for k, v in fields.items()}
        try:
            body = json.loads(decoded["body"])
        except (KeyError, ValueError):  # never written so by us: kept as a visible failure
            body = {"unreadable_inbox_entry": decoded}
        entries.append(Entry(entry_id, decoded.get("id", entry_id), body, lane))
    if gone:
        ack(conn, gone, lane)
    return entries


def ack(conn: redis.Redis, entry_ids: Iterable[str], lane: str = LIVE) -> None:
    """Acknowledge handled entries of ``lane`` and delete them, so it holds only open work."""
    ids = list(entry_ids)
    if not ids:
        return
    with conn.pipeline(transaction=True) as pipe:
        pipe.xack(lane, GROUP, *ids)
        pipe.xdel(lane, *ids)
        pipe.execute()


def reclaim(conn: redis.Redis, consumer: str, gone: Callable[[str], bool]) -> int:
    """Take over entries held by consumers that are ``gone`` or silent too long; drop the dead."""
    claimed = sum(_reclaim(conn, lane, consumer, gone) for lane in LANES)
    if claimed:
        log.warning("took over %d inbox event(s) left by stopped workers", claimed)
    return claimed


def _reclaim(conn: redis.Redis, lane: str, consumer: str, gone: Callable[[str], bool]) -> int:
    """``reclaim`` for one lane."""
    try:
        consumers = conn.xinfo_consumers(lane, GROUP)
    except redis.ResponseError:  # no stream or group yet
        return 0
    claimed = 0
    for info in consumers:
        name = text(info["name"])
        if name == consumer:
            continue
        dead = gone(name)
        if info["pending"] and (dead or info["idle"] >= STALE_MS):
            claimed += _claim_all(conn, lane, name, consumer)
        if dead:
            conn.xgroup_delconsumer(lane, GROUP, name)
    return claimed


def _claim_all(conn: redis.Redis, lane: str, holder: str, consumer: str) -> int:
    """Move every pending entry of ``holder`` in ``lane`` to ``consumer``."""
    claimed = 0
    while True:
        held = conn.xpending_range(lane, GROUP, "-", "+", 500, consumername=holder)
        ids: list[Any] = [item["message_id"] for item in held]
        if not ids:
            return claimed
        conn.xclaim(lane, GROUP, consumer, 0, ids, justid=True)
        claimed += len(ids)


def backfill_reading(conn: redis.Redis, seconds: int = 0, run: str = "") -> bool:
    """Whether any backfill is reading Instruqt's report; ``seconds`` > 0 (a reader, before
    each request and while it waits) says that ``run`` still is for that long, 0 asks. Each
    run has its own mark, so two backfills at once do not end each other's."""
    now = time.time()
    if seconds > 0:
        conn.zadd(keys.BACKFILL_RUNNING, {run: now + seconds})
        return True
    conn.zremrangebyscore(keys.BACKFILL_RUNNING, "-inf", now)
    return bool(conn.zcard(keys.BACKFILL_RUNNING))


def backfill_stopped(conn: redis.Redis, run: str = "") -> None:
    """``run`` stopped reading (finished, interrupted or failed)."""
    conn.zrem(keys.BACKFILL_RUNNING, run)


def backfill_done(conn: redis.Redis) -> bool:
    """No backfill is reading and none of its events waits: its learners may be sent."""
    return not backfill_reading(conn) and depth(conn, BACKFILL) == 0


def depth(conn: redis.Redis, lane: str = LIVE) -> int:
    """Events of ``lane`` accepted and not yet handled (waiting or being handled)."""
    return int(conn.xlen(lane))


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
