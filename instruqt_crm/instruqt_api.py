"""Instruqt's GraphQL API: an Instruqt user id to the learner's email and display name."""

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
from instruqt_crm.retry import retrying

log = logging.getLogger(__name__)

USER_QUERY = (
    "query ($userID: String!) { user(userID: $userID) { id profile { email display_name } } }"
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
    """What Instruqt knows about a user: email (normalised) and display name, either may be None."""

    user_id: str
    email: str | None
    display_name: str | None


def normalise_email(value: object) -> str | None:
    """Strip and lower-case an email; None for anything empty or not a string."""
    if not isinstance(value, str):
        return None
    email = value.strip().lower()
    return email or None


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
        url: str = DEFAULT_INSTRUQT_GRAPHQL_URL,
        timeout: float = 10.0,
        session: requests.Session | None = None,
        attempts: int = 4,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._api_key = api_key
        self.url = url
        self.timeout = timeout
        self.session = session or requests.Session()
        self.attempts = attempts
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"InstruqtClient(url={self.url!r}, api_key='***')"

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
                json={"query": USER_QUERY, "variables": {"userID": user_id}},
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
                raise PermanentError(
                    f"Instruqt API answered {status}", category=Category.INSTRUQT_API
                )
            raise RetryableError(f"Instruqt API answered {status} with a non-JSON body")
        errors = body.get("errors")
        if errors:
            self._graphql_errors(user_id, errors)
            return None
        if status >= 400:
            raise PermanentError(f"Instruqt API answered {status}", category=Category.INSTRUQT_API)
        return _profile(user_id, body.get("data"))

    def _graphql_errors(self, user_id: str, errors: Any) -> None:
        """Return for "not found"-like errors (the user is unknown); raise for everything else."""
        messages = [self._scrub(_message(err)) for err in _as_list(errors)]
        text = "; ".join(messages) or "unknown error"
        if all(_NOT_FOUND.search(m) for m in messages):
            log.debug("instruqt user=%s not found: %s", user_id, text)
            return
        if any(_UNAUTHORISED.search(m) for m in messages):
            raise PermanentError(
                f"Instruqt API refused the INSTRUQT_API_KEY: {text}", category=Category.AUTH
            )
        if any(_TRANSIENT.search(m) for m in messages):
            raise RetryableError(f"Instruqt API transient error for user {user_id}: {text}")
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


def _message(error: Any) -> str:
    """The message of one GraphQL error entry (with its extensions code, if any)."""
    if not isinstance(error, dict):
        return str(error)
    message = str(error.get("message") or "")
    extensions = error.get("extensions")
    code = extensions.get("code") if isinstance(extensions, dict) else None
    return f"{message} [{code}]" if code else message


def _profile(user_id: str, data: Any) -> Profile | None:
    """A Profile from the ``data`` of the user query; None if the user is null."""
    user = data.get("user") if isinstance(data, dict) else None
    if not isinstance(user, dict):
        return None
    profile = user.get("profile")
    if not isinstance(profile, dict):
        profile = {}
    name = profile.get("display_name")
    return Profile(
        user_id=str(user.get("id") or user_id),
        email=normalise_email(profile.get("email")),
        display_name=(name.strip() or None) if isinstance(name, str) else None,
    )
