"""One past play (a row of Instruqt's play report) as the webhook events Instruqt sent for it.

The report has counts and times, not the events, so each play becomes, with an id made
from the play and the event (``backfill:<play id>:<event>``, the same on every run):

- ``track.started`` at ``startedAt``;
- one ``track.challenge_completed`` per completed challenge, at the play's end
  (``startedAt + timeSpent``), without a track slug as Instruqt's own example of a challenge
  event has none: the track's first ``completedChallenges`` challenges by index,
  with their real ids when the track's challenge list is known (so a count of distinct
  (track, challenge) pairs agrees with live events), else the stable stand-in ``#<n>``
  (the n-th challenge of the track, from 1);
- ``track.completed`` at the end when ``completionPercent`` is 100, else ``track.stopped``
  with ``stoppedReason`` when the report has one (a play with neither is still running);
- ``review.created`` at the end, with the review's id, score and content.

Every event carries the play's track id and slug, ``participant_id`` (the play id),
``user_id``, ``invite_id``, ``is_developer_play`` and ``custom_parameters``, under the
names live events use, so the mapping treats them alike.

A row no play can have is refused (EventError), not expanded: one ending after the report
was read (its last activity would outrank every later event for good), or claiming more
than MAX_CHALLENGES completed challenges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from instruqt_crm.engine.inbox import BACKFILL_ID
from instruqt_crm.events import EventError, check_readable, format_timestamp
from instruqt_crm.instruqt_report_items import Challenge, PlayReport

ID_PREFIX = BACKFILL_ID  # the inbox knows a backfill's events by it
MAX_CHALLENGES = 1_000  # far more than a track holds: a count above it is not a play's
LATE_END = timedelta(days=1)  # clock skew allowed for a running play's end


@dataclass(frozen=True)
class PlayEvent:
    """One synthesized event: its deterministic id and its body."""

    id: str
    body: dict[str, Any]


def stand_in_id(position: int) -> str:
    """The challenge id used when the track's challenges are unknown: ``#<n>``, from 1."""
    return f"#{position}"


def play_end(play: PlayReport) -> datetime:
    """When the play ended (or was last seen): ``startedAt + timeSpent``; EventError when
    that is no date at all."""
    try:
        return play.started_at + timedelta(seconds=max(0, play.time_spent))
    except OverflowError as exc:
        raise EventError(f"time spent {play.time_spent} s ends past any date") from exc


def events_of(play: PlayReport, challenges: Sequence[Challenge] = ()) -> list[PlayEvent]:
    """The events Instruqt's webhooks sent for ``play`` (see the module docstring); raises
    EventError for a row no play can have, or text no stage could store (as the receiver
    would)."""
    ended = play_end(play)
    if ended > datetime.now(UTC) + LATE_END:
        raise EventError(f"the play ends {format_timestamp(ended)}, after the report was read")
    done = max(
        0, min(play.completed_challenges, play.total_challenges or play.completed_challenges)
    )
    if done > MAX_CHALLENGES:
        raise EventError(f"{done} completed challenges: more than any track holds")
    base = _base(play)
    end = format_timestamp(ended)
    made = [_event(play, "track.started", format_timestamp(play.started_at), base)]
    for position in range(1, done + 1):
        made.append(_challenge(play, position, challenges, end, base))
    if play.completion_percent >= 100:
        made.append(_event(play, "track.completed", end, {**base, "duration": play.time_spent}))
    elif play.stopped_reason:
        fields = {**base, "duration": play.time_spent, "reason": play.stopped_reason}
        made.append(_event(play, "track.stopped", end, fields))
    if play.review is not None:
        review = {"review_id": play.review.id, "score": play.review.score}
        if play.review.content:
            review["content"] = play.review.content
        made.append(_event(play, "review.created", end, {**base, **review}))
    for event in made:
        check_readable(event.body)
    return made


def _base(play: PlayReport) -> dict[str, Any]:
    """The fields every event of the play carries (empty ones left out)."""
    fields: dict[str, Any] = {
        "track_id": play.track_id,
        "track_slug": play.track_slug,
        "participant_id": play.id,
        "user_id": play.user_id,
        "invite_id": play.invite_id,
        "is_developer_play": play.is_developer,
        "custom_parameters": dict(play.custom_parameters),
    }
    return {name: value for name, value in fields.items() if value not in (None, "", {})}


def _event(play: PlayReport, event_type: str, at: str, fields: dict[str, Any]) -> PlayEvent:
    """One event of the play, named by its type."""
    return PlayEvent(
        f"{ID_PREFIX}{play.id}:{event_type}", {"type": event_type, "timestamp": at, **fields}
    )


def _challenge(
    play: PlayReport, position: int, challenges: Sequence[Challenge], at: str, base: dict[str, Any]
) -> PlayEvent:
    """The completion of the play's ``position``-th challenge (from 1)."""
    known = challenges[position - 1] if position <= len(challenges) else None
    fields = {
        **{name: value for name, value in base.items() if name != "track_slug"},
        "challenge_id": known.id if known else stand_in_id(position),
        "challenge_index": known.index if known else position,
        "total_challenges": play.total_challenges,
    }
    body = {"type": "track.challenge_completed", "timestamp": at, **fields}
    return PlayEvent(f"{ID_PREFIX}{play.id}:challenge:{position}", body)
