"""``instruqt-crm backfill``: past plays from Instruqt's play report, queued as the events
their webhooks would have sent (``play_events``), in the inbox's backfill lane.

The report is read in windows of WINDOW of play start times, up to PAGE_SIZE plays a page,
paced by ``PlayReports``: paging by skip is only stable for plays that no longer change,
and a window of past days holds few that still do. After each page, its events, the emails
Instruqt gave with the report (cached as a lookup's answer would be) and the checkpoint
(window, skip, counts) are written in one transaction: an interrupted run continues where
its last page ended, and a page read twice queues the same events under the same ids,
which the ledger merges once.

The reader waits while MAX_QUEUED backfill events wait for the workers, so Redis holds a
bounded backlog; workers take backfill events only while no live event waits (``inbox``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import redis
from redis.client import Pipeline
from rq import Worker

from instruqt_crm import keys
from instruqt_crm.engine import flush, identity, inbox
from instruqt_crm.events import EventError, format_timestamp, parse_timestamp
from instruqt_crm.instruqt_reports import Challenge, PlayReport, PlayReports, ReportPage
from instruqt_crm.keys import text
from instruqt_crm.mapping import Mapping

from .play_events import PlayEvent, events_of
from .preview import Item, Preview, preview

log = logging.getLogger(__name__)

WINDOW = timedelta(days=7)
PAGE_SIZE = 100
MAX_QUEUED = 5_000  # backfill events waiting for the workers before the reader pauses
CHECKPOINT_TTL = 30 * 86400
NO_WORKER_SECONDS = 30.0  # waiting this long with no worker running is said plainly
# The reader says it still reads for this long before each request to Instruqt and while it
# waits: longer than one request can take (4 attempts of up to 10 s, 3 Retry-After waits of up
# to 60 s, pacing up to 100 s), so workers never take it for gone while it waits on one.
READING_SECONDS = 600
COUNTS = (
    *("plays", "developer_skipped", "malformed", "unreadable", "events", "stand_ins"),
    "repeated",  # a play the report listed again on a later page of its window (not counted)
)


class BackfillError(Exception):
    """The backfill cannot run as asked (say, a track slug the team does not have)."""


@dataclass(frozen=True)
class Plan:
    """What to backfill: the team, the range of play start times, tracks, developer plays."""

    team: str
    since: datetime
    until: datetime
    track_slugs: tuple[str, ...] = ()
    include_developer: bool = False
    open_ended: bool = False  # no end was given: ``until`` is the first run's "now"

    @property
    def run_id(self) -> str:
        """The same for the same plan, so running it again continues its checkpoint (an
        open-ended plan continues up to the end its first run fixed)."""
        end = "open" if self.open_ended else format_timestamp(self.until)
        parts = [self.team, format_timestamp(self.since), end]
        parts += [*sorted(self.track_slugs), str(self.include_developer)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def windows(self, start: datetime | None = None) -> Iterator[tuple[datetime, datetime]]:
        """The windows of play start times, oldest first (from ``start`` when resuming)."""
        begin = start or self.since
        while begin < self.until:
            end = min(begin + WINDOW, self.until)
            yield begin, end
            begin = end


@dataclass
class Progress:
    """Where a run stands: the plays the report holds for it, what was read and queued."""

    total: int = 0
    window: datetime | None = None
    skip: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    learners: int = 0
    without_email: int = 0
    waiting: str | None = None  # why the reader is waiting, while it waits
    resumed: bool = False

    @property
    def read(self) -> int:
        """Plays read so far (queued, skipped as developer plays, malformed or unreadable)."""
        return self.counts["plays"] + self.counts["malformed"]


class Backfill:
    """Read a plan's plays and queue their events (``run``), or fold them in memory
    (``dry_run``), reporting progress after every page."""

    def __init__(
        self,
        conn: redis.Redis | None,
        reports: PlayReports,
        mapping: Mapping,
        plan: Plan,
        max_queued: int = MAX_QUEUED,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.conn = conn
        self.reports = reports
        self.mapping = mapping
        self.plan = plan
        self.max_queued = max_queued
        self._sleep = sleep
        self._challenges: dict[str, list[Challenge]] = {}
        self._track_ids: tuple[str, ...] | None = None
        self._reading = False  # while ``run`` reads: its mark is renewed before each request
        self.checkpoint = keys.backfill(plan.run_id)
        self.learner_set = keys.backfill(plan.run_id, "learners")
        self.emailed_set = keys.backfill(plan.run_id, "emailed")
        self.seen_set = keys.backfill(plan.run_id, "seen")  # play ids of the current window
        self._seen: set[str] = set()

    def track_ids(self) -> tuple[str, ...]:
        """The ids of the plan's tracks (read once); BackfillError for an unknown slug."""
        if self._track_ids is None:
            found = []
            for slug in self.plan.track_slugs:
                self._still_reading()
                track_id = self.reports.track_id(slug)
                if track_id is None:
                    raise BackfillError(f"team {self.plan.team} has no track {slug!r}")
                found.append(track_id)
            self._track_ids = tuple(found)
        return self._track_ids

    def run(self, on_page: Callable[[Progress], None], restart: bool = False) -> Progress:
        """Queue the plan's plays' events, continuing its checkpoint unless ``restart``; the
        checkpoint is deleted when every window was read."""
        conn = self._redis()
        if restart:
            conn.delete(self.checkpoint, self.learner_set, self.emailed_set, self.seen_set)
        self._reading = True
        self._still_reading()
        try:
            progress = self._read_all(conn, on_page)
        finally:  # its learners are sent once the workers took its last events
            self._reading = False
            inbox.backfill_stopped(conn, self.plan.run_id)
            flush.release_backfilled(conn)
        conn.delete(self.checkpoint, self.learner_set, self.emailed_set, self.seen_set)
        return progress

    def _read_all(self, conn: redis.Redis, on_page: Callable[[Progress], None]) -> Progress:
        """Read and queue every window from the checkpoint on."""
        progress = self._resume(conn)
        if not progress.total:
            progress.total = self._total()
        on_page(progress)
        for start, end in self.plan.windows(progress.window):
            resumed = start == progress.window
            self._seen = {text(i) for i in conn.smembers(self.seen_set)} if resumed else set()
            for page, skip in self._pages(start, end, progress.skip if resumed else 0):
                self._wait_for_room(conn, progress, on_page)
                self._queue(conn, page, progress, start, skip)
                inbox.backfill_reading(conn, READING_SECONDS, self.plan.run_id)
                on_page(progress)
        return progress

    def dry_run(self, on_page: Callable[[Progress], None]) -> tuple[Progress, Preview]:
        """What the plan's plays would write per learner, folded by ``preview`` (nothing is
        queued or stored)."""
        progress = Progress(total=self._total())
        items: list[Item] = []
        emails: dict[str, str] = {}  # what Instruqt gave, by user id
        learners: set[str] = set()
        emailed: set[str] = set()
        on_page(progress)
        for start, end in self.plan.windows():
            self._seen = set()
            for page, _ in self._pages(start, end, 0):
                for play, made in self._events(page, progress.counts):
                    learners.add(play.user_id)
                    if found := self._instruqt_email(play):
                        emails[play.user_id] = found
                    if self._email(play):
                        emailed.add(play.user_id)
                    items += [Item(event.id, event.body, event.id) for event in made]
                progress.learners = len(learners)
                progress.without_email = len(learners - emailed)
                on_page(progress)
        return progress, preview(self.mapping, items, emails=emails)

    def _still_reading(self) -> None:
        """Renew the mark that a backfill reads (not in a dry run): held learners wait."""
        if self._reading and self.conn is not None:
            inbox.backfill_reading(self.conn, READING_SECONDS, self.plan.run_id)

    def _redis(self) -> redis.Redis:
        if self.conn is None:
            raise BackfillError("a backfill that queues events needs Redis")
        return self.conn

    def _total(self) -> int:
        """How many plays the report holds for the plan (one request)."""
        self._still_reading()
        page = self.reports.page(self.plan.since, self.plan.until, 0, 1, self.track_ids())
        return page.total

    def _resume(self, conn: redis.Redis) -> Progress:
        """The progress the checkpoint holds (a fresh one when there is none)."""
        saved = {text(k): text(v) for k, v in conn.hgetall(self.checkpoint).items()}
        if not saved:
            return Progress()
        self.plan = replace(self.plan, until=parse_timestamp(saved["until"]))
        counts = Counter({name: int(saved.get(name, 0)) for name in COUNTS})
        learners, emailed = conn.scard(self.learner_set), conn.scard(self.emailed_set)
        log.info(
            "backfill %s resumes at %s, skip %s", self.plan.run_id, saved["window"], saved["skip"]
        )
        return Progress(
            total=int(saved.get("total", 0)),
            window=parse_timestamp(saved["window"]),
            skip=int(saved["skip"]),
            counts=counts,
            learners=int(learners),
            without_email=int(learners) - int(emailed),
            resumed=True,
        )

    def _pages(self, start: datetime, end: datetime, skip: int) -> Iterator[tuple[ReportPage, int]]:
        """The window's pages from ``skip`` on, each with the skip after it."""
        while True:
            self._still_reading()
            page = self.reports.page(start, end, skip, PAGE_SIZE, self.track_ids())
            taken = len(page.items) + page.malformed
            if not taken:
                return
            skip += taken
            yield page, skip
            if skip >= page.total:
                return

    def _events(
        self, page: ReportPage, counts: Counter[str]
    ) -> Iterator[tuple[PlayReport, list[PlayEvent]]]:
        """The page's plays to queue, with their events; counts what was left out and why (a
        play already read in this window is neither counted nor queued again)."""
        counts["malformed"] += page.malformed
        for play in page.items:
            if play.id in self._seen:
                counts["repeated"] += 1
                continue
            self._seen.add(play.id)
            counts["plays"] += 1
            if play.is_developer and not self.plan.include_developer:
                counts["developer_skipped"] += 1
                continue
            challenges = self._challenges_of(play)
            try:
                made = events_of(play, challenges)
            except EventError as exc:
                counts["unreadable"] += 1
                log.warning("play %s left out: %s", play.id, exc)
                continue
            if play.completed_challenges > len(challenges):
                counts["stand_ins"] += 1
            counts["events"] += len(made)
            yield play, made

    def _challenges_of(self, play: PlayReport) -> list[Challenge]:
        """The play's track's challenges by index (read once per track, only when needed)."""
        if play.completed_challenges <= 0:
            return []
        if play.track_id not in self._challenges:
            self._still_reading()
            self._challenges[play.track_id] = self.reports.challenges(play.track_id)
        return self._challenges[play.track_id]

    def _instruqt_email(self, play: PlayReport) -> str | None:
        """The email Instruqt gave with the report, when the mapping asks Instruqt at all."""
        if not self.mapping.identity.lookup or play.profile is None:
            return None
        return play.profile.email

    def _email(self, play: PlayReport) -> str | None:
        """The email the workers will find: Instruqt's, else one in the play's parameters."""
        params = identity.email_in(play.custom_parameters, self.mapping.identity.email_params)
        return self._instruqt_email(play) or params

    def _queue(
        self, conn: redis.Redis, page: ReportPage, progress: Progress, window: datetime, skip: int
    ) -> None:
        """Queue a page's events, cache its emails and move the checkpoint, in one transaction."""
        with conn.pipeline(transaction=True) as pipe:
            if window != progress.window:  # the first page of a window: forget the last one's
                pipe.delete(self.seen_set)
            if page.items:
                pipe.sadd(self.seen_set, *(play.id for play in page.items))
            for play, made in self._events(page, progress.counts):
                self._remember(pipe, play)
                pipe.sadd(self.learner_set, play.user_id)
                if self._email(play):
                    pipe.sadd(self.emailed_set, play.user_id)
                for event in made:
                    inbox.add(pipe, event.id, event.body, inbox.BACKFILL)
            state: dict[Any, Any] = {
                "until": format_timestamp(self.plan.until),
                "window": format_timestamp(window),
                "skip": skip,
                "total": progress.total,
            }
            pipe.hset(self.checkpoint, mapping={**state, **{n: progress.counts[n] for n in COUNTS}})
            for key in (self.checkpoint, self.learner_set, self.emailed_set, self.seen_set):
                pipe.expire(key, CHECKPOINT_TTL)
            pipe.scard(self.learner_set)
            pipe.scard(self.emailed_set)
            *_, learners, emailed = pipe.execute()
        progress.window, progress.skip = window, skip
        progress.learners, progress.without_email = int(learners), int(learners) - int(emailed)
        inbox.wake(conn)

    def _remember(self, pipe: Pipeline, play: PlayReport) -> None:
        """Cache what Instruqt said of the learner, as a lookup's answer would be cached."""
        if not self.mapping.identity.lookup or play.profile is None:
            return
        learner = identity.learner_of(play.profile)
        if learner is not None:  # a name Redis cannot store would fail the page's transaction
            first, last = (_encodable(name) for name in (learner.first_name, learner.last_name))
            learner = replace(learner, first_name=first, last_name=last)
        ttl = identity.CACHE_TTL if learner else identity.NEGATIVE_TTL
        identity.remember(pipe, play.user_id, learner, ttl)

    def _wait_for_room(
        self, conn: redis.Redis, progress: Progress, on_page: Callable[[Progress], None]
    ) -> None:
        """Wait while the workers have MAX_QUEUED backfill events or more to take."""
        since = time.monotonic()
        while inbox.depth(conn, inbox.BACKFILL) >= self.max_queued:
            idle = Worker.count(connection=conn) == 0
            if idle and time.monotonic() - since >= NO_WORKER_SECONDS:
                progress.waiting = "no worker is running: start one to take the queued events"
            else:
                progress.waiting = "waiting for the workers"
            on_page(progress)
            inbox.wake(conn)
            inbox.backfill_reading(conn, READING_SECONDS, self.plan.run_id)
            self._sleep(1.0)
        progress.waiting = None


def _encodable(name: str | None) -> str | None:
    """``name`` when it can be stored (UTF-8 has no lone surrogates), else None."""
    try:
        (name or "").encode()
    except UnicodeEncodeError:
        log.warning("a learner's name holds text that is not valid UTF-8: left out")
        return None
    return name
