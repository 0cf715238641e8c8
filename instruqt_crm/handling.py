"""Handling accepted events: find the learner, apply the mapping, merge, or wait for an email.

Events are handled in batches (``handle_batch``): writes nothing in the batch reads back
(counters, trails, the identity cache) share one pipeline, who waits for an email is read
once, the ledger merges are folded per contact and written by one script, and one flush is
asked for. A batch of 100 costs ~5 round trips where one event alone cost ~11.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

from . import failures, identity, ledger, plays, trace
from .events import Event, parse_event
from .inbox import Entry
from .logs import CURRENT_EVENT
from .mapping import MappingFailure, PropertyChange, apply_event
from .queueing import FLUSH_JOB, RETRY_PARKED_JOB, STATS_KEY, schedule_once
from .runtime import Runtime

log = logging.getLogger(__name__)
# Redis errors that pass: the batch stays unacknowledged and is taken again. Others (a
# script or type error) would fail the same way every time, so they fail the event instead.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
FLUSH_STALL_SECONDS = 30


def wake_flush(conn: redis.Redis, runtime: Runtime) -> bool:
    """Queue a flush now if changes waited 30 s past the window and none is pending (a net
    for a flush lost with a worker or held by a scheduler that died with Redis)."""
    due = time.time() - runtime.settings.flush_window_seconds - FLUSH_STALL_SECONDS
    for key in (ledger.DIRTY_KEY, plays.DIRTY_KEY):
        oldest: Any = conn.zrange(key, 0, 0, withscores=True)
        if oldest and float(oldest[0][1]) <= due:
            return schedule_flush(conn, runtime, delay=0)  # unless a flush (or its wait) is pending
    return False


def schedule_flush(
    conn: redis.Redis, runtime: Runtime, delay: float | None = None, force: bool = False
) -> bool:
    """Ask for a flush after the debounce window (once, however many events arrive)."""
    window = runtime.settings.flush_window_seconds if delay is None else delay
    return schedule_once(conn, FLUSH_JOB, window, window + 30, force)


@dataclass
class _Merge:
    """An event waiting for the batch's ledger merge; ``result`` is what its caller got."""

    event: Event
    email: str
    changes: list[PropertyChange]
    play: ledger.Merge | None  # what the event merges into its play, if it has one
    result: dict[str, Any]

    def contact(self) -> ledger.Merge:
        """What the event merges into its learner's contact."""
        return ledger.Merge(self.email, self.changes, self.event.id, self.email, self.event.user_id)


class Batch:
    """One batch's shared state: deferred writes and merges, emails learnt, who waits."""

    def __init__(
        self, conn: redis.Redis, runtime: Runtime, user_ids: Iterable[str | None] = ()
    ) -> None:
        self.conn = conn
        self.runtime = runtime
        self.writes: Pipeline = conn.pipeline(transaction=False)
        self.resolver = identity.IdentityResolver(
            conn, runtime.mapping.identity, runtime.lookup, writes=self.writes
        )
        self.waiting = identity.waiting_among(conn, {u for u in user_ids if u})
        self.merges: list[_Merge] = []
        self.unpark: list[tuple[str, list[str]]] = []  # released events, forgotten once merged
        self.changed = self.parked = False

    def count(self, outcome: str, event_type: str) -> None:
        """Count an event outcome, overall and by type."""
        self.writes.hincrby(STATS_KEY, f"events:{outcome}", 1)
        self.writes.hincrby(STATS_KEY, f"events:{outcome}:{event_type}", 1)

    def commit(self) -> None:
        """Merge into the ledger, send the deferred writes, ask for the flush and retries."""
        self._merge_all()
        for user_id, event_ids in self.unpark:
            identity.unpark(self.conn, user_id, event_ids)
        for reply in self.writes.execute(raise_on_error=False):  # counters, trails, cache
            if isinstance(reply, redis.ResponseError):
                log.warning("a counter or trail write failed: %s", reply)
        self._release_late()
        if self.changed:
            schedule_flush(self.conn, self.runtime)
        if self.parked:
            first = identity.BACKOFF[0]
            schedule_once(self.conn, RETRY_PARKED_JOB, first, first)

    def _release_late(self) -> None:
        """Release learners another worker parked while this batch learnt their email.

        This batch cached the emails before looking; a worker parking an event looks at the
        cache after parking it: whichever comes second sees the other, so none waits.
        """
        learnt = dict(self.resolver.known)
        late = identity.waiting_among(self.conn, set(learnt))
        if late:
            extra = Batch(self.conn, self.runtime, late)
            for user_id in sorted(late):
                release(extra, user_id, learnt[user_id])
            extra.commit()

    def _merge_all(self) -> None:
        """Every merge of the batch at once; one by one if that raises, to isolate the cause."""
        try:
            flags = self._merge_together(self.merges)
        except TRANSIENT:
            raise
        except Exception:  # a bug or an odd value: find the event, spare the others
            log.exception("merging %d events at once failed; merging one by one", len(self.merges))
            flags = [self._merge_alone(merge) for merge in self.merges]
        for merge, changed in zip(self.merges, flags, strict=True):
            if merge.result["status"] == "merged":
                marker = CURRENT_EVENT.set(merge.event.id)
                self._merged(merge, changed)
                CURRENT_EVENT.reset(marker)

    def _merge_together(self, merges: list[_Merge]) -> list[bool]:
        """Merge events into their contacts and plays (two scripts); per event: changed?"""
        flags = ledger.merge_many(self.conn, [merge.contact() for merge in merges])
        with_play = [(index, merge.play) for index, merge in enumerate(merges) if merge.play]
        played = plays.merge_many(self.conn, [play for _, play in with_play])
        for (index, _), changed in zip(with_play, played, strict=True):
            flags[index] = flags[index] or changed
        return flags

    def _merge_alone(self, merge: _Merge) -> bool:
        """Merge one event; if it raises, the event becomes a visible failure."""
        try:
            return self._merge_together([merge])[0]
        except TRANSIENT:
            raise
        except Exception as exc:
            merge.result.update(_fail(self, merge.event.id, merge.event.body, exc))
            return False

    def _merged(self, merge: _Merge, changed: bool) -> None:
        """Trail, count and log a merged event."""
        event = merge.event
        trace.note(
            self.writes,
            merge.email,
            "event",
            event.user_id,
            event_id=event.id,
            type=event.type,
            timestamp=event.body.get("timestamp"),
            changed=changed,
            changes={change.name: change.value for change in merge.changes},
        )
        self.changed = self.changed or changed
        self.count("merged", event.type)
        merge.result["changed"] = changed
        log.info(
            "event %s (%s) merged for user %s: %d properties, %s",
            event.id,
            event.type,
            event.user_id,
            len(merge.changes),
            "changed" if changed else "no change",
        )


def handle_batch(conn: redis.Redis, runtime: Runtime, entries: list[Entry]) -> Counter[str]:
    """Handle taken events; an event that raises becomes a visible failure, the rest go on."""
    batch = Batch(conn, runtime, (_user_id(entry.body) for entry in entries))
    results = []
    for entry in entries:
        marker = CURRENT_EVENT.set(entry.message_id)
        try:
            results.append(handle(batch, parse_event(entry.message_id, entry.body)))
        except TRANSIENT:
            raise  # nothing is acknowledged: the batch is taken again
        except Exception as exc:  # one broken event must not hold up the others
            results.append(_fail(batch, entry.message_id, entry.body, exc))
        finally:
            CURRENT_EVENT.reset(marker)
    batch.commit()
    return Counter(str(result["status"]) for result in results)


def handle_event(conn: redis.Redis, runtime: Runtime, event: Event) -> dict[str, Any]:
    """Handle one event on its own (a batch of one)."""
    batch = Batch(conn, runtime, [event.user_id])
    result = handle(batch, event)
    batch.commit()
    return result


def _user_id(body: dict[str, Any]) -> str | None:
    value = body.get("user_id")
    return value if isinstance(value, str) and value else None


def _fail(batch: Batch, event_id: str, body: dict[str, Any], exc: Exception) -> dict[str, Any]:
    """Keep an event that could not be handled as a failure an operator can requeue."""
    reason = f"{type(exc).__name__}: {exc}"
    log.exception("event %s failed: %s", event_id, reason)
    failures.record(batch.conn, "other", reason, event_id, json.dumps(body))
    batch.count("failed", str(body.get("type")))
    return {"status": "failed", "reason": reason}


def handle(batch: Batch, event: Event) -> dict[str, Any]:
    """Resolve, map and merge one event; returns what happened to it."""
    mapping = batch.runtime.mapping
    direct = identity.email_in(event.params, mapping.identity.email_params)
    if direct and event.user_id:  # any event naming the email frees the learner's waiting ones
        batch.resolver.learn(event.user_id, direct)
        release(batch, event.user_id, direct)
    kind = mapping.classify(event.type)
    if kind != "mapped":
        batch.count("skipped" if kind == "ignored" else "unknown", event.type)
        log.info(
            "event %s (%s) %s by the mapping",
            event.id,
            event.type,
            "ignored" if kind == "ignored" else "not mapped",
        )
        return {"status": kind}
    found = batch.resolver.resolve(event)
    if found.email is None:
        return _wait_for_identity(batch, event)
    if found.source == "lookup" and event.user_id:  # earlier events may wait for this answer
        release(batch, event.user_id, found.email)
    return _merge(batch, event, found.email)


def _merge(batch: Batch, event: Event, email: str) -> dict[str, Any]:
    """Apply the mapping and merge the result into the learner's ledger."""
    conn, mapping = batch.conn, batch.runtime.mapping
    try:
        changes = apply_event(mapping, event, email)
    except MappingFailure as exc:
        failures.record(conn, "mapping", exc.reason, event.id, json.dumps(event.body))
        trace.note(
            batch.writes,
            email,
            "failed",
            event.user_id,
            event_id=event.id,
            type=event.type,
            reason=exc.reason,
        )
        batch.count("failed", event.type)
        log.error("event %s (%s) failed in the mapping: %s", event.id, event.type, exc.reason)
        return {"status": "failed", "reason": exc.reason}
    result: dict[str, Any] = {"status": "merged"}
    play = plays.play_merge(mapping, event, email)
    batch.merges.append(_Merge(event, email, changes, play, result))
    return result  # "changed" is filled in when the batch is merged


def _wait_for_identity(batch: Batch, event: Event) -> dict[str, Any]:
    """Park an event whose learner has no email yet (or fail it if it never can have one)."""
    if not event.user_id:
        reason = "event has no user_id and no email parameter: the learner cannot be identified"
        failures.record(batch.conn, "identity", reason, event.id, json.dumps(event.body))
        batch.count("failed", event.type)
        return {"status": "failed", "reason": reason}
    identity.park(batch.conn, event)
    batch.waiting.add(event.user_id)
    batch.parked = True
    batch.count("parked", event.type)
    email = identity.cached_email(batch.conn, event.user_id)  # cached meanwhile elsewhere?
    if email:
        release(batch, event.user_id, email)
    return {"status": "parked"}


def release(batch: Batch, user_id: str, email: str) -> int:
    """Merge every event that was waiting for this user's email.

    The events stay parked until the batch is merged (``Batch.commit`` forgets them), so a
    batch that fails midway loses none. Skipped for learners not waiting when the batch began
    (nor parked by it); ``Batch.commit`` looks again for those parked meanwhile.
    """
    if user_id not in batch.waiting:
        return 0
    batch.waiting.discard(user_id)
    waiting = identity.parked_events(batch.conn, user_id)
    for event_id, body in waiting:
        _merge(batch, parse_event(event_id, body), email)
    batch.unpark.append((user_id, [event_id for event_id, _ in waiting]))
    if waiting:
        log.info("released %d waiting event(s) of user %s", len(waiting), user_id)
    return len(waiting)
