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
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from instruqt_crm.errors import Category, PermanentError
from instruqt_crm.events import format_timestamp
from instruqt_crm.instruqt_api import InstruqtClient, all_not_found, text_or_none
from instruqt_crm.instruqt_report_items import (
    Challenge,
    PlayReport,
    ReportPage,
    challenge_from,
    is_count,
    report_from,
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
        if not isinstance(raw, list) or not is_count(answer.get("totalItems")):
            raise PermanentError(f"Instruqt API answered no usable {label}", Category.OTHER)
        items: list[PlayReport] = []
        for item in raw:
            try:
                items.append(report_from(item))
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
                found.append(challenge_from(item))
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
