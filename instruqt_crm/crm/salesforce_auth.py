"""Salesforce tokens and transport: OAuth flows, timed session, one refresh on 401, errors.

Three ways in (see ``Credentials.flow``): client credentials (client id + secret, needs a My
Domain login URL), JWT bearer (client id + username + RS256 private key), or a ready session
(instance URL + access token, never refreshed). Tokens are fetched with plain ``requests``
(POST ``{login}/services/oauth2/token``) and handed to simple-salesforce with a session whose
every request has a timeout. A 401 INVALID_SESSION_ID gets exactly one new token and one retry.
``running_user`` names the user the credentials act as: the token answer's identity URL
(``.../id/<org id>/<user id>``) says it for the login flows, ``/services/oauth2/userinfo`` for
a ready session.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import jwt
import redis
import requests
from pydantic import SecretStr
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceError, SalesforceExpiredSession

from instruqt_crm import keys
from instruqt_crm.config import (
    DEFAULT_SALESFORCE_API_VERSION,
    DEFAULT_SALESFORCE_LOGIN_URL,
    Settings,
)
from instruqt_crm.errors import Category, PermanentError, RateLimited, RetryableError, SyncError

log = logging.getLogger(__name__)
T = TypeVar("T")
TIMEOUT = (5.0, 60.0)  # connect, read (seconds)
TOKEN_TTL = 30 * 60  # a cached token is reused this long (Salesforce sessions last >= 2 h)
LIMIT_WAIT = 3600.0  # REQUEST_LIMIT_EXCEEDED: the daily quota rolls over 24 h; look again hourly


class TimeoutSession(requests.Session):
    """A requests session that gives every request a timeout unless the caller set one."""

    def __init__(self, timeout: tuple[float, float] = TIMEOUT) -> None:
        super().__init__()
        self.default_timeout = timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        """``requests.Session.request`` with the default timeout filled in."""
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.default_timeout
        return super().request(method, url, *args, **kwargs)


@dataclass(frozen=True)
class RunningUser:
    """The Salesforce user the credentials act as (its username when known)."""

    id: str
    username: str | None = None

    def __str__(self) -> str:
        return f"the user {self.username} ({self.id})" if self.username else f"the user {self.id}"


@dataclass(frozen=True)
class Login:
    """A token answer: the access token, the instance it is for, and its user's Id."""

    token: str
    instance: str
    user_id: str | None = None


@dataclass(frozen=True)
class Credentials:
    """What the settings give for one Salesforce org (secrets stay wrapped)."""

    login_url: str = DEFAULT_SALESFORCE_LOGIN_URL
    api_version: str = DEFAULT_SALESFORCE_API_VERSION
    client_id: str | None = None
    client_secret: SecretStr | None = None
    username: str | None = None
    private_key: SecretStr | None = None
    instance_url: str | None = None
    access_token: SecretStr | None = None

    @property
    def flow(self) -> str:
        """``jwt``, ``client_credentials``, ``session``, or ``""`` when nothing is configured."""
        if self.client_id and self.username and self.private_key:
            return "jwt"
        if self.client_id and self.client_secret:
            return "client_credentials"
        if self.instance_url and self.access_token:
            return "session"
        return ""


def credentials_from(settings: Settings) -> Credentials:
    """The Salesforce credentials in the settings."""
    return Credentials(
        login_url=settings.salesforce_login_url,
        api_version=settings.salesforce_api_version,
        client_id=settings.salesforce_client_id,
        client_secret=settings.salesforce_client_secret,
        username=settings.salesforce_username,
        private_key=settings.salesforce_private_key,
        instance_url=settings.salesforce_instance_url,
        access_token=settings.salesforce_access_token,
    )


def jwt_audience(login_url: str) -> str:
    """The ``aud`` claim: login or test host (a My Domain login URL maps to one of them)."""
    host = urlparse(login_url).hostname or ""
    if host in ("login.salesforce.com", "test.salesforce.com"):
        return f"https://{host}"
    sandbox = ".sandbox." in host or host.startswith("test.")
    return "https://test.salesforce.com" if sandbox else "https://login.salesforce.com"


def token_request(creds: Credentials) -> dict[str, str]:
    """The form fields of the token request for the configured flow."""
    if creds.flow == "jwt":
        assert creds.private_key is not None
        claims = {
            "iss": creds.client_id,
            "sub": creds.username,
            "aud": jwt_audience(creds.login_url),
            "exp": int(time.time()) + 180,
        }
        try:
            assertion = jwt.encode(claims, creds.private_key.get_secret_value(), algorithm="RS256")
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise PermanentError(
                "Salesforce: SALESFORCE_PRIVATE_KEY is not a usable RSA private key (PEM)",
                Category.AUTH,
            ) from exc
        return {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
    if creds.flow == "client_credentials":
        assert creds.client_secret is not None and creds.client_id is not None
        return {
            "grant_type": "client_credentials",
            "client_id": creds.client_id,
            "client_secret": creds.client_secret.get_secret_value(),
        }
    raise PermanentError(
        "Salesforce: no login flow configured (see docs/salesforce.md)", Category.AUTH
    )


def fetch_token(creds: Credentials, session: requests.Session) -> Login:
    """POST the token endpoint; the token, its instance URL and its user (the last part of the
    identity URL ``id``). Never puts a secret in an error."""
    url = f"{creds.login_url}/services/oauth2/token"
    try:
        response = session.post(url, data=token_request(creds), timeout=TIMEOUT)
    except requests.RequestException as exc:
        raise RetryableError(
            f"Salesforce token: connection problem ({type(exc).__name__})"
        ) from exc
    if response.status_code >= 500:
        raise RetryableError(f"Salesforce token: {response.status_code} server error")
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or "access_token" not in body:
        error = str(body.get("error") or response.status_code)
        detail = str(body.get("error_description") or "")[:200]
        raise PermanentError(
            f"Salesforce token ({creds.flow} at {creds.login_url}): {error}: {detail}".rstrip(": ")
            + "; check the connected app, the SALESFORCE_* settings and the integration user",
            Category.AUTH,
        )
    instance = str(body.get("instance_url") or creds.instance_url or creds.login_url)
    log.info("salesforce: new access token (%s flow) for %s", creds.flow, instance)
    user = str(body.get("id") or "").rstrip("/").rsplit("/", 1)[-1]
    return Login(str(body["access_token"]), instance, user or None)


def _error_code(exc: SalesforceError) -> tuple[str, str]:
    """Salesforce's errorCode and message from an error response."""
    content = exc.content
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return str(content[0].get("errorCode", "")), str(content[0].get("message", ""))[:500]
    if isinstance(content, dict):
        return str(content.get("errorCode", "")), str(content.get("message", ""))[:500]
    return "", str(content)[:200]


def convert(exc: Exception, what: str) -> SyncError:
    """The engine error for a simple-salesforce or requests failure during ``what``."""
    if isinstance(exc, SyncError):
        return exc
    if isinstance(exc, requests.RequestException):
        return RetryableError(f"Salesforce {what}: connection problem ({type(exc).__name__})")
    if not isinstance(exc, SalesforceError):
        return PermanentError(f"Salesforce {what}: {type(exc).__name__}", Category.OTHER)
    code, message = _error_code(exc)
    status = exc.status
    if status == 403 and code == "REQUEST_LIMIT_EXCEEDED":
        return RateLimited(f"Salesforce {what}: {code}: {message}", LIMIT_WAIT, code)
    if status == 401:
        return PermanentError(
            f"Salesforce {what}: 401 {code or 'INVALID_SESSION_ID'}: the access token is not "
            "accepted even after a new login; check the SALESFORCE_* settings",
            Category.AUTH,
        )
    if status == 403:
        return PermanentError(f"Salesforce {what}: 403 {code}: {message}", Category.AUTH)
    if status >= 500 or code in ("UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE"):
        return RetryableError(f"Salesforce {what}: {status} {code}".rstrip())
    return PermanentError(f"Salesforce {what}: {status} {code}: {message}", Category.VALIDATION)


class Connection:
    """A simple-salesforce client that logs in itself, refreshes once on 401, converts errors."""

    def __init__(
        self,
        creds: Credentials,
        cache: redis.Redis | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.creds = creds
        self.cache = cache
        self.session = session or TimeoutSession()
        self._client: Salesforce | None = None
        self._user: RunningUser | None = None
        self.on_response: Callable[[Salesforce], None] | None = None

    def __repr__(self) -> str:
        return f"Connection(flow={self.creds.flow!r}, login={self.creds.login_url!r})"

    def client(self, fresh: bool = False) -> Salesforce:
        """The simple-salesforce client (a new token when ``fresh``)."""
        if self._client is None or fresh:
            login = self._token(fresh)
            if login.user_id:
                self._user = RunningUser(login.user_id, self.creds.username)
            self._client = Salesforce(
                instance_url=login.instance,
                session_id=login.token,
                version=self.creds.api_version,
                session=self.session,
            )
        return self._client

    def _token(self, fresh: bool) -> Login:
        """A cached token, the configured session, or a new one from the token endpoint."""
        if self.creds.flow == "session":
            assert self.creds.access_token is not None and self.creds.instance_url is not None
            if fresh:
                raise PermanentError(
                    "Salesforce: SALESFORCE_ACCESS_TOKEN expired or was revoked; set a new one "
                    "or configure a login flow (client credentials or JWT)",
                    Category.AUTH,
                )
            return Login(self.creds.access_token.get_secret_value(), self.creds.instance_url)
        if self.cache is not None and not fresh:
            cached = self.cache.get(keys.SALESFORCE_TOKEN)
            if cached:
                data = json.loads(cached)
                return Login(str(data["token"]), str(data["instance"]), data.get("user"))
        login = fetch_token(self.creds, self.session)
        if self.cache is not None:
            self.cache.set(
                keys.SALESFORCE_TOKEN,
                json.dumps(
                    {"token": login.token, "instance": login.instance, "user": login.user_id}
                ),
                ex=TOKEN_TTL,
            )
        return login

    def call(self, what: str, function: Callable[[Salesforce], T]) -> T:
        """Run ``function(client)``; on an expired session log in again once and retry once."""
        try:
            try:
                result = function(self.client())
            except SalesforceExpiredSession:
                log.info("salesforce %s: session expired, logging in again", what)
                result = function(self.client(fresh=True))
        except (SalesforceError, requests.RequestException) as exc:
            raise convert(exc, what) from exc
        if self.on_response is not None and self._client is not None:
            self.on_response(self._client)
        return result

    def running_user(self) -> RunningUser:
        """The user the credentials act as: from the login, else asked of ``userinfo``."""
        self.client()
        if self._user is None:
            info = self.call("find the session's user", lambda sf: sf.oauth2("userinfo"))
            if not isinstance(info, dict) or not info.get("user_id"):
                raise PermanentError(
                    "Salesforce: cannot tell which user the session belongs to (userinfo "
                    "answered no user_id); use a login flow or name the user with --assign-to",
                    Category.AUTH,
                )
            self._user = RunningUser(str(info["user_id"]), info.get("preferred_username"))
        return self._user
