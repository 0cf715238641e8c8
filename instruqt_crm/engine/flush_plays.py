"""Flush play records: send dirty plays (Salesforce ``Instruqt_Play__c``) after their learners.

Runs at the end of each flush, once the learners' Contacts and Leads are written: a play
links to its learner's record, so a play whose learner is still dirty waits for a later flush.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from instruqt_crm import keys
from instruqt_crm.crm.base import ContactChange, CrmAdapter, PlayRecords
from instruqt_crm.errors import Category
from instruqt_crm.journal import failures

from . import plays, records
from .send import Tally, send

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlaysFlushed:
    """What a plays flush did, and whether dirty plays were left when its time ran out."""

    tally: Tally
    left: bool = False


def flush_plays(
    conn: redis.Redis, adapter: CrmAdapter, deadline: float, idle_seconds: int = 0
) -> PlaysFlushed:
    """Send dirty plays in batches until none is left or ``deadline`` (monotonic) passes."""
    writer = adapter.play_adapter() if isinstance(adapter, PlayRecords) else None
    if writer is None:
        return PlaysFlushed(Tally())
    offset, tally, left = 0, Tally(), False
    while time.monotonic() < deadline:
        found = plays.dirty(conn, writer.batch_size, offset)
        if not found:
            break
        kept, done = _send_batch(conn, writer, found, idle_seconds)
        offset, tally = offset + kept, tally + done
    else:
        left = plays.dirty_count(conn) > offset
    if tally.synced or tally.rejected or tally.retry or tally.waiting:
        log.info(
            "plays: %d synced, %d rejected, %d to retry, %d waiting for their learner",
            tally.synced,
            tally.rejected,
            tally.retry,
            tally.waiting,
        )
    return PlaysFlushed(tally, left)


def _send_batch(
    conn: redis.Redis, writer: CrmAdapter, participants: list[str], idle_seconds: int
) -> tuple[int, Tally]:
    """Send one batch of dirty plays and apply the outcomes: how many stay dirty, and the tally.
    The plays and their learners are read in two round trips, the outcomes written in one."""
    found = dict(zip(participants, plays.pending_many(conn, participants), strict=True))
    changed = [(p, f.change, f.version) for p, f in found.items() if f.change is not None]
    with conn.pipeline(transaction=False) as pipe:
        for _, change, _ in changed:
            pipe.zscore(keys.DIRTY_CONTACTS, change.email)
            pipe.zscore(keys.HELD_CONTACTS, change.email)
        scores = pipe.execute()
    learner_dirty = [
        a if a is not None else b for a, b in zip(scores[::2], scores[1::2], strict=True)
    ]
    unchanged = [(p, f.version, None) for p, f in found.items() if f.change is None]
    kept = plays.settle_many(conn, unchanged, idle_seconds)
    batch, waiting = {}, 0
    for (participant, change, version), score in zip(changed, learner_dirty, strict=True):
        if score is not None:  # its Contact or Lead (dirty or held) may not exist yet: wait
            waiting += 1
        else:
            batch[participant] = (change, version)
    sent = send(writer, [change for change, _ in batch.values()]) if batch else None
    settles: list[plays.Settle] = []
    counts = {"synced": 0, "rejected": 0, "retry": 0}
    for outcome in sent.outcomes if sent else []:
        change, version = batch[outcome.key]
        counts[outcome.status] += 1
        if outcome.status == "retry":
            continue
        if outcome.status == "rejected":
            _reject(conn, change, outcome.reason, outcome.category)
        settles.append(
            (change.key, version, change.properties if outcome.status == "synced" else None)
        )
    kept += waiting + counts["retry"] + plays.settle_many(conn, settles, idle_seconds)
    requests = sent.requests if sent else 0
    return kept, Tally(**counts, unchanged=len(unchanged), waiting=waiting, requests=requests)


def _reject(conn: redis.Redis, change: ContactChange, reason: str, category: Category) -> None:
    """Keep a rejected play visible and requeueable (``failed requeue``, or its next event)."""
    payload = {"participant_id": change.key, "email": change.email, "fields": change.properties}
    failures.record(
        conn,
        failures.Kind.PLAY,
        category,
        reason,
        f"play:{change.key}",
        records.encode(payload),
    )
    log.warning("play %s of %s rejected by the CRM: %s", change.key, change.email, reason)
