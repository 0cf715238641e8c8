"""Settings from the environment: read once, validated, typed, with one-line errors."""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

DEFAULT_INSTRUQT_GRAPHQL_URL = "https://play.instruqt.com/graphql"
DEFAULT_HUBSPOT_API_BASE = "https://api.hubapi.com"
DEFAULT_SALESFORCE_LOGIN_URL = "https://login.salesforce.com"
DEFAULT_SALESFORCE_API_VERSION = "62.0"
MIN_DEDUPE_SECONDS = 99_000  # Svix retries for about 27.5 hours
T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class Secret:
    """A string that never shows itself in logs, reprs or tracebacks."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret text, for the one place that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_webhook_secrets(text: str) -> tuple[Secret, ...]:
    """Split comma-separated ``whsec_`` secrets and check each is base64 (never echoing it)."""
    secrets = []
    for position, raw in enumerate((part.strip() for part in text.split(",")), start=1):
        if not raw:
            continue
        if not raw.startswith("whsec_"):
            raise SettingsError(
                f"INSTRUQT_WEBHOOK_SECRET: secret #{position} must start with 'whsec_' "
                "(copy it from the endpoint's Signing Secret in Instruqt)"
            )
        try:
            key = base64.b64decode(raw[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not key:
            raise SettingsError(
                f"INSTRUQT_WEBHOOK_SECRET: secret #{position} is not valid base64 after 'whsec_'"
            )
        secrets.append(Secret(raw))
    if not secrets:
        raise SettingsError("INSTRUQT_WEBHOOK_SECRET: expected one or more whsec_... secrets")
    return tuple(secrets)


def _number(
    name: str, kind: Callable[[str], T], minimum: float | None = None
) -> Callable[[str], T]:
    """A parser for a numeric variable with an optional lower bound."""

    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise SettingsError(f"{name}: expected a {kind.__name__}, got {text!r}") from None
        if minimum is not None and value < minimum:  # type: ignore[operator]
            raise SettingsError(f"{name}: expected at least {minimum}, got {text!r}")
        return value

    return parse


def _url(name: str) -> Callable[[str], str]:
    """A parser for an http(s) URL."""

    def parse(text: str) -> str:
        if not text.startswith(("http://", "https://")):
            raise SettingsError(f"{name}: expected an http:// or https:// URL, got {text!r}")
        return text.rstrip("/")

    return parse


def _redis_url(text: str) -> str:
    """Check a Redis URL's scheme."""
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(
            f"REDIS_URL: expected a redis://, rediss:// or unix:// URL, got {text.split('@')[-1]!r}"
        )
    return text


def _choice(name: str, options: tuple[str, ...]) -> Callable[[str], str]:
    """A parser for one of a few words."""

    def parse(text: str) -> str:
        if text.lower() not in options:
            raise SettingsError(f"{name}: expected one of {', '.join(options)}, got {text!r}")
        return text.lower()

    return parse


def _flag(name: str) -> Callable[[str], bool]:
    """A parser for a true/false setting."""

    def parse(text: str) -> bool:
        value = text.lower()
        if value not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
            raise SettingsError(f"{name}: expected true or false, got {text!r}")
        return value in {"1", "true", "yes", "on"}

    return parse


def _sentry(dsn: Secret | None) -> Secret | None:
    """Check that sentry-sdk is installed when a DSN is given."""
    if dsn is None:
        return None
    try:
        import sentry_sdk  # noqa: F401
    except ImportError:
        raise SettingsError(
            "SENTRY_DSN: set, but sentry-sdk is not installed (pip install 'instruqt-crm[sentry]')"
        ) from None
    return dsn


def _log_level(text: str) -> str:
    """Check a logging level name."""
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise SettingsError(f"LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return level


# --- Salesforce settings (issue 5) ---------------------------------------------------------


def _api_version(text: str) -> str:
    """Check a Salesforce API version such as 62.0."""
    version = text.removeprefix("v")
    if not re.fullmatch(r"\d{2,3}\.0", version):
        raise SettingsError(f"SALESFORCE_API_VERSION: expected a version like 62.0, got {text!r}")
    return version


def _private_key(raw: str) -> Secret:
    """A PEM private key given as text (\\n escapes allowed) or as a file path."""
    text = raw.replace("\\n", "\n")
    if "-----BEGIN" not in text:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise SettingsError(
                "SALESFORCE_PRIVATE_KEY: expected PEM text (-----BEGIN ... PRIVATE KEY-----) "
                "or the path of a PEM file; no such file"
            )
        text = path.read_text()
    if "PRIVATE KEY-----" not in text:
        raise SettingsError("SALESFORCE_PRIVATE_KEY: expected a PEM private key")
    return Secret(text)


def _salesforce(env: Mapping[str, str]) -> dict[str, object]:
    """The SALESFORCE_* settings, checked for a complete login flow."""

    def value(name: str) -> str | None:
        return env.get(name, "").strip() or None

    client_id, secret = value("SALESFORCE_CLIENT_ID"), value("SALESFORCE_CLIENT_SECRET")
    username, key = value("SALESFORCE_USERNAME"), value("SALESFORCE_PRIVATE_KEY")
    instance, token = value("SALESFORCE_INSTANCE_URL"), value("SALESFORCE_ACCESS_TOKEN")
    if (username or key) and not (client_id and username and key):
        raise SettingsError(
            "SALESFORCE_PRIVATE_KEY: the JWT flow needs SALESFORCE_CLIENT_ID, SALESFORCE_USERNAME "
            "and SALESFORCE_PRIVATE_KEY together"
        )
    if secret and not client_id:
        raise SettingsError("SALESFORCE_CLIENT_ID: needed with SALESFORCE_CLIENT_SECRET")
    if client_id and not (secret or key):
        raise SettingsError(
            "SALESFORCE_CLIENT_ID: set SALESFORCE_CLIENT_SECRET (client credentials) or "
            "SALESFORCE_USERNAME + SALESFORCE_PRIVATE_KEY (JWT bearer) with it"
        )
    if bool(token) != bool(instance) and not client_id:
        raise SettingsError(
            "SALESFORCE_ACCESS_TOKEN: set both SALESFORCE_INSTANCE_URL and SALESFORCE_ACCESS_TOKEN "
            "(or a login flow instead)"
        )
    login = value("SALESFORCE_LOGIN_URL")
    return {
        "salesforce_login_url": _url("SALESFORCE_LOGIN_URL")(login)
        if login
        else DEFAULT_SALESFORCE_LOGIN_URL,
        "salesforce_client_id": client_id,
        "salesforce_client_secret": Secret(secret) if secret else None,
        "salesforce_username": username,
        "salesforce_private_key": _private_key(key) if key else None,
        "salesforce_instance_url": _url("SALESFORCE_INSTANCE_URL")(instance) if instance else None,
        "salesforce_access_token": Secret(token) if token else None,
        "salesforce_api_version": _api_version(v)
        if (v := value("SALESFORCE_API_VERSION"))
        else DEFAULT_SALESFORCE_API_VERSION,
        "salesforce_requests_per_minute": _number("SALESFORCE_REQUESTS_PER_MINUTE", int, 1)(r)
        if (r := value("SALESFORCE_REQUESTS_PER_MINUTE"))
        else 120,
    }


# -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Every setting the service reads, typed; build with ``Settings.from_env()``."""

    webhook_secrets: tuple[Secret, ...]
    redis_url: str | None = None
    mapping_path: Path = Path("mappings/hubspot.yaml")
    instruqt_api_key: Secret | None = None
    instruqt_graphql_url: str = DEFAULT_INSTRUQT_GRAPHQL_URL
    hubspot_access_token: Secret | None = None
    hubspot_api_base: str = DEFAULT_HUBSPOT_API_BASE
    hubspot_requests_per_10s: int = 90
    flush_window_seconds: float = 1.0
    flush_hold_seconds: float = 4.0
    flush_lease_seconds: int = 30
    identity_wait_days: float = 7.0
    max_body_bytes: int = 256 * 1024
    dedupe_ttl_seconds: int = 72 * 3600
    dry_run_path: Path = Path("var/dry-run.jsonl")
    dashboard_username: str | None = None
    dashboard_password: Secret | None = None
    log_level: str = "INFO"
    log_format: str = "json"
    log_emails: bool = False
    sentry_dsn: Secret | None = None
    port: int = 8000
    # Salesforce (see docs/salesforce.md)
    salesforce_login_url: str = DEFAULT_SALESFORCE_LOGIN_URL
    salesforce_client_id: str | None = None
    salesforce_client_secret: Secret | None = None
    salesforce_username: str | None = None
    salesforce_private_key: Secret | None = None
    salesforce_instance_url: str | None = None
    salesforce_access_token: Secret | None = None
    salesforce_api_version: str = DEFAULT_SALESFORCE_API_VERSION
    salesforce_requests_per_minute: int = 120

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the environment; raise SettingsError naming the first bad variable."""
        env = os.environ if environ is None else environ

        def get(name: str, parse: Callable[[str], T], default: T) -> T:
            raw = env.get(name, "").strip()
            return parse(raw) if raw else default

        def secret(name: str) -> Secret | None:
            raw = env.get(name, "").strip()
            return Secret(raw) if raw else None

        raw_secrets = env.get("INSTRUQT_WEBHOOK_SECRET", "").strip()
        if not raw_secrets:
            raise SettingsError(
                "INSTRUQT_WEBHOOK_SECRET: missing; expected the endpoint's whsec_... signing "
                "secret (several, comma-separated, while rotating)"
            )
        username = env.get("RQ_DASHBOARD_USERNAME", "").strip() or None
        password = secret("RQ_DASHBOARD_PASSWORD")
        if bool(username) != bool(password):
            raise SettingsError(
                "RQ_DASHBOARD_USERNAME: set both RQ_DASHBOARD_USERNAME and RQ_DASHBOARD_PASSWORD, "
                "or neither (no credentials = no dashboard)"
            )
        return cls(
            webhook_secrets=parse_webhook_secrets(raw_secrets),
            redis_url=get("REDIS_URL", _redis_url, None),
            mapping_path=get("MAPPING_PATH", Path, Path("mappings/hubspot.yaml")),
            instruqt_api_key=secret("INSTRUQT_API_KEY"),
            instruqt_graphql_url=get(
                "INSTRUQT_GRAPHQL_URL", _url("INSTRUQT_GRAPHQL_URL"), DEFAULT_INSTRUQT_GRAPHQL_URL
            ),
            hubspot_access_token=secret("HUBSPOT_ACCESS_TOKEN"),
            hubspot_api_base=get(
                "HUBSPOT_API_BASE", _url("HUBSPOT_API_BASE"), DEFAULT_HUBSPOT_API_BASE
            ),
            hubspot_requests_per_10s=get(
                "HUBSPOT_REQUESTS_PER_10S", _number("HUBSPOT_REQUESTS_PER_10S", int, 1), 90
            ),
            flush_window_seconds=get(
                "FLUSH_WINDOW_SECONDS", _number("FLUSH_WINDOW_SECONDS", float, 0), 1.0
            ),
            flush_hold_seconds=get(
                "FLUSH_HOLD_SECONDS", _number("FLUSH_HOLD_SECONDS", float, 0), 4.0
            ),
            flush_lease_seconds=get(
                "FLUSH_LEASE_SECONDS", _number("FLUSH_LEASE_SECONDS", int, 2), 30
            ),
            identity_wait_days=get(
                "IDENTITY_WAIT_DAYS", _number("IDENTITY_WAIT_DAYS", float, 0), 7.0
            ),
            max_body_bytes=get("MAX_BODY_BYTES", _number("MAX_BODY_BYTES", int, 1024), 256 * 1024),
            dedupe_ttl_seconds=get(
                "DEDUPE_TTL_SECONDS",
                _number("DEDUPE_TTL_SECONDS", int, MIN_DEDUPE_SECONDS),
                72 * 3600,
            ),
            dry_run_path=get("DRY_RUN_PATH", Path, Path("var/dry-run.jsonl")),
            dashboard_username=username,
            dashboard_password=password,
            log_level=get("LOG_LEVEL", _log_level, "INFO"),
            log_format=get("LOG_FORMAT", _choice("LOG_FORMAT", ("json", "text")), "json"),
            log_emails=get("LOG_EMAILS", _flag("LOG_EMAILS"), False),
            sentry_dsn=_sentry(secret("SENTRY_DSN")),
            port=get("PORT", _number("PORT", int, 1), 8000),
            **_salesforce(env),  # type: ignore[arg-type]
        )
