"""Handling accepted events: find the learner, apply the mapping, merge, or wait for an email.

Events are handled in batches (``Batch``): writes nothing in the batch reads back (counters,
trails, the identity cache) share one pipeline, who waits for an email is read once, the
ledger merges are folded per contact and written by one script, and one flush is asked
for. A batch of 100 costs ~5 round trips where one event alone cost ~11. Each event ends
with a frozen ``Handled`` outcome once the batch is committed.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import redis
from redis.client import Pipeline

from instruqt_crm.errors import Category, MappingFailure
from instruqt_crm.events import Event, EventError, check_body, parse_event
from instruqt_crm.journal import counters, failures, trail
from instruqt_crm.logs import CURRENT_EVENT
from instruqt_crm.mapping import PropertyChange, apply_event, skip_reason

from . import identity, ledger, mapping_record, plays
from .flush import schedule_flush
from .inbox import BACKFILL, Entry
from .queueing import RETRY_PARKED_JOB, schedule_once
from .runtime import Runtime

log = logging.getLogger(__name__)
# Redis errors that pass: the batch stays unacknowledged and is taken again. Others (a
# script or type error) would fail the same way every time, so they fail the event instead.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
Status = Literal["merged", "parked", "failed", "ignored", "unknown", "skipped"]


@dataclass(frozen=True)
class Handled:
    """What became of one event: merged (``changed``: did a value change?), parked to wait
    for the learner's email, failed (``reason``), ignored or unknown by its type, or skipped
    by a mapping condition (``reason``: which)."""

    event_id: str
    status: Status
    reason: str = ""
    changed: bool = False


@dataclass(frozen=True)
class Retried:
    """What a retry of waiting learners did: events released (merged) and expired (failed)."""

    released: int
    expired: int


@dataclass
class _Merge:
    """An event staged for the batch's ledger merge."""

    event: Event
    email: str
    changes: list[PropertyChange]
    play: ledger.Merge | None  # what the event merges into its play, if it has one
    names: tuple[str | None, str | None] = (None, None)  # the learner's, as Instruqt gave them

    def contact(self) -> ledger.Merge:
        """What the event merges into its learner's contact."""
        event = self.event
        return ledger.Merge(
            self.email, self.changes, event.id, self.email, event.user_id, *self.names
        )


class Batch:
    """One batch of events: handles them, stages merges and writes, commits them together."""

    def __init__(
        self,
        conn: redis.Redis,
        runtime: Runtime,
        user_ids: Iterable[str | None] = (),
        hold: bool = False,
    ) -> None:
        self.conn = conn
        self.runtime = runtime
        self.hold = hold  # a backfill's events: their learners are sent when it ends
        self.writes: Pipeline = conn.pipeline(transaction=False)
        users = {u for u in user_ids if u}
        self.resolver = identity.IdentityResolver(
            conn, runtime.mapping.identity, runtime.lookup, writes=self.writes, user_ids=users
        )
        self._waiting = identity.waiting_among(conn, users)
        self._merges: list[_Merge] = []
        # per event given to handle or fail, in order: its outcome, or the position of its
        # staged merge (the outcome is known at commit)
        self._outcomes: list[Handled | int] = []
        self._unpark: list[tuple[str, list[str]]] = []  # released events, forgotten once merged
        self._changed = self._parked = False

    # -- handling ------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """Resolve, map and stage one event (its outcome is final at ``commit``)."""
        mapping = self.runtime.mapping
        direct = identity.email_in(event.params, mapping.identity.email_params)
        kind = mapping.classify(event.type)
        if kind != "mapped":
            if direct and event.user_id in self._waiting:  # it may still reveal their email
                self._release_found(event, self.resolver.resolve(event))
            self._count("skipped" if kind == "ignored" else "unknown", event.type)
            log.info(
                "event %s (%s) %s by the mapping",
                event.id,
                event.type,
                "ignored" if kind == "ignored" else "not mapped",
            )
            self._outcomes.append(Handled(event.id, kind))
            return
        known = self.resolver.cached(event.user_id) if event.user_id else None
        skipped = self._skipped(event, known.email if known else direct)  # no lookup
        if skipped is not None:
            self._outcomes.append(skipped)
            return
        found = self.resolver.resolve(event)
        if found.email is None:
            self._outcomes.append(self._park(event))
            return
        self._release_found(event, found)  # earlier events may wait for this answer
        self._outcomes.append(self._stage(event, found.email, found.learner))

    def _release_found(self, event: Event, found: identity.Resolution) -> None:
        """Release the learner's waiting events when an email was found for them."""
        if found.email and event.user_id:
            self.release(event.user_id, found.email, found.learner)

    def fail(self, event_id: str, body: dict[str, Any], exc: Exception) -> None:
        """Keep an event that could not be handled as a failure an operator can requeue."""
        self._outcomes.append(self._failed(event_id, body, exc))

    def release(self, user_id: str, email: str, learner: identity.Learner | None = None) -> int:
        """Stage every event that was waiting for this learner's email; how many.

        The events stay parked until the batch is merged (``commit`` forgets them), so a
        batch that fails midway loses none. Skipped for learners not waiting when the batch
        began (nor parked by it); ``commit`` looks again for those parked meanwhile.
        """
        if user_id not in self._waiting:
            return 0
        self._waiting.discard(user_id)
        waiting = identity.parked_events(self.conn, user_id)
        for event_id, body in waiting:
            event = parse_event(event_id, body)
            if self._skipped(event, email) is None:  # skipped events stay skipped
                self._stage(event, email, learner)
        self._unpark.append((user_id, [event_id for event_id, _ in waiting]))
        if waiting:
            log.info("released %d waiting event(s) of user %s", len(waiting), user_id)
        return len(waiting)

    def expire(self, user_id: str, reason: str) -> int:
        """Give up on a learner's waiting events: each becomes a counted, visible failure."""
        events = identity.parked_events(self.conn, user_id)
        for event_id, body in events:
            invalid = self._invalid_email(parse_event(event_id, body))
            failures.record(
                self.conn,
                failures.Kind.EVENT,
                Category.IDENTITY,
                reason if invalid is None else f"{reason}; its invalid email {invalid!r} unused",
                event_id,
                json.dumps(body),
            )
            self._count("expired", str(body.get("type")))
        self._unpark.append((user_id, [event_id for event_id, _ in events]))
        log.warning("%d event(s) of user %s expired: %s", len(events), user_id, reason)
        return len(events)

    def _invalid_email(self, event: Event) -> str | None:
        """An email parameter of the event that was not used because it is invalid."""
        return identity.invalid_email_in(event.params, self.runtime.mapping.identity.email_params)

    def _count(self, outcome: str, event_type: str) -> None:
        counters.count_event(self.writes, outcome, event_type)

    def _skipped(self, event: Event, email: str | None) -> Handled | None:
        """The outcome of an event a skip condition holds for (counted, trailed), or of one
        whose condition failed to render (a mapping failure); None: go on with it."""
        try:
            reason = skip_reason(self.runtime.mapping, event, email)
        except MappingFailure as exc:
            return self._mapping_failed(event, email, exc.reason)
        return None if reason is None else self._skip(event, reason, email)

    def _skip(self, event: Event, reason: str, email: str | None) -> Handled:
        """Count (and, when the learner's email is known, trail) an event the mapping skips;
        no lookup is made for it."""
        self._count("skipped", event.type)
        counters.count_skip(self.writes, reason)
        if email:
            trail.note(
                self.writes,
                email,
                "skipped",
                event_id=event.id,
                type=event.type,
                reason=reason,
            )
        log.info("event %s (%s) skipped by the mapping: %s", event.id, event.type, reason)
        return Handled(event.id, "skipped", reason)

    def _stage(
        self, event: Event, email: str, learner: identity.Learner | None = None
    ) -> Handled | int:
        """Apply the mapping and stage the merge into the learner's ledger: the position of
        the staged merge, or the outcome when the mapping fails."""
        mapping = self.runtime.mapping
        names = (learner.first_name, learner.last_name) if learner else (None, None)
        try:
            changes = apply_event(mapping, event, email, names)
        except MappingFailure as exc:
            return self._mapping_failed(event, email, exc.reason)
        play = plays.play_merge(mapping, event, email)
        self._merges.append(_Merge(event, email, changes, play, names))
        return len(self._merges) - 1

    def _mapping_failed(self, event: Event, email: str | None, reason: str) -> Handled:
        """Keep an event the mapping cannot turn into values (a template failed) as a failure,
        in the learner's trail when their email is known."""
        body = json.dumps(event.body)
        failures.record(self.conn, failures.Kind.EVENT, Category.MAPPING, reason, event.id, body)
        if email:
            trail.note(
                self.writes,
                email,
                "failed",
                event_id=event.id,
                type=event.type,
                reason=reason,
            )
        self._count("failed", event.type)
        log.error("event %s (%s) failed in the mapping: %s", event.id, event.type, reason)
        return Handled(event.id, "failed", reason)

    def _park(self, event: Event) -> Handled:
        """Park an event whose learner has no email yet (or fail it if it never can have one)."""
        if not event.user_id:
            invalid = self._invalid_email(event)
            given = "no email parameter" if invalid is None else f"invalid email {invalid!r}"
            reason = f"event has no user_id and {given}: the learner cannot be identified"
            failures.record(
                self.conn,
                failures.Kind.EVENT,
                Category.IDENTITY,
                reason,
                event.id,
                json.dumps(event.body),
            )
            self._count("failed", event.type)
            return Handled(event.id, "failed", reason)
        identity.park(self.conn, event)
        self._waiting.add(event.user_id)
        self._parked = True
        self._count("parked", event.type)
        known = identity.cached_learner(self.conn, event.user_id)  # cached meanwhile elsewhere?
        if isinstance(known, identity.Learner):
            self.release(event.user_id, known.email, known)
        return Handled(event.id, "parked")

    def _failed(self, event_id: str, body: dict[str, Any], exc: Exception) -> Handled:
        """Record an event whose handling raised."""
        reason = f"{type(exc).__name__}: {exc}"
        log.exception("event %s failed: %s", event_id, reason)
        failures.record(
            self.conn, failures.Kind.EVENT, Category.OTHER, reason, event_id, json.dumps(body)
        )
        self._count("failed", str(body.get("type")))
        return Handled(event_id, "failed", reason)

    # -- commit --------------------------------------------------------------------------

    def commit(self) -> list[Handled]:
        """Merge into the ledger, send the deferred writes, ask for the flush and retries;
        the outcome of each event given to ``handle`` or ``fail``, in order."""
        merged = self._merge_all()
        names = {change.name for merge in self._merges for change in merge.changes}
        mapping_record.note_merged(self.writes, self.runtime.mapping, names)  # what `check` reads
        # Released events leave the parked set in the same pipeline, after their trail
        # entries: if Redis goes away midway, an event is still parked (released again, its
        # merge repeated without change) or its trail already says where it went.
        for user_id, event_ids in self._unpark:
            identity.unpark(self.writes, user_id, event_ids)
        for reply in self.writes.execute(raise_on_error=False):  # counters, trails, cache
            if isinstance(reply, redis.ResponseError):
                log.warning("a counter, trail or waiting-event write failed: %s", reply)
        self._release_late()
        if self._changed and not self.hold:  # held learners: flushed when the backfill ends
            schedule_flush(self.conn, self.runtime.settings.flush_window_seconds)
        if self._parked:
            first = identity.BACKOFF[0]
            schedule_once(self.conn, RETRY_PARKED_JOB, first, first)
        return [merged[found] if isinstance(found, int) else found for found in self._outcomes]

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
                extra.release(user_id, learnt[user_id].email, learnt[user_id])
            extra.commit()

    def _merge_all(self) -> list[Handled]:
        """Every staged merge at once (one by one if that raises, to isolate the cause);
        the outcome of each, in the order they were staged."""
        try:
            flags: list[bool | Handled] = list(self._merge_together(self._merges))
        except TRANSIENT:
            raise
        except Exception:  # a bug or an odd value: find the event, spare the others
            log.exception("merging %d events at once failed; merging one by one", len(self._merges))
            flags = [self._merge_alone(merge) for merge in self._merges]
        final = []
        for merge, flag in zip(self._merges, flags, strict=True):
            if isinstance(flag, Handled):
                final.append(flag)
                continue
            marker = CURRENT_EVENT.set(merge.event.id)
            self._merged(merge, flag)
            CURRENT_EVENT.reset(marker)
            final.append(Handled(merge.event.id, "merged", changed=flag))
        return final

    def _merge_together(self, merges: list[_Merge]) -> list[bool]:
        """Merge events into their contacts and plays (two scripts); per event: changed?"""
        idle = self.runtime.settings.state_idle_seconds
        contacts = [merge.contact() for merge in merges]
        flags = ledger.merge_many(self.conn, contacts, idle, hold=self.hold)
        with_play = [(index, merge.play) for index, merge in enumerate(merges) if merge.play]
        played = plays.merge_many(self.conn, [play for _, play in with_play], idle)
        for (index, _), changed in zip(with_play, played, strict=True):
            flags[index] = flags[index] or changed
        return flags

    def _merge_alone(self, merge: _Merge) -> bool | Handled:
        """Merge one event: changed? If it raises, the event becomes a visible failure."""
        try:
            return self._merge_together([merge])[0]
        except TRANSIENT:
            raise
        except Exception as exc:
            return self._failed(merge.event.id, merge.event.body, exc)

    def _merged(self, merge: _Merge, changed: bool) -> None:
        """Trail, count and log a merged event."""
        event = merge.event
        trail.note(
            self.writes,
            merge.email,
            "event",
            event_id=event.id,
            type=event.type,
            timestamp=event.body.get("timestamp"),
            changed=changed,
            changes={change.name: change.value for change in merge.changes},
        )
        self._changed = self._changed or changed
        self._count("merged", event.type)
        log.info(
            "event %s (%s) merged for user %s: %d properties, %s",
            event.id,
            event.type,
            event.user_id,
            len(merge.changes),
            "changed" if changed else "no change",
        )


def handle_batch(conn: redis.Redis, runtime: Runtime, entries: list[Entry]) -> Counter[str]:
    """Handle taken events; how many ended in each status. Every event ends somewhere: if the
    batch as a whole raises (not only one event's step), its events are handled one by one,
    and one that still raises is kept as a failure with its body and reason."""
    try:
        return _handle_together(conn, runtime, entries)
    except TRANSIENT:
        raise  # nothing is acknowledged: the batch is taken again
    except Exception as exc:
        if len(entries) == 1:
            return Counter([_poisoned(conn, entries[0], exc).status])
        log.exception("handling %d events together failed; one by one now", len(entries))
        outcomes = Counter[str]()
        for entry in entries:
            outcomes.update(handle_batch(conn, runtime, [entry]))
        return outcomes


def _handle_together(conn: redis.Redis, runtime: Runtime, entries: list[Entry]) -> Counter[str]:
    """Handle events as one batch; an event whose own step raises becomes a failure."""
    hold = bool(entries) and entries[0].lane == BACKFILL
    batch = Batch(conn, runtime, (_user_id(entry.body) for entry in entries), hold)
    for entry in entries:
        marker = CURRENT_EVENT.set(entry.message_id)
        try:
            batch.handle(parse_event(entry.message_id, entry.body))
        except TRANSIENT:
            raise
        except Exception as exc:  # one broken event must not hold up the others
            batch.fail(entry.message_id, entry.body, exc)
        finally:
            CURRENT_EVENT.reset(marker)
    return Counter(outcome.status for outcome in batch.commit())


def _poisoned(conn: redis.Redis, entry: Entry, exc: Exception) -> Handled:
    """Keep an event that cannot be handled even alone as a failure (with its body), counted."""
    reason = f"{type(exc).__name__}: {exc}"
    log.error("event %s failed even on its own: %s", entry.message_id, reason, exc_info=exc)
    body = json.dumps(entry.body)  # ASCII: text Redis could not take is escaped
    failures.record(conn, failures.Kind.EVENT, Category.OTHER, reason, entry.message_id, body)
    try:
        event_type = check_body(entry.body)
    except EventError:
        event_type = "invalid"
    counters.count_event(conn, "failed", event_type)
    return Handled(entry.message_id, "failed", reason)


def handle_event(conn: redis.Redis, runtime: Runtime, event: Event) -> Handled:
    """Handle one event on its own (a batch of one)."""
    batch = Batch(conn, runtime, [event.user_id])
    batch.handle(event)
    return batch.commit()[0]


def retry_waiting(conn: redis.Redis, runtime: Runtime, now: float | None = None) -> Retried:
    """Release waiting learners whose email can now be found; expire those past the wait;
    schedule the next retry."""
    moment = time.time() if now is None else now
    due = identity.due(conn, moment)
    batch = Batch(conn, runtime, due)
    days = runtime.settings.identity_wait_days
    released = expired = 0
    for user_id in due:
        found = batch.resolver.resolve_user(user_id)
        if found.email:
            released += batch.release(user_id, found.email, found.learner)
        elif moment - (identity.parked_since(conn, user_id) or moment) >= days * 86400:
            reason = f"no email found for user {user_id} within {days:g} days"
            expired += batch.expire(user_id, reason)
        else:
            identity.postpone(conn, user_id, moment)
    batch.commit()
    upcoming = identity.next_due(conn)
    if upcoming is not None:
        delay = max(1.0, upcoming - moment)
        schedule_once(conn, RETRY_PARKED_JOB, delay, delay)
    return Retried(released, expired)


def _user_id(body: dict[str, Any]) -> str | None:
    """The event's learner id as ``parse_event`` reads it, if it has a usable one."""
    value = body.get("user_id")
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        return None
    return str(value)
