"""Instruqt's GraphQL API: an Instruqt user id to the learner's email and name.

One query asks for both what the learner gave the team when claiming its invite
(``details(teamSlug:)``: email, first and last name) and their own profile (email, display
name); the team's details come first. A public Go client of Instruqt's API
(isovalent/instruqt-go, ``instruqt/user.go``) asks the same.

``InstruqtClient.post`` (one request: key, timeout, HTTP failures to the error tree),
``raise_for_errors`` (GraphQL errors to the error tree) and ``profile_from`` (a GraphQL user to
a Profile) are shared with ``instruqt_reports``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn

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
_SURROGATE = re.compile("[\ud800-\udfff]")
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
        variables = {"userID": user_id, "teamSlug": self.team_slug}
        body = self.post(USER_QUERY, variables, label=f"user {user_id}")
        found = profile_from(user_id, _field(body.get("data"), "user"))
        errors = body.get("errors")
        if errors and (found is None or found.email is None):
            if all_not_found(errors):
                log.debug("instruqt user=%s not found: %s", user_id, self.describe(errors))
                return found
            # an error about this one user's data names a ``path``; any other, the query
            category = Category.INSTRUQT_API if _all_have_path(errors) else Category.CONFIG
            self.raise_for_errors(errors, f"user {user_id}", category)
        if errors:  # a partial answer (say, no details for this team): what it has is used
            log.debug("instruqt user=%s partial answer: %s", user_id, self.describe(errors))
        return found

    def post(self, query: str, variables: dict[str, Any], label: str) -> dict[str, Any]:
        """One GraphQL request, not retried: the decoded JSON body of a 2xx answer (it may
        carry ``errors``; the caller decides). ``label`` names the request in error messages.

        Raises PermanentError(CONFIG) for an unusable URL, PermanentError(AUTH) on 401/403,
        RateLimited on 429 (its Retry-After as the wait), RetryableError on 5xx, a connection
        failure or timeout, or a 2xx without a JSON object, and for any other 4xx the error
        its GraphQL errors mean (see ``raise_for_errors``; CONFIG when they say nothing).
        """
        log.debug("instruqt request %s url=%s", label, self.url)
        try:
            response = self.session.post(
                self.url,
                json={"query": query, "variables": variables},
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
                f"Instruqt API unreachable for {label}: {type(exc).__name__}"
            ) from exc
        return self._body(label, response)

    def _body(self, label: str, response: requests.Response) -> dict[str, Any]:
        """The JSON body of one HTTP response, or the error its status means."""
        status = response.status_code
        if status in (401, 403):
            raise PermanentError(
                f"Instruqt API answered {status}: INSTRUQT_API_KEY is wrong or not authorised",
                category=Category.AUTH,
            )
        if status == 429:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            raise RateLimited(
                f"Instruqt API rate limited (429) for {label}",
                wait=DEFAULT_RATE_LIMIT_WAIT if wait is None else wait,
                policy="instruqt",
            )
        if status >= 500:
            raise RetryableError(f"Instruqt API server error {status} for {label}")
        body = self._json(response)
        if status >= 400:  # the request itself was refused
            if body is not None and body.get("errors"):
                self.raise_for_errors(body["errors"], label)
            raise PermanentError(f"Instruqt API answered {status}", category=Category.CONFIG)
        if body is None:
            raise RetryableError(f"Instruqt API answered {status} with a non-JSON body")
        return body

    def describe(self, errors: Any) -> str:
        """GraphQL errors as one line, without the API key."""
        return "; ".join(self._scrub(_message(err)) for err in _as_list(errors)) or "unknown error"

    def raise_for_errors(
        self, errors: Any, label: str, category: Category = Category.CONFIG
    ) -> NoReturn:
        """Raise what GraphQL ``errors`` mean: PermanentError(AUTH) for a key Instruqt
        refuses, RetryableError for a transient failure, else PermanentError(``category``)
        with the messages (CONFIG: the query or its variables were refused)."""
        messages = [self._scrub(_message(err)) for err in _as_list(errors)]
        text = self.describe(errors)
        if any(_UNAUTHORISED.search(m) for m in messages):
            raise PermanentError(
                f"Instruqt API refused the INSTRUQT_API_KEY: {text}", category=Category.AUTH
            )
        if any(_TRANSIENT.search(m) for m in messages):
            raise RetryableError(f"Instruqt API transient error for {label}: {text}")
        if category == Category.CONFIG:
            raise PermanentError(
                f"Instruqt API refused the query: {text} (check INSTRUQT_TEAM_SLUG and "
                "INSTRUQT_GRAPHQL_URL)",
                category=Category.CONFIG,
            )
        raise PermanentError(f"Instruqt API error for {label}: {text}", category=category)

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


def _all_have_path(errors: Any) -> bool:
    """Whether every GraphQL error is about a field of the answer (each names a ``path``)."""
    return all(isinstance(err, dict) and bool(err.get("path")) for err in _as_list(errors))


def all_not_found(errors: Any) -> bool:
    """Whether every GraphQL error says that what was asked for does not exist."""
    return all(_NOT_FOUND.search(_message(err)) for err in _as_list(errors))


def _field(data: Any, name: str) -> Any:
    """``data[name]`` if ``data`` is an object, else None."""
    return data.get(name) if isinstance(data, dict) else None


def _message(error: Any) -> str:
    """The message of one GraphQL error entry (with its extensions code, if any)."""
    if not isinstance(error, dict):
        return str(error)
    message = str(error.get("message") or "")
    extensions = error.get("extensions")
    code = extensions.get("code") if isinstance(extensions, dict) else None
    return f"{message} [{code}]" if code else message


def text_or_none(value: Any) -> str | None:
    """Stripped text, or None for anything empty or not a string."""
    return (value.strip() or None) if isinstance(value, str) else None


def _name(value: Any) -> str | None:
    """A name as cached with the learner: None also for text not storable as UTF-8 (a lone
    surrogate would fail the cache write, and with it the learner's whole batch)."""
    found = text_or_none(value)
    if found is not None and _SURROGATE.search(found):
        log.warning("a name Instruqt gave is not valid UTF-8 text: left out")
        return None
    return found


def profile_from(user_id: str, user: Any) -> Profile | None:
    """A Profile from a GraphQL ``User`` object (``id``, ``details``, ``profile``; the team's
    details first); None if the user is null."""
    if not isinstance(user, dict):
        return None
    details, profile = (user.get(part) for part in ("details", "profile"))
    details = details if isinstance(details, dict) else {}
    profile = profile if isinstance(profile, dict) else {}
    from_details, from_profile = (valid_email(part.get("email")) for part in (details, profile))
    display = _name(profile.get("display_name"))
    first, last = _name(details.get("firstName")), _name(details.get("lastName"))
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
