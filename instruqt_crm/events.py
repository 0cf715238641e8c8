"""The Instruqt event model: parse a verified body, normalise its timestamp, know its types."""

from __future__ import annotations

import codecs
import functools
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from email_validator import EmailNotValidError, validate_email

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

# The top-level fields the documented types' events carry, as Instruqt's webhook docs and a
# public Go client of its API (isovalent/instruqt-go, instruqt/webhook.go) name them: `check`
# holds templates to them. Every field stays optional in code; a mapping lists fields its
# events carry beyond these under `extra_event_fields`.
_COMMON = ("type", "timestamp", "user_id", "organization_id")
_PLAY = (
    *("track_id", "track_slug", "participant_id", "invite_id", "claim_id"),
    *("is_developer_play", "pooled", "reason", "duration", *PARAM_KEYS),
)
_CHALLENGE = ("challenge_id", "challenge_index", "total_challenges", "completed")
_REVIEW = ("review_id", "track_id", "track_slug", "participant_id", "score", "content", *PARAM_KEYS)
_INVITE = ("invite_id", "claim_id", "team_id", "team_slug", *PARAM_KEYS)


def _documented_fields(event_type: str) -> frozenset[str]:
    """The fields events of a documented type carry."""
    if event_type.startswith("track.challenge_"):
        return frozenset((*_COMMON, *_PLAY, *_CHALLENGE))
    if event_type.startswith(("track.", "sandbox.")):
        return frozenset((*_COMMON, *_PLAY))
    if event_type.startswith("review."):
        return frozenset((*_COMMON, *_REVIEW))
    return frozenset((*_COMMON, *_INVITE))


EVENT_FIELDS: dict[str, frozenset[str]] = {t: _documented_fields(t) for t in KNOWN_TYPES}

_FRACTION = re.compile(r"(\.\d+)")
_strict_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


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


def decode_body(raw: bytes) -> dict[str, Any]:
    """A delivery's body as every later stage can read it, or EventError saying why not: a
    JSON object without a byte-order mark, NaN or Infinity, or text that is not UTF-8 (lone
    surrogates in its strings), with a usable type and timestamp."""
    if raw.startswith(codecs.BOM_UTF8):
        raise EventError("body starts with a byte-order mark: send the JSON alone")
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except EventError:
        raise
    except (ValueError, RecursionError):
        raise EventError("body is not valid JSON") from None
    check_readable(body)
    return body


def _refuse_constant(name: str) -> Any:
    raise EventError(f"body holds {name}, which JSON does not allow")


def check_readable(body: Any) -> None:
    """Raise EventError unless ``body`` is an event whose text every stage can encode (no
    lone surrogates), whose numbers are finite, with a usable type and timestamp."""
    try:  # the encoder walks the body in C: a fifth of the cost of a walk in Python
        _strict_json(body).encode()
    except UnicodeEncodeError:
        raise EventError("body holds text that is not valid UTF-8 (a lone surrogate)") from None
    except ValueError:  # what allow_nan=False raises for NaN and the infinities
        raise EventError("body holds a number that is not finite") from None
    except RecursionError:
        raise EventError("body is nested too deeply") from None
    except TypeError as exc:  # only a body built in code, never one read from JSON
        raise EventError(f"body holds a value JSON cannot hold: {exc}") from None
    parse_event("check", body)


def valid_email(value: Any) -> str | None:
    """An email address as the CRM gets it (checked, normalised, lower-cased), or None for
    anything that is not one (no DNS lookup)."""
    if not isinstance(value, str) or "@" not in value:
        return None
    return _checked_email(value.strip())


@functools.lru_cache(maxsize=4096)  # a batch sees the same learners' emails again and again
def _checked_email(value: str) -> str | None:
    try:
        found = validate_email(value, check_deliverability=False)
    except EmailNotValidError:
        return None
    return found.normalized.lower()


def parse_event(event_id: str, body: Any, received_at: datetime | None = None) -> Event:
    """Build an Event; a missing timestamp falls back to the receive time."""
    event_type = check_body(body)
    raw_time = body.get("timestamp")
    fallback = received_at or datetime.now(UTC)
    timestamp = fallback if raw_time is None else parse_timestamp(raw_time)
    user_id = body.get("user_id")
    if isinstance(user_id, bool) or not isinstance(user_id, str | int | None):
        raise EventError(f"'user_id' must be a string, got {type(user_id).__name__}")
    return Event(
        id=event_id,
        type=event_type,
        timestamp=timestamp,
        user_id=str(user_id) if user_id not in (None, "") else None,
        body=body,
    )
