"""Instruqt's play reports, a track's challenges and a track by slug, paced and retried.

The queries are those of a public Go client of Instruqt's GraphQL API (isovalent/instruqt-go:
``instruqt/play.go``, ``track.go``), with the variable types that client declares. Requests go
through ``InstruqtClient.post`` (its key, timeout and error conversion); each is paced to at
most ``requests_per_second`` and retried a bounded number of times (``retry.retrying``: a 429
waits its Retry-After, 5xx and connection errors back off); after the last attempt the error
is raised so the caller can stop and resume later.

Paging is by ``skip``/``take`` over an ordering by ``time_spent`` ascending. Instruqt offers
only ``completion_percent`` and ``time_spent`` orderings and documents no tiebreak; time spent
(seconds) has far fewer ties than a completion percentage (a handful of values), so pages are
less likely to overlap or skip plays among ties. Either value still changes while a play runs,
so paging by skip is only stable for plays that no longer change: callers page over past,
narrow date windows (and should still drop a play id seen twice).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from instruqt_crm.errors import Category, PermanentError
from instruqt_crm.events import format_timestamp, parse_timestamp
from instruqt_crm.instruqt_api import (
    InstruqtClient,
    Profile,
    all_not_found,
    profile_from,
    text_or_none,
)
from instruqt_crm.retry import retrying

log = logging.getLogger(__name__)

MAX_TAKE = 100  # page size and rate limits are undocumented: stay at the Go client's scale
PLAY_TYPES = ("ALL", "NORMAL", "DEVELOPER")
ORDER_BY, ORDER_DIRECTION = "time_spent", "Asc"

REPORTS_QUERY = (
    "query ($teamSlug: String!, $from: Time!, $to: Time!, $trackIds: [String!]!, "
    "$trackInviteIds: [String!]!, $landingPageIds: [String!]!, $tags: [String!]!, "
    "$userIds: [String!]!, $skip: Int!, $take: Int!, $playType: PlayType!, "
    "$customParameterFilters: [CustomParameterFilter!]!, $orderBy: String!, "
    "$orderDirection: Direction!) { "
    "playReports(input: {teamSlug: $teamSlug, dateRangeFilter: {from: $from, to: $to}, "
    "trackIds: $trackIds, trackInviteIds: $trackInviteIds, landingPageIds: $landingPageIds, "
    "tags: $tags, userIds: $userIds, pagination: {skip: $skip, take: $take}, "
    "playType: $playType, customParameterFilters: $customParameterFilters, "
    "ordering: {orderBy: $orderBy, direction: $orderDirection}}) { "
    "items { id track { id slug } trackInvite { id } "
    "user { id details(teamSlug: $teamSlug) { email firstName lastName } "
    "profile { email display_name } } "
    "completionPercent totalChallenges completedChallenges timeSpent stoppedReason mode "
    "startedAt activity { time message } playReview { id score content } "
    "customParameters { key value } } totalItems } }"
)
CHALLENGES_QUERY = (
    "query ($trackId: String!, $teamSlug: String!) { "
    "challenges(trackID: $trackId, teamSlug: $teamSlug) { id slug index } }"
)
TRACK_QUERY = (
    "query ($trackSlug: String!, $teamSlug: String!) { "
    "track(trackSlug: $trackSlug, teamSlug: $teamSlug) { id slug } }"
)


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


class PlayReports:
    """Reads play reports, challenges and tracks through one client, paced (not thread-safe)."""

    def __init__(
        self,
        client: InstruqtClient,
        requests_per_second: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if requests_per_second <= 0:
            raise ValueError("requests_per_second must be > 0")
        self.client = client
        self.interval = 1.0 / requests_per_second
        self._sleep = sleep
        self._clock = clock
        self._last: float | None = None

    def page(
        self,
        since: datetime,
        until: datetime,
        skip: int,
        take: int = MAX_TAKE,
        track_ids: Sequence[str] = (),
        play_type: str = "ALL",
    ) -> ReportPage:
        """Plays started in [since, until) (timezone-aware), ``take`` of them after ``skip``."""
        if not 1 <= take <= MAX_TAKE:
            raise ValueError(f"take must be between 1 and {MAX_TAKE}, got {take}")
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        if play_type not in PLAY_TYPES:
            raise ValueError(f"play_type must be one of {PLAY_TYPES}, got {play_type!r}")
        if since.tzinfo is None or until.tzinfo is None:
            raise ValueError("since and until must be timezone-aware")
        if since >= until:
            raise ValueError("since must be before until")
        variables = {
            "teamSlug": self.client.team_slug,
            "from": format_timestamp(since),
            "to": format_timestamp(until),
            "trackIds": list(track_ids),
            **{name: [] for name in ("trackInviteIds", "landingPageIds", "tags", "userIds")},
            "customParameterFilters": [],
            "skip": skip,
            "take": take,
            "playType": play_type,
            "orderBy": ORDER_BY,
            "orderDirection": ORDER_DIRECTION,
        }
        label = f"play reports {variables['from']}..{variables['to']} skip={skip}"
        answer = self._query(REPORTS_QUERY, variables, label, "playReports")
        raw = (answer.get("items") or []) if isinstance(answer, dict) else None
        if not isinstance(raw, list) or not _is_count(answer.get("totalItems")):
            raise PermanentError(f"Instruqt API answered no usable {label}", Category.OTHER)
        items: list[PlayReport] = []
        for item in raw:
            try:
                items.append(_report(item))
            except (TypeError, ValueError) as exc:
                play_id = item.get("id") if isinstance(item, dict) else None
                log.warning("instruqt play %s skipped: malformed report (%s)", play_id, exc)
        log.info("instruqt %s: %d plays of %d", label, len(items), answer["totalItems"])
        return ReportPage(items, int(answer["totalItems"]), len(raw) - len(items))

    def challenges(self, track_id: str) -> list[Challenge]:
        """The track's challenges by index; [] when the track is unknown or deleted."""
        variables = {"trackId": track_id, "teamSlug": self.client.team_slug}
        label = f"challenges of track {track_id}"
        answer = self._query(CHALLENGES_QUERY, variables, label, "challenges", missing_ok=True)
        found: list[Challenge] = []
        for item in answer if isinstance(answer, list) else []:
            try:
                found.append(_challenge(item))
            except (TypeError, ValueError) as exc:
                log.warning("instruqt track %s: challenge skipped (%s)", track_id, exc)
        return sorted(found, key=lambda challenge: challenge.index)

    def track_id(self, slug: str) -> str | None:
        """The id of the team's track with this slug, or None when there is no such track."""
        variables = {"trackSlug": slug, "teamSlug": self.client.team_slug}
        answer = self._query(TRACK_QUERY, variables, f"track {slug}", "track", missing_ok=True)
        return text_or_none(answer.get("id")) if isinstance(answer, dict) else None

    def _query(
        self,
        query: str,
        variables: dict[str, Any],
        label: str,
        field: str,
        missing_ok: bool = False,
    ) -> Any:
        """``data[field]`` of the answer, retried (None: null, or not found if ``missing_ok``)."""
        policy = retrying(attempts=self.client.attempts, sleep=self._sleep, label=label)
        return policy(self._once, query, variables, label, field, missing_ok)

    def _once(
        self, query: str, variables: dict[str, Any], label: str, field: str, missing_ok: bool
    ) -> Any:
        """One paced request; GraphQL errors without an answer converted to the error tree."""
        self._pace()
        body = self.client.post(query, variables, label)
        data = body.get("data")
        answer = data.get(field) if isinstance(data, dict) else None
        errors = body.get("errors")
        if errors and answer is None:
            if missing_ok and all_not_found(errors):
                log.debug("instruqt %s not found: %s", label, self.client.describe(errors))
                return None
            self.client.raise_for_errors(errors, label)
        if errors:  # a partial answer (say, a user without details): what it has is used
            log.debug("instruqt %s partial answer: %s", label, self.client.describe(errors))
        return answer

    def _pace(self) -> None:
        """Sleep until ``interval`` has passed since the last request."""
        if self._last is not None:
            wait = self._last + self.interval - self._clock()
            if wait > 0:
                self._sleep(wait)
        self._last = self._clock()


def _report(item: Any) -> PlayReport:
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
    return PlayReview(review_id, _count(score, "score") if _is_count(score) else None, content)


def _challenge(item: Any) -> Challenge:
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


def _is_count(value: Any) -> bool:
    """Whether ``value`` is a whole, non-negative JSON number."""
    return _is_number(value) and value >= 0 and value == int(value)


def _number(value: Any, name: str) -> float:
    """A finite JSON number, or ValueError naming the field."""
    if not _is_number(value):
        raise ValueError(f"{name} is not a number: {value!r}")
    return float(value)


def _count(value: Any, name: str) -> int:
    """A whole, non-negative JSON number, or ValueError naming the field."""
    if not _is_count(value):
        raise ValueError(f"{name} is not a count: {value!r}")
    return int(value)
