"""The Instruqt event model: parse a verified body, normalise its timestamp, know its types."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

KNOWN_TYPES: tuple[str, ...] = (
    "track.started",
    "track.completed",
    "track.stopped",
    "track.challenge_started",
    "track.challenge_attempted",
    "track.challenge_completed",
    "track.challenge_skipped",
    "track.challenge_setup",
    "track.challenge_cleanup",
    "track.sandbox_cleaned",
    "sandbox.creating",
    "sandbox.created",
    "sandbox.failed",
    "sandbox.cleaned",
    "invite.claimed",
    "review.created",
    "review.updated",
)

MAX_TYPE_LENGTH = 120
PARAM_KEYS: tuple[str, ...] = (
    "custom_parameters",
    "params",
    "customParameters",
)  # Instruqt's first

_FRACTION = re.compile(r"(\.\d+)")


class EventError(ValueError):
    """The body is not a usable Instruqt event."""


def parse_timestamp(value: Any) -> datetime:
    """Parse an RFC 3339 timestamp (any number of fractional digits) or epoch seconds to UTC."""
    if isinstance(value, bool):
        raise EventError(f"timestamp must be a string or number, got {value!r}")
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise EventError(f"timestamp out of range: {value!r}") from exc
    if not isinstance(value, str) or not value:
        raise EventError(f"timestamp must be a string or number, got {value!r}")
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    text = _FRACTION.sub(lambda m: m.group(1)[:7], text, count=1)  # Python keeps 6 digits
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise EventError(f"timestamp is not ISO 8601: {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_timestamp(moment: datetime) -> str:
    """The one textual form used everywhere: ISO 8601 UTC with milliseconds and ``Z``."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


@dataclass(frozen=True)
class Event:
    """A verified Instruqt event: the raw body plus the fields every stage needs."""

    id: str
    type: str
    timestamp: datetime
    user_id: str | None
    body: dict[str, Any] = field(repr=False)

    @property
    def params(self) -> dict[str, Any]:
        """The play's custom parameters: the first non-empty object under one of PARAM_KEYS."""
        for key in PARAM_KEYS:
            value = self.body.get(key)
            if isinstance(value, dict) and value:
                return value
        return {}

    @property
    def is_developer_play(self) -> bool:
        """Whether Instruqt marked the play as a track author's test (``is_developer_play``)."""
        flag = self.body.get("is_developer_play")
        return flag is True or (isinstance(flag, str) and flag.strip().lower() == "true")

    @property
    def is_known_type(self) -> bool:
        """Whether the type is one Instruqt documents."""
        return self.type in KNOWN_TYPES


def check_body(body: Any) -> str:
    """Return the event type of a decoded body, or raise EventError saying what is wrong."""
    if not isinstance(body, dict):
        raise EventError("body must be a JSON object")
    event_type = body.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise EventError("body must have a string 'type'")
    if len(event_type) > MAX_TYPE_LENGTH or not event_type.isprintable():
        raise EventError(f"'type' must be printable and at most {MAX_TYPE_LENGTH} characters")
    return event_type


def parse_event(event_id: str, body: Any, received_at: datetime | None = None) -> Event:
    """Build an Event; a missing timestamp falls back to the receive time."""
    event_type = check_body(body)
    raw_time = body.get("timestamp")
    fallback = received_at or datetime.now(UTC)
    timestamp = fallback if raw_time is None else parse_timestamp(raw_time)
    user_id = body.get("user_id")
    return Event(
        id=event_id,
        type=event_type,
        timestamp=timestamp,
        user_id=str(user_id) if user_id not in (None, "") else None,
        body=body,
    )
