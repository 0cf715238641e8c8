"""Realistic Instruqt events of every known type, for trying the service and for tests."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from instruqt_crm.events import KNOWN_TYPES


def _stamp(moment: datetime) -> str:
    """Instruqt's own timestamp style: RFC 3339 with nanosecond digits."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}54Z"


def example_event(
    event_type: str,
    user_id: str = "gOGhYjyoPJhINJFOugIgiL4pdzu2",
    email: str | None = None,
    track_slug: str = "getting-started-with-kubernetes",
    at: datetime | None = None,
) -> dict[str, Any]:
    """Build one event body shaped like Instruqt's: the fields its webhooks carry (as a
    public Go client of Instruqt's API reads them), RFC 3339 times with 8 fractional digits,
    custom parameters as ``custom_parameters``; challenge events without ``track_slug``, as
    Instruqt's documented example. ``email`` goes into the custom parameters of every type
    (that client reads ``custom_parameters`` on every event), reviews included."""
    moment = at or datetime.now(UTC)
    params = {"email": email} if email else {}
    body: dict[str, Any] = {
        "type": event_type,
        "organization_id": "instruqt",
        "user_id": user_id,
        "timestamp": _stamp(moment),
    }
    if params:
        body["custom_parameters"] = params
    if event_type.startswith(("track.", "sandbox.")):
        body.update(
            track_id="rzwlxtp92ted",
            track_slug=track_slug,
            participant_id=secrets.token_hex(6),
            invite_id=None,
            claim_id=None,
            is_developer_play=False,
            pooled=False,
            custom_parameters=params,
        )
    if event_type.startswith("track.challenge_"):
        del body["track_slug"]
        body.update(challenge_id="dxhrbpuvvia9", challenge_index=1, total_challenges=4)
    if event_type == "track.challenge_attempted":
        body["completed"] = True
    if event_type in ("track.completed", "track.stopped"):
        body["duration"] = 1260  # seconds played
    if event_type.startswith("review."):
        body.update(
            review_id=secrets.token_hex(6),
            track_id="rzwlxtp92ted",
            track_slug=track_slug,
            score=5,
            content="Great hands-on lab!",
        )
    if event_type == "invite.claimed":
        body.update(
            invite_id="inv_" + secrets.token_hex(4),
            claim_id="claim_" + secrets.token_hex(4),
            team_id="team_1",
            team_slug="instruqt",
            custom_parameters=params,
        )
    return body


def example_types() -> tuple[str, ...]:
    """Every event type an example can be built for."""
    return KNOWN_TYPES
