"""What a backfill reads (``Plan``), where a run stands (``Progress``), and the checkpoint
that keeps it in Redis between runs (``Checkpoint``).

The checkpoint is a hash (the plan's end, the window and skip after the last page queued,
the report's total, the counts) and three sets: the run's learners, those with an email,
and the play ids of the current window (a play the report lists again on a later page is
not counted twice). ``Checkpoint.stage_page`` writes them in the transaction that queues the
page's events, so the two never disagree.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from redis.client import Pipeline

from instruqt_crm import keys
from instruqt_crm.events import format_timestamp, parse_timestamp
from instruqt_crm.keys import text

WINDOW = timedelta(days=7)
CHECKPOINT_TTL = 30 * 86400
COUNTS = (
    *("plays", "developer_skipped", "malformed", "unreadable", "events", "stand_ins"),
    "repeated",  # a play the report listed again on a later page of its window (not counted)
)


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


class Checkpoint:
    """A run's checkpoint in Redis (see the module docstring)."""

    def __init__(self, run_id: str) -> None:
        self.state = keys.backfill(run_id)
        self.learners = keys.backfill(run_id, "learners")
        self.emailed = keys.backfill(run_id, "emailed")
        self.seen = keys.backfill(run_id, "seen")  # play ids of the current window

    def clear(self, conn: redis.Redis) -> None:
        """Forget the run (it finished, or starts over)."""
        conn.delete(self.state, self.learners, self.emailed, self.seen)

    def load(self, conn: redis.Redis) -> tuple[Progress, datetime] | None:
        """Where the run stopped, and the end of its range; None when it never ran."""
        saved = {text(k): text(v) for k, v in conn.hgetall(self.state).items()}
        if not saved:
            return None
        learners, emailed = int(conn.scard(self.learners)), int(conn.scard(self.emailed))
        progress = Progress(
            total=int(saved.get("total", 0)),
            window=parse_timestamp(saved["window"]),
            skip=int(saved["skip"]),
            counts=Counter({name: int(saved.get(name, 0)) for name in COUNTS}),
            learners=learners,
            without_email=learners - emailed,
            resumed=True,
        )
        return progress, parse_timestamp(saved["until"])

    def seen_ids(self, conn: redis.Redis) -> set[str]:
        """The play ids already read in the window the run stopped in."""
        return {text(member) for member in conn.smembers(self.seen)}

    def stage_learner(self, pipe: Pipeline, user_id: str, emailed: bool) -> None:
        """Count a learner of the run (and whether an email is known for them)."""
        pipe.sadd(self.learners, user_id)
        if emailed:
            pipe.sadd(self.emailed, user_id)

    def stage_page(
        self,
        pipe: Pipeline,
        progress: Progress,
        until: datetime,
        window: datetime,
        skip: int,
        play_ids: Iterable[str],
    ) -> None:
        """Move the checkpoint past a page (its plays ``play_ids``, read in ``window``); the
        pipeline's last two replies are then the counts of learners and of those emailed."""
        if window != progress.window:  # the first page of a window: forget the last one's
            pipe.delete(self.seen)
        if ids := list(play_ids):
            pipe.sadd(self.seen, *ids)
        state: dict[Any, Any] = {
            "until": format_timestamp(until),
            "window": format_timestamp(window),
            "skip": skip,
            "total": progress.total,
        }
        pipe.hset(self.state, mapping={**state, **{n: progress.counts[n] for n in COUNTS}})
        for key in (self.state, self.learners, self.emailed, self.seen):
            pipe.expire(key, CHECKPOINT_TTL)
        pipe.scard(self.learners)
        pipe.scard(self.emailed)
