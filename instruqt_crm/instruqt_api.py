"""Instruqt's GraphQL API: an Instruqt user id to the learner's email and name.

One query asks for both what the learner gave the team when claiming its invite
(``details(teamSlug:)``: email, first and last name) and their own profile (email, display
name); the team's details come first. A public Go client of Instruqt's API
(isovalent/instruqt-go, ``instruqt/user.go``) asks the same.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import requests

from instruqt_crm.config import DEFAULT_INSTRUQT_GRAPHQL_URL
from instruqt_crm.errors import Category, PermanentError, RateLimited, RetryableError
from instruqt_crm.events import valid_email
from instruqt_crm.retry import retrying

log = logging.getLogger(__name__)

USER_QUERY = (
    "query ($userID: String!, $teamSlug: String!) { user(userID: $userID) { id "
    "details(teamSlug: $teamSlug) { email firstName lastName } "
    "profile { email display_name } } }"
)
DEFAULT_RATE_LIMIT_WAIT = 5.0  # a 429 without Retry-After
MAX_RETRY_AFTER = 3600.0

_NOT_FOUND = re.compile(r"not[ _-]?found|no such user|does ?n[o']t exist|unknown user", re.I)
_UNAUTHORISED = re.compile(r"unauthori[sz]ed|unauthenticated|forbidden|permission denied", re.I)
_TRANSIENT = re.compile(r"internal (server )?error|timed? ?out|temporarily|unavailable", re.I)
_CONFIG_ERRORS = (
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidHeader,
)


@dataclass(frozen=True)
class Profile:
    """What Instruqt knows about a user (any part may be None): the email (normalised; the
    team's details first, else the profile's), the name, and where the email came from."""

    user_id: str
    email: str | None
    display_name: str | None
    first_name: str | None = None
    last_name: str | None = None
    email_from: str | None = None  # "details" or "profile"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), or None if unusable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


class InstruqtClient:
    """Looks up Instruqt users by id; every request has a timeout, retries are bounded."""

    def __init__(
        self,
        api_key: str,
        team_slug: str,
        url: str = DEFAULT_INSTRUQT_GRAPHQL_URL,
        timeout: float = 10.0,
        session: requests.Session | None = None,
        attempts: int = 4,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._api_key = api_key
        self.team_slug = team_slug
        self.url = url
        self.timeout = timeout
        self.session = session or requests.Session()
        self.attempts = attempts
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"InstruqtClient(url={self.url!r}, team={self.team_slug!r}, api_key='***')"

    def lookup_email(self, user_id: str) -> str | None:
        """The user's normalised email, or None (unknown user, anonymous play, no email)."""
        profile = self.lookup_profile(user_id)
        return profile.email if profile else None

    def lookup_profile(self, user_id: str) -> Profile | None:
        """The user's profile, or None if Instruqt does not know the user."""
        if not user_id or not user_id.strip():
            log.debug("instruqt lookup skipped: empty user id")
            return None
        policy = retrying(
            attempts=self.attempts, sleep=self._sleep, label=f"instruqt lookup user={user_id}"
        )
        profile: Profile | None = policy(self._lookup_once, user_id)
        log.info(
            "instruqt lookup user=%s: %s",
            user_id,
            "unknown user" if profile is None else ("email found" if profile.email else "no email"),
        )
        return profile

    def _lookup_once(self, user_id: str) -> Profile | None:
        """One request, vendor failures converted to the error tree."""
        log.debug("instruqt request user=%s url=%s", user_id, self.url)
        try:
            response = self.session.post(
                self.url,
                json={
                    "query": USER_QUERY,
                    "variables": {"userID": user_id, "teamSlug": self.team_slug},
                },
                headers={
                    "Authorization": f"Bearer {self._api_key}",
                    "Accept": "application/json",
                },
                timeout=self.timeout,
            )
        except _CONFIG_ERRORS as exc:
            raise PermanentError(
                f"INSTRUQT_GRAPHQL_URL is not usable ({type(exc).__name__})",
                category=Category.CONFIG,
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise RetryableError(
                f"Instruqt API unreachable for user {user_id}: {type(exc).__name__}"
            ) from exc
        return self._interpret(user_id, response)

    def _interpret(self, user_id: str, response: requests.Response) -> Profile | None:
        """Turn one HTTP response into a Profile, None, or an error."""
        status = response.status_code
        if status in (401, 403):
            raise PermanentError(
                f"Instruqt API answered {status}: INSTRUQT_API_KEY is wrong or not authorised",
                category=Category.AUTH,
            )
        if status == 429:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            raise RateLimited(
                f"Instruqt API rate limited (429) looking up user {user_id}",
                wait=DEFAULT_RATE_LIMIT_WAIT if wait is None else wait,
                policy="instruqt",
            )
        if status >= 500:
            raise RetryableError(f"Instruqt API server error {status} for user {user_id}")
        body = self._json(response)
        if body is None:
            if status >= 400:
                raise PermanentError(f"Instruqt API answered {status}", category=Category.CONFIG)
            raise RetryableError(f"Instruqt API answered {status} with a non-JSON body")
        found = _profile(user_id, body.get("data"))
        errors = body.get("errors")
        if errors and (found is None or found.email is None):
            self._graphql_errors(user_id, errors, status)  # raises, or the user is unknown
            return found
        if errors:  # a partial answer (say, no details for this team): what it has is used
            log.debug("instruqt user=%s partial answer: %s", user_id, self._describe(errors))
        if status >= 400:
            raise PermanentError(f"Instruqt API answered {status}", category=Category.CONFIG)
        return found

    def _describe(self, errors: Any) -> str:
        """GraphQL errors as one line, without the API key."""
        return "; ".join(self._scrub(_message(err)) for err in _as_list(errors)) or "unknown error"

    def _graphql_errors(self, user_id: str, errors: Any, status: int) -> None:
        """Return for "not found"-like errors (the user is unknown); raise for everything else:
        a key Instruqt refuses (auth), a transient error, a refused query (an HTTP error, or
        an error about no field of the answer: the query or its variables, config), or an
        error about this one user's data (one with a ``path``)."""
        messages = [self._scrub(_message(err)) for err in _as_list(errors)]
        text = self._describe(errors)
        if all(_NOT_FOUND.search(m) for m in messages):
            log.debug("instruqt user=%s not found: %s", user_id, text)
            return
        if any(_UNAUTHORISED.search(m) for m in messages):
            raise PermanentError(
                f"Instruqt API refused the INSTRUQT_API_KEY: {text}", category=Category.AUTH
            )
        if any(_TRANSIENT.search(m) for m in messages):
            raise RetryableError(f"Instruqt API transient error for user {user_id}: {text}")
        if status >= 400 or not all(_has_path(err) for err in _as_list(errors)):
            raise PermanentError(
                f"Instruqt API refused the query: {text} (check INSTRUQT_TEAM_SLUG and "
                "INSTRUQT_GRAPHQL_URL)",
                category=Category.CONFIG,
            )
        raise PermanentError(
            f"Instruqt API error for user {user_id}: {text}", category=Category.INSTRUQT_API
        )

    def _scrub(self, text: str) -> str:
        """Never let the API key into a message."""
        return text.replace(self._api_key, "***") if self._api_key else text

    @staticmethod
    def _json(response: requests.Response) -> dict[str, Any] | None:
        """The JSON object in the body, or None."""
        try:
            body = response.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None


def _as_list(value: Any) -> list[Any]:
    """A GraphQL ``errors`` value as a list."""
    return value if isinstance(value, list) else [value]


def _has_path(error: Any) -> bool:
    """Whether a GraphQL error is about a field of the answer (it names a ``path``)."""
    return isinstance(error, dict) and bool(error.get("path"))


def _message(error: Any) -> str:
    """The message of one GraphQL error entry (with its extensions code, if any)."""
    if not isinstance(error, dict):
        return str(error)
    message = str(error.get("message") or "")
    extensions = error.get("extensions")
    code = extensions.get("code") if isinstance(extensions, dict) else None
    return f"{message} [{code}]" if code else message


def _text(value: Any) -> str | None:
    """Stripped text, or None for anything empty or not a string."""
    return (value.strip() or None) if isinstance(value, str) else None


def _profile(user_id: str, data: Any) -> Profile | None:
    """A Profile from the ``data`` of the user query (the team's details first); None if the
    user is null."""
    user = data.get("user") if isinstance(data, dict) else None
    if not isinstance(user, dict):
        return None
    details, profile = (user.get(part) for part in ("details", "profile"))
    details = details if isinstance(details, dict) else {}
    profile = profile if isinstance(profile, dict) else {}
    from_details, from_profile = (valid_email(part.get("email")) for part in (details, profile))
    display = _text(profile.get("display_name"))
    first, last = _text(details.get("firstName")), _text(details.get("lastName"))
    if not (first or last) and display:  # the display name, split at its last space
        first, _, last = display.rpartition(" ") if " " in display else ("", "", display)
    return Profile(
        user_id=str(user.get("id") or user_id),
        email=from_details or from_profile,
        display_name=display,
        first_name=first or None,
        last_name=last or None,
        email_from="details" if from_details else "profile" if from_profile else None,
    )
