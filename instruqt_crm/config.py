"""Settings from the environment (pydantic-settings): read once, typed, one-line errors.

Every setting is a field named for its variable; a missing or malformed one stops start-up
with ``SettingsError``, one line that names the variable and what it expects. Secrets are
``SecretStr``: they never show in reprs, logs or errors. The webhook secret is needed by
the web process only (``require_webhook_secrets``).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_INSTRUQT_GRAPHQL_URL = "https://play.instruqt.com/graphql"
DEFAULT_HUBSPOT_API_BASE = "https://api.hubapi.com"
DEFAULT_HUBSPOT_DAILY_WARN_PERCENT = 80.0
DEFAULT_SALESFORCE_LOGIN_URL = "https://login.salesforce.com"
DEFAULT_SALESFORCE_API_VERSION = "62.0"
DEFAULT_MAPPING_PATH = Path("mappings/hubspot.yaml")
MIN_DEDUPE_SECONDS = 99_000  # Svix retries for about 27.5 hours
MIN_DASHBOARD_PASSWORD = 12  # characters; the dashboard can requeue and delete jobs
MIN_METRICS_TOKEN = 16  # characters
BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 b64token
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("settings_environ", default=None)


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def parse_webhook_secrets(value: Any) -> tuple[SecretStr, ...]:
    """Comma-separated ``whsec_`` secrets (or a sequence of them), each checked to be base64."""
    items = value.split(",") if isinstance(value, str) else list(value)
    secrets = []
    for position, item in enumerate(items, start=1):
        raw = (item.get_secret_value() if isinstance(item, SecretStr) else str(item)).strip()
        if not raw:
            continue
        if not raw.startswith("whsec_"):
            raise ValueError(
                f"secret #{position} must start with 'whsec_' "
                "(copy it from the endpoint's Signing Secret in Instruqt)"
            )
        try:
            key = base64.b64decode(raw[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not key:
            raise ValueError(f"secret #{position} is not valid base64 after 'whsec_'")
        secrets.append(SecretStr(raw))
    if isinstance(value, str) and not secrets:
        raise ValueError("expected one or more whsec_... secrets")
    return tuple(secrets)


class _Environment(EnvSettingsSource):
    """The process environment, or the mapping given to ``Settings.from_env``: variables by
    their exact names, values stripped, an empty value counting as unset."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls, case_sensitive=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name: value.strip() for name, value in self._environ.items() if value.strip()}


def _env(name: str, default: Any = None, **checks: Any) -> Any:
    """A field read from the variable ``name``."""
    return Field(default, validation_alias=name, **checks)


class Settings(BaseSettings):
    """Every setting the service reads, typed; build with ``Settings.from_env()``."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    webhook_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = _env(
        "INSTRUQT_WEBHOOK_SECRET", ()
    )
    redis_url: str | None = _env("REDIS_URL")
    redis_tls_verify: bool = _env("REDIS_TLS_VERIFY", True)
    redis_tls_ca_file: Path | None = _env("REDIS_TLS_CA_FILE")
    mapping_path: Path = _env("MAPPING_PATH", DEFAULT_MAPPING_PATH)
    instruqt_api_key: SecretStr | None = _env("INSTRUQT_API_KEY")
    instruqt_team_slug: str | None = _env("INSTRUQT_TEAM_SLUG")
    instruqt_graphql_url: str = _env("INSTRUQT_GRAPHQL_URL", DEFAULT_INSTRUQT_GRAPHQL_URL)
    hubspot_access_token: SecretStr | None = _env("HUBSPOT_ACCESS_TOKEN")
    hubspot_api_base: str = _env("HUBSPOT_API_BASE", DEFAULT_HUBSPOT_API_BASE)
    hubspot_requests_per_10s: int = _env("HUBSPOT_REQUESTS_PER_10S", 90, ge=1)
    hubspot_daily_warn_percent: float = _env(
        "HUBSPOT_DAILY_WARN_PERCENT", DEFAULT_HUBSPOT_DAILY_WARN_PERCENT, ge=1, le=100
    )
    flush_window_seconds: float = _env("FLUSH_WINDOW_SECONDS", 1.0, ge=0)
    flush_hold_seconds: float = _env("FLUSH_HOLD_SECONDS", 4.0, ge=0)
    flush_lease_seconds: int = _env("FLUSH_LEASE_SECONDS", 30, ge=2)
    identity_wait_days: float = _env("IDENTITY_WAIT_DAYS", 7.0, ge=0)
    state_idle_days: float = _env("STATE_IDLE_DAYS", 180.0, ge=0)  # 0: keep state for ever
    max_body_bytes: int = _env("MAX_BODY_BYTES", 256 * 1024, ge=1024)
    body_read_seconds: float = _env("BODY_READ_SECONDS", 10.0, gt=0)  # a body that stalls
    dedupe_ttl_seconds: int = _env("DEDUPE_TTL_SECONDS", 30 * 3600, ge=MIN_DEDUPE_SECONDS)
    trace_max_entries: int = _env("TRACE_MAX_ENTRIES", 50, ge=1)
    trace_max_bytes: int = _env("TRACE_MAX_BYTES", 1024, ge=512)
    trace_retention_days: float = _env("TRACE_RETENTION_DAYS", 7.0, gt=0)
    dry_run_path: Path = _env("DRY_RUN_PATH", Path("var/dry-run.jsonl"))
    dashboard_username: str | None = _env("RQ_DASHBOARD_USERNAME")
    dashboard_password: SecretStr | None = _env("RQ_DASHBOARD_PASSWORD")
    metrics_token: SecretStr | None = _env("METRICS_TOKEN")  # unset: /metrics is open
    log_level: str = _env("LOG_LEVEL", "INFO")
    log_format: Literal["auto", "json", "text"] = _env("LOG_FORMAT", "auto")  # auto: text on a tty
    log_emails: bool = _env("LOG_EMAILS", False)
    web_access_log: bool = _env("WEB_ACCESS_LOG", False)  # platform routers log requests already
    sentry_dsn: SecretStr | None = _env("SENTRY_DSN")
    port: int = _env("PORT", 8000, ge=1)
    salesforce_login_url: str = _env("SALESFORCE_LOGIN_URL", DEFAULT_SALESFORCE_LOGIN_URL)
    salesforce_client_id: str | None = _env("SALESFORCE_CLIENT_ID")
    salesforce_client_secret: SecretStr | None = _env("SALESFORCE_CLIENT_SECRET")
    salesforce_username: str | None = _env("SALESFORCE_USERNAME")
    salesforce_private_key: SecretStr | None = _env("SALESFORCE_PRIVATE_KEY")
    salesforce_instance_url: str | None = _env("SALESFORCE_INSTANCE_URL")
    salesforce_access_token: SecretStr | None = _env("SALESFORCE_ACCESS_TOKEN")
    salesforce_api_version: str = _env("SALESFORCE_API_VERSION", DEFAULT_SALESFORCE_API_VERSION)
    salesforce_requests_per_minute: int = _env("SALESFORCE_REQUESTS_PER_MINUTE", 120, ge=1)
    salesforce_allow_duplicate_save: bool = _env("SALESFORCE_ALLOW_DUPLICATE_SAVE", True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Values given in code first, then the environment (see ``from_env``)."""
        environ = _ENVIRON.get()
        return init_settings, _Environment(settings_cls, os.environ if environ is None else environ)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **values: Any) -> Settings:
        """Read and validate the environment (``environ``, default the process's); ``values``
        (by field name) take precedence. SettingsError names the first bad variable."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise TypeError(f"Settings has no field {unknown[0]!r}")
        by_variable = {
            str(cls.model_fields[name].validation_alias): v for name, v in values.items()
        }
        token = _ENVIRON.set(environ)
        try:
            return cls(**by_variable)
        except ValidationError as exc:
            raise SettingsError(_one_line(cls, exc.errors()[0])) from None
        finally:
            _ENVIRON.reset(token)

    @property
    def state_idle_seconds(self) -> int:
        """How long a learner's ledger state outlives their last event (0: for ever)."""
        return round(self.state_idle_days * 86400)

    def require_webhook_secrets(self) -> tuple[SecretStr, ...]:
        """The webhook secrets, which the receiver cannot run without."""
        if not self.webhook_secrets:
            raise SettingsError(
                "INSTRUQT_WEBHOOK_SECRET: missing; expected the endpoint's whsec_... signing "
                "secret (several, comma-separated, while rotating)"
            )
        return self.webhook_secrets

    def require_lookup_team(self) -> None:
        """The worker looks learners up only with the team's slug beside the API key."""
        if self.instruqt_api_key is not None and not self.instruqt_team_slug:
            raise SettingsError(
                "INSTRUQT_TEAM_SLUG: needed with INSTRUQT_API_KEY: your team's slug, whose "
                "invite details (the email a learner gave the team) are asked first"
            )

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _secrets(cls, value: Any) -> tuple[SecretStr, ...]:
        return parse_webhook_secrets(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            where = value.split("@")[-1]  # never the password
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {where!r}")
        return value

    @field_validator("redis_tls_ca_file")
    @classmethod
    def _ca_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"expected a CA bundle (PEM file), no such file: {str(value)!r}")
        return value

    @field_validator("instruqt_graphql_url", "hubspot_api_base", "salesforce_login_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _http(value)

    @field_validator("salesforce_instance_url")
    @classmethod
    def _instance_url(cls, value: str | None) -> str | None:
        return None if value is None else _http(value)

    @field_validator("dashboard_password")
    @classmethod
    def _dashboard_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_DASHBOARD_PASSWORD:
            raise ValueError(f"expected at least {MIN_DASHBOARD_PASSWORD} characters")
        return value

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token(cls, value: SecretStr | None) -> SecretStr | None:
        token = value.get_secret_value() if value is not None else None
        if token is not None and not BEARER_TOKEN.fullmatch(token):
            raise ValueError("expected a bearer token: letters, digits and -._~+/ (no spaces)")
        if token is not None and len(token) < MIN_METRICS_TOKEN:
            raise ValueError(f"expected at least {MIN_METRICS_TOKEN} characters")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {value!r}")
        return value.upper()

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("sentry_dsn")
    @classmethod
    def _sentry(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                import sentry_sdk  # noqa: F401  only its presence is checked here
            except ImportError:
                raise ValueError(
                    "set, but sentry-sdk is not installed (pip install 'instruqt-crm[sentry]')"
                ) from None
        return value

    @field_validator("salesforce_api_version")
    @classmethod
    def _api_version(cls, value: str) -> str:
        version = value.removeprefix("v")
        if not re.fullmatch(r"\d{2,3}\.0", version):
            raise ValueError(f"expected a version like 62.0, got {value!r}")
        return version

    @field_validator("salesforce_private_key", mode="before")
    @classmethod
    def _private_key(cls, value: Any) -> Any:
        """PEM text (``\\n`` escapes allowed) or the path of a PEM file."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(raw, str):
            return value
        text = raw.replace("\\n", "\n")
        if "-----BEGIN" not in text:
            path = Path(raw).expanduser()
            if not path.is_file():
                raise ValueError(
                    "expected PEM text (-----BEGIN ... PRIVATE KEY-----) "
                    "or the path of a PEM file; no such file"
                )
            text = path.read_text()
        if "PRIVATE KEY-----" not in text:
            raise ValueError("expected a PEM private key")
        return text

    @model_validator(mode="after")
    def _pairs(self) -> Settings:
        """Settings that only work together."""
        if self.redis_tls_ca_file is not None and not self.redis_tls_verify:
            raise ValueError(
                "REDIS_TLS_CA_FILE: set, but REDIS_TLS_VERIFY is false: the certificate would "
                "not be checked against it (unset one of them)"
            )
        if bool(self.dashboard_username) != bool(self.dashboard_password):
            raise ValueError(
                "RQ_DASHBOARD_USERNAME: set both RQ_DASHBOARD_USERNAME and "
                "RQ_DASHBOARD_PASSWORD, or neither (no credentials = no dashboard)"
            )
        client_id, secret = self.salesforce_client_id, self.salesforce_client_secret
        username, key = self.salesforce_username, self.salesforce_private_key
        if (username or key) and not (client_id and username and key):
            raise ValueError(
                "SALESFORCE_PRIVATE_KEY: the JWT flow needs SALESFORCE_CLIENT_ID, "
                "SALESFORCE_USERNAME and SALESFORCE_PRIVATE_KEY together"
            )
        if secret and not client_id:
            raise ValueError("SALESFORCE_CLIENT_ID: needed with SALESFORCE_CLIENT_SECRET")
        if client_id and not (secret or key):
            raise ValueError(
                "SALESFORCE_CLIENT_ID: set SALESFORCE_CLIENT_SECRET (client credentials) or "
                "SALESFORCE_USERNAME + SALESFORCE_PRIVATE_KEY (JWT bearer) with it"
            )
        session = (self.salesforce_access_token, self.salesforce_instance_url)
        if bool(session[0]) != bool(session[1]) and not client_id:
            raise ValueError(
                "SALESFORCE_ACCESS_TOKEN: set both SALESFORCE_INSTANCE_URL and "
                "SALESFORCE_ACCESS_TOKEN (or a login flow instead)"
            )
        return self


def _http(value: str) -> str:
    """An http(s) URL without its trailing slash."""
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


def _one_line(cls: type[Settings], error: ErrorDetails) -> str:
    """``VARIABLE: what it expects`` for the first validation error."""
    context = error.get("ctx") or {}
    if error["type"] == "value_error":
        message = str(context.get("error", error["msg"]))
    elif error["type"] == "greater_than_equal":
        message = f"expected at least {context.get('ge')}, got {error['input']!r}"
    elif error["type"] == "greater_than":
        message = f"expected more than {context.get('gt')}, got {error['input']!r}"
    elif error["type"] in ("less_than_equal", "less_than"):
        bound = context.get("le", context.get("lt"))
        message = f"expected at most {bound}, got {error['input']!r}"
    elif error["type"] == "int_parsing":
        message = f"expected an integer, got {error['input']!r}"
    elif error["type"] == "float_parsing":
        message = f"expected a number, got {error['input']!r}"
    elif error["type"] == "bool_parsing":
        message = f"expected true or false, got {error['input']!r}"
    elif error["type"] == "literal_error":
        expected = str(context.get("expected", "")).replace("'", "").replace(" or ", ", ")
        message = f"expected one of {expected}, got {error['input']!r}"
    else:
        message = error["msg"]
    if not error["loc"]:  # a check of several settings: its message names the variable
        return message
    field = cls.model_fields.get(str(error["loc"][0]))
    name = field.validation_alias if field is not None else error["loc"][0]
    return f"{name}: {message}"
