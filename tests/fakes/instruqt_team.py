"""A fake Instruqt team's past plays, both as the play report shows them and as the webhooks
Instruqt sent for them live, so a backfill can be compared with live delivery.

The live events follow Instruqt's documented shapes: ``track.started``; per challenge a
``track.challenge_started``, a failed and a successful ``track.challenge_attempted`` and a
``track.challenge_completed`` (challenge events carry no track slug, as in Instruqt's own
example), spread over the play; ``track.completed`` or ``track.stopped`` at the end
(``startedAt + timeSpent``; a running play's time spent reaches its latest activity); and a
``review.created`` at the end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from instruqt_crm.events import format_timestamp
from tests.fakes.instruqt import FakeInstruqt, report_item

TEAM = "acme"
SINCE = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class TeamPlay:
    """One past play of the team."""

    play_id: str
    user_id: str
    track_id: str
    track_slug: str
    started_at: datetime
    time_spent: int
    total: int
    completed: int
    percent: float
    stopped_reason: str | None = None
    developer: bool = False
    review: tuple[int, str] | None = None
    params: dict[str, str] = field(default_factory=dict)

    def report_item(self) -> dict[str, Any]:
        """The play as the report lists it."""
        return report_item(
            self.play_id,
            self.user_id,
            format_timestamp(self.started_at),
            track_id=self.track_id,
            track_slug=self.track_slug,
            invite_id="invite-1",
            completion_percent=self.percent,
            total_challenges=self.total,
            completed_challenges=self.completed,
            time_spent=self.time_spent,
            stopped_reason=self.stopped_reason,
            mode="DEVELOPER" if self.developer else "NORMAL",
            review=self.review,
            custom_parameters=self.params,
        )

    def live_events(self, challenge_ids: list[str]) -> list[tuple[str, dict[str, Any]]]:
        """The webhooks Instruqt sent for the play, with their Svix message ids."""
        end = self.started_at + timedelta(seconds=self.time_spent)
        base = {
            "organization_id": TEAM,
            "track_id": self.track_id,
            "participant_id": self.play_id,
            "user_id": self.user_id,
            "invite_id": "invite-1",
            "is_developer_play": self.developer,
            "custom_parameters": self.params,
        }
        track = {**base, "track_slug": self.track_slug}
        made = [("track.started", self.started_at, track)]
        for n in range(self.completed):
            solved = self._solved_at(n, end)
            challenge = {
                **base,
                "challenge_id": challenge_ids[n],
                "challenge_index": n + 1,
                "total_challenges": self.total,
            }
            made += [
                ("track.challenge_started", solved - timedelta(seconds=50), challenge),
                (
                    "track.challenge_attempted",
                    solved - timedelta(seconds=20),
                    {**challenge, "completed": False},
                ),
                ("track.challenge_attempted", solved, {**challenge, "completed": True}),
                ("track.challenge_completed", solved, challenge),
            ]
        if self.percent >= 100:
            made.append(("track.completed", end, {**track, "duration": self.time_spent}))
        elif self.stopped_reason:
            stopped = {**track, "duration": self.time_spent, "reason": self.stopped_reason}
            made.append(("track.stopped", end, stopped))
        if self.review:
            score, content = self.review
            review = {
                **track,
                "review_id": f"review-{self.play_id}",
                "score": score,
                "content": content,
            }
            made.append(("review.created", end, review))
        return [
            (f"msg_{self.play_id}_{i}", {"type": kind, "timestamp": format_timestamp(at), **body})
            for i, (kind, at, body) in enumerate(made)
        ]

    def _solved_at(self, n: int, end: datetime) -> datetime:
        """When the play's n-th challenge (from 0) was solved: spread over the play; a running
        play's last solved challenge is its latest activity, where its time spent ends."""
        if self.percent < 100 and not self.stopped_reason and n == self.completed - 1:
            return end
        share = (n + 1) / (self.total + 1)
        return self.started_at + timedelta(seconds=int(self.time_spent * share))


@dataclass
class Team:
    """A team's learners, tracks and plays, and the fake that serves them."""

    plays: list[TeamPlay]
    emails: dict[str, str]  # profile emails
    details: dict[str, dict[str, str]]  # what learners gave the team
    challenges: dict[str, list[str]]  # track id -> challenge ids, by index
    tracks: dict[str, str]  # slug -> track id

    def fake(self, key: str = "instruqt-test-key") -> FakeInstruqt:
        """A fake Instruqt serving this team (not started)."""
        challenges = {
            track: [{"id": c, "slug": f"step-{i + 1}", "index": i + 1} for i, c in enumerate(ids)]
            for track, ids in self.challenges.items()
        }
        return FakeInstruqt(
            key=key,
            emails=self.emails,
            team=TEAM,
            details=self.details,
            plays=[play.report_item() for play in self.plays],
            challenges=challenges,
            tracks=self.tracks,
        )

    def live_events(self) -> list[tuple[str, dict[str, Any]]]:
        """Every webhook the team's plays sent."""
        return [
            event
            for play in self.plays
            for event in play.live_events(self.challenges[play.track_id])
        ]


def team(seed: int = 1, learners: int = 8, plays: int = 30) -> Team:
    """A varied team: learners with the team's details, with only a profile email, with only
    an invite-link parameter email, and with no email at all; completed, stopped and running
    plays, developer plays, reviews."""
    rng = random.Random(seed)
    tracks = {f"track-{n}": f"trk{n}" for n in range(3)}
    challenges = {
        tid: [f"{tid}-ch{i}" for i in range(rng.randint(2, 5))] for tid in tracks.values()
    }
    emails: dict[str, str] = {}
    details: dict[str, dict[str, str]] = {}
    users = [f"user{n}" for n in range(learners)]
    for n, user in enumerate(users):
        kind = n % 4
        if kind == 0:
            details[user] = {"email": f"{user}@acme.co", "firstName": "Ada", "lastName": f"L{n}"}
        if kind in (0, 1):
            emails[user] = f"{user}.profile@mail.co"
    made = []
    for n in range(plays):
        user = users[n % learners]
        slug = rng.choice(sorted(tracks))
        total = len(challenges[tracks[slug]])
        outcome = rng.choice(["completed", "stopped", "running"])
        completed = total if outcome == "completed" else rng.randint(1, total - 1)
        params = {"icp_email": f"{user}@param.co"} if users.index(user) % 4 == 2 else {}
        made.append(
            TeamPlay(
                play_id=f"play{n}",
                user_id=user,
                track_id=tracks[slug],
                track_slug=slug,
                started_at=SINCE
                + timedelta(days=rng.randint(0, 60), seconds=rng.randint(0, 86_000)),
                time_spent=rng.randint(600, 7200),
                total=total,
                completed=completed,
                percent=100.0 if outcome == "completed" else round(100 * completed / total, 1),
                stopped_reason="expired" if outcome == "stopped" else None,
                developer=n % 7 == 6,
                review=(rng.randint(1, 5), f"review {n}") if rng.random() < 0.4 else None,
                params=params,
            )
        )
    return Team(made, emails, details, challenges, tracks)
