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

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime

import redis
from redis.client import Pipeline
from rq import Worker

from instruqt_crm.engine import flush, identity, inbox
from instruqt_crm.events import EventError
from instruqt_crm.instruqt_report_items import Challenge, PlayReport, ReportPage
from instruqt_crm.instruqt_reports import PlayReports
from instruqt_crm.mapping import Mapping

from .backfill_plan import Checkpoint, Plan, Progress
from .play_events import PlayEvent, events_of
from .preview import Item, Preview, preview

log = logging.getLogger(__name__)

PAGE_SIZE = 100
MAX_QUEUED = 5_000  # backfill events waiting for the workers before the reader pauses
NO_WORKER_SECONDS = 30.0  # waiting this long with no worker running is said plainly
# The reader says it still reads for this long before each request to Instruqt and while it
# waits: longer than one request can take (4 attempts of up to 10 s, 3 Retry-After waits of up
# to 60 s, pacing up to 100 s), so workers never take it for gone while it waits on one.
READING_SECONDS = 600


class BackfillError(Exception):
    """The backfill cannot run as asked (say, a track slug the team does not have)."""


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
        self.checkpoint = Checkpoint(plan.run_id)
        self._seen: set[str] = set()  # play ids read in the current window

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
            self.checkpoint.clear(conn)
        self._reading = True
        self._still_reading()
        try:
            progress = self._read_all(conn, on_page)
        finally:  # its learners are sent once the workers took its last events
            self._reading = False
            inbox.backfill_stopped(conn, self.plan.run_id)
            flush.release_backfilled(conn)
        self.checkpoint.clear(conn)
        return progress

    def _read_all(self, conn: redis.Redis, on_page: Callable[[Progress], None]) -> Progress:
        """Read and queue every window from the checkpoint on."""
        progress = self._resume(conn)
        if not progress.total:
            progress.total = self._total()
        on_page(progress)
        for start, end in self.plan.windows(progress.window):
            resumed = start == progress.window
            self._seen = self.checkpoint.seen_ids(conn) if resumed else set()
            for page, skip in self._pages(start, end, progress.skip if resumed else 0):
                self._wait_for_room(conn, progress, on_page)
                self._queue(conn, page, progress, start, skip)
                self._still_reading()
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
        """The progress the checkpoint holds (a fresh one when there is none); a continued
        run reads up to the end its first run fixed."""
        found = self.checkpoint.load(conn)
        if found is None:
            return Progress()
        progress, until = found
        self.plan = replace(self.plan, until=until)
        log.info(
            "backfill %s resumes at %s, skip %d", self.plan.run_id, progress.window, progress.skip
        )
        return progress

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
            for play, made in self._events(page, progress.counts):
                self._remember(pipe, play)
                self.checkpoint.stage_learner(pipe, play.user_id, self._email(play) is not None)
                for event in made:
                    inbox.add(pipe, event.id, event.body, inbox.BACKFILL)
            ids = (play.id for play in page.items)
            self.checkpoint.stage_page(pipe, progress, self.plan.until, window, skip, ids)
            *_, learners, emailed = pipe.execute()
        progress.window, progress.skip = window, skip
        progress.learners, progress.without_email = int(learners), int(learners) - int(emailed)
        inbox.wake(conn)

    def _remember(self, pipe: Pipeline, play: PlayReport) -> None:
        """Cache what Instruqt said of the learner, as a lookup's answer would be cached."""
        if not self.mapping.identity.lookup or play.profile is None:
            return
        learner = identity.learner_of(play.profile)
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
            self._still_reading()
            self._sleep(1.0)
        progress.waiting = None
