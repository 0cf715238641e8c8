"""The items of Instruqt's play reports and challenge lists, parsed and checked.

``report_from`` and ``challenge_from`` turn one item of an answer into a ``PlayReport`` or a
``Challenge``, or raise ``ValueError``/``TypeError`` naming what is missing or malformed, so
the reader can skip that item and count it. The learner's profile is parsed as the user
lookup parses it (``instruqt_api.profile_from``: the team's details first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from instruqt_crm.events import parse_timestamp
from instruqt_crm.instruqt_api import Profile, profile_from, text_or_none


@dataclass(frozen=True)
class PlayReview:
    """The review a learner left on a play."""

    id: str
    score: int | None
    content: str | None


@dataclass(frozen=True)
class PlayReport:
    """One play of a track, as Instruqt's play reports describe it (``time_spent`` in seconds,
    ``started_at`` in UTC, ``profile`` parsed like the user lookup: the team's details first)."""

    id: str
    track_id: str
    track_slug: str | None
    invite_id: str | None
    user_id: str
    profile: Profile | None
    completion_percent: float
    total_challenges: int
    completed_challenges: int
    time_spent: int
    stopped_reason: str | None
    mode: str
    started_at: datetime
    review: PlayReview | None
    custom_parameters: dict[str, str]

    @property
    def is_developer(self) -> bool:
        """Whether the play was a developer's test play."""
        return self.mode.upper() == "DEVELOPER"


@dataclass(frozen=True)
class ReportPage:
    """One page of play reports: ``total`` matches before paging; ``malformed`` items skipped."""

    items: list[PlayReport]
    total: int
    malformed: int = 0


@dataclass(frozen=True)
class Challenge:
    """A challenge of a track (``index``: its position in the track)."""

    id: str
    slug: str | None
    index: int


def report_from(item: Any) -> PlayReport:
    """A PlayReport from one report item; ValueError/TypeError if it is not usable."""
    if not isinstance(item, dict):
        raise TypeError("not an object")
    play_id = _required(item, "id")
    track, invite, user = (_object(item.get(name)) for name in ("track", "trackInvite", "user"))
    user_id = _required(user, "id", "user.id")
    parameters = item.get("customParameters")
    return PlayReport(
        id=play_id,
        track_id=_required(track, "id", "track.id"),
        track_slug=text_or_none(track.get("slug")),
        invite_id=text_or_none(invite.get("id")),
        user_id=user_id,
        profile=profile_from(user_id, user),
        completion_percent=_number(item.get("completionPercent"), "completionPercent"),
        total_challenges=_count(item.get("totalChallenges"), "totalChallenges"),
        completed_challenges=_count(item.get("completedChallenges"), "completedChallenges"),
        time_spent=_count(item.get("timeSpent"), "timeSpent"),
        stopped_reason=text_or_none(item.get("stoppedReason")),
        mode=_required(item, "mode"),
        started_at=parse_timestamp(item.get("startedAt")),
        review=_review(item.get("playReview")),
        custom_parameters={
            str(entry["key"]): "" if entry.get("value") is None else str(entry["value"])
            for entry in (parameters if isinstance(parameters, list) else [])
            if isinstance(entry, dict) and text_or_none(entry.get("key"))
        },
    )


def _review(value: Any) -> PlayReview | None:
    """A PlayReview from a ``playReview`` object, or None (no review, or one without an id)."""
    review = _object(value)
    review_id, score = text_or_none(review.get("id")), review.get("score")
    if review_id is None:
        return None
    content = text_or_none(review.get("content"))
    return PlayReview(review_id, _count(score, "score") if is_count(score) else None, content)


def challenge_from(item: Any) -> Challenge:
    """A Challenge from one ``challenges`` entry; ValueError/TypeError if it is not usable."""
    if not isinstance(item, dict):
        raise TypeError("not an object")
    return Challenge(
        id=_required(item, "id"),
        slug=text_or_none(item.get("slug")),
        index=_count(item.get("index"), "index"),
    )


def _object(value: Any) -> dict[str, Any]:
    """A JSON object, or {} for null and anything else."""
    return value if isinstance(value, dict) else {}


def _required(item: dict[str, Any], key: str, name: str | None = None) -> str:
    """The non-empty text at ``key``, or ValueError naming the field."""
    text = text_or_none(item.get(key))
    if text is None:
        raise ValueError(f"no {name or key}")
    return text


def _is_number(value: Any) -> bool:
    """Whether ``value`` is a finite JSON number (not a boolean)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: Any) -> bool:
    """Whether ``value`` is a whole, non-negative JSON number."""
    return _is_number(value) and value >= 0 and value == int(value)


def _number(value: Any, name: str) -> float:
    """A finite JSON number, or ValueError naming the field."""
    if not _is_number(value):
        raise ValueError(f"{name} is not a number: {value!r}")
    return float(value)


def _count(value: Any, name: str) -> int:
    """A whole, non-negative JSON number, or ValueError naming the field."""
    if not is_count(value):
        raise ValueError(f"{name} is not a count: {value!r}")
    return int(value)
