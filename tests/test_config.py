"""Settings: defaults, parsing, and one-line errors that name the variable."""

from __future__ import annotations

import pytest

from instruqt_crm.config import Settings, SettingsError
from samples.signing import OTHER_SECRET, SECRET

BASE = {"INSTRUQT_WEBHOOK_SECRET": SECRET}


def test_defaults() -> None:
    settings = Settings.from_env(BASE)
    assert settings.redis_url is None
    assert settings.max_body_bytes == 256 * 1024
    assert settings.dedupe_ttl_seconds == 30 * 3600  # past Svix's last retry (27 h 37 min)
    assert settings.hubspot_requests_per_10s == 90
    assert settings.flush_window_seconds == 1.0
    assert str(settings.mapping_path) == "mappings/hubspot.yaml"
    assert settings.log_format == "auto"  # text on a terminal, JSON otherwise
    assert settings.web_access_log is False  # platform routers log requests


def test_several_secrets_for_rotation() -> None:
    settings = Settings.from_env({"INSTRUQT_WEBHOOK_SECRET": f"{SECRET}, {OTHER_SECRET}"})
    assert [s.get_secret_value() for s in settings.webhook_secrets] == [SECRET, OTHER_SECRET]


@pytest.mark.parametrize(
    ("env", "variable", "expects"),
    [
        ({"INSTRUQT_WEBHOOK_SECRET": "abc"}, "INSTRUQT_WEBHOOK_SECRET", "must start with 'whsec_'"),
        ({"INSTRUQT_WEBHOOK_SECRET": "whsec_!!notbase64"}, "INSTRUQT_WEBHOOK_SECRET", "base64"),
        ({"INSTRUQT_WEBHOOK_SECRET": f"{SECRET},whsec_"}, "INSTRUQT_WEBHOOK_SECRET", "secret #2"),
        ({**BASE, "REDIS_URL": "localhost:6379"}, "REDIS_URL", "redis://"),
        ({**BASE, "MAX_BODY_BYTES": "lots"}, "MAX_BODY_BYTES", "expected an integer"),
        ({**BASE, "MAX_BODY_BYTES": "10"}, "MAX_BODY_BYTES", "at least"),
        ({**BASE, "DEDUPE_TTL_SECONDS": "3600"}, "DEDUPE_TTL_SECONDS", "at least"),
        ({**BASE, "TRACE_MAX_BYTES": "100"}, "TRACE_MAX_BYTES", "at least 512"),
        ({**BASE, "TRACE_RETENTION_DAYS": "0"}, "TRACE_RETENTION_DAYS", "more than 0"),
        ({**BASE, "HUBSPOT_API_BASE": "api.hubapi.com"}, "HUBSPOT_API_BASE", "http"),
        ({**BASE, "FLUSH_WINDOW_SECONDS": "soon"}, "FLUSH_WINDOW_SECONDS", "expected a number"),
        ({**BASE, "FLUSH_HOLD_SECONDS": "-1"}, "FLUSH_HOLD_SECONDS", "at least"),
        ({**BASE, "PORT": "http"}, "PORT", "integer"),
        ({**BASE, "LOG_LEVEL": "LOUD"}, "LOG_LEVEL", "DEBUG"),
        ({**BASE, "RQ_DASHBOARD_USERNAME": "ops"}, "RQ_DASHBOARD_USERNAME", "both"),
        ({**BASE, "LOG_FORMAT": "xml"}, "LOG_FORMAT", "json, text"),
        ({**BASE, "LOG_EMAILS": "maybe"}, "LOG_EMAILS", "true or false"),
        ({**BASE, "WEB_ACCESS_LOG": "maybe"}, "WEB_ACCESS_LOG", "true or false"),
        ({**BASE, "FLUSH_LEASE_SECONDS": "1"}, "FLUSH_LEASE_SECONDS", "at least"),
    ],
)
def test_errors_name_the_variable(env: dict[str, str], variable: str, expects: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert message.startswith(f"{variable}:")
    assert expects in message
    assert "\n" not in message


def test_only_the_receiver_needs_the_webhook_secret() -> None:
    settings = Settings.from_env({})
    assert settings.webhook_secrets == ()
    with pytest.raises(SettingsError) as caught:
        settings.require_webhook_secrets()
    assert str(caught.value).startswith("INSTRUQT_WEBHOOK_SECRET: missing")


def test_blank_values_count_as_unset_and_values_are_stripped() -> None:
    settings = Settings.from_env({**BASE, "PORT": "  ", "LOG_LEVEL": " debug ", "REDIS_URL": ""})
    assert (settings.port, settings.log_level, settings.redis_url) == (8000, "DEBUG", None)


def test_values_given_in_code_win_over_the_environment() -> None:
    settings = Settings.from_env({**BASE, "PORT": "9000"}, port=9100)
    assert settings.port == 9100


def test_secret_values_never_appear_in_repr_or_errors() -> None:
    env = {
        **BASE,
        "HUBSPOT_ACCESS_TOKEN": "pat-na1-supersecret",
        "RQ_DASHBOARD_USERNAME": "ops",
        "RQ_DASHBOARD_PASSWORD": "hunter2-hunter2",
    }
    settings = Settings.from_env(env)
    text = repr(settings)
    for secret in (SECRET, "pat-na1-supersecret", "hunter2-hunter2"):
        assert secret not in text
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"INSTRUQT_WEBHOOK_SECRET": "whsec_!!" + "x" * 10})
    assert "x" * 10 not in str(caught.value)


@pytest.mark.parametrize("password", ["hunter2", "eleven-char", " " * 3 + "short" + " " * 9])
def test_a_dashboard_password_shorter_than_12_characters_stops_start_up(password: str) -> None:
    env = {**BASE, "RQ_DASHBOARD_USERNAME": "ops", "RQ_DASHBOARD_PASSWORD": password}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert message == "RQ_DASHBOARD_PASSWORD: expected at least 12 characters"
    assert password.strip() not in message


def test_a_dashboard_password_of_12_characters_is_taken() -> None:
    env = {**BASE, "RQ_DASHBOARD_USERNAME": "ops", "RQ_DASHBOARD_PASSWORD": "twelve-chars"}
    settings = Settings.from_env(env)
    assert settings.dashboard_password is not None
    assert settings.dashboard_password.get_secret_value() == "twelve-chars"


# --- Salesforce settings ---


@pytest.mark.parametrize(
    ("extra", "variable"),
    [
        ({"SALESFORCE_CLIENT_SECRET": "s"}, "SALESFORCE_CLIENT_ID"),
        ({"SALESFORCE_CLIENT_ID": "id"}, "SALESFORCE_CLIENT_ID"),
        ({"SALESFORCE_CLIENT_ID": "i", "SALESFORCE_USERNAME": "u"}, "SALESFORCE_PRIVATE_KEY"),
        (
            {
                "SALESFORCE_CLIENT_ID": "i",
                "SALESFORCE_USERNAME": "u",
                "SALESFORCE_PRIVATE_KEY": "x",
            },
            "SALESFORCE_PRIVATE_KEY",
        ),
        ({"SALESFORCE_ACCESS_TOKEN": "t"}, "SALESFORCE_ACCESS_TOKEN"),
        ({"SALESFORCE_LOGIN_URL": "login.salesforce.com"}, "SALESFORCE_LOGIN_URL"),
        ({"SALESFORCE_API_VERSION": "62"}, "SALESFORCE_API_VERSION"),
        ({"SALESFORCE_REQUESTS_PER_MINUTE": "0"}, "SALESFORCE_REQUESTS_PER_MINUTE"),
    ],
)
def test_salesforce_settings_errors_name_the_variable(extra: dict, variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"INSTRUQT_WEBHOOK_SECRET": SECRET, **extra})
    assert str(caught.value).startswith(variable)
    assert "s3cret" not in str(caught.value)


def test_only_the_documented_variables_are_read() -> None:
    """Field names and other spellings are not settings: a stray variable changes nothing."""
    stray = {"DASHBOARD_USERNAME": "x", "DASHBOARD_PASSWORD": "y", "redis_url": "redis://h"}
    settings = Settings.from_env(stray)
    assert (settings.dashboard_username, settings.redis_url) == (None, None)
    with pytest.raises(TypeError):
        Settings.from_env({}, prot=1)  # a misspelt field in code is an error, not ignored


def test_lookups_need_the_team_but_the_receiver_does_not() -> None:
    settings = Settings.from_env({**BASE, "INSTRUQT_API_KEY": "iq-key"})  # the web process
    with pytest.raises(SettingsError) as caught:
        settings.require_lookup_team()  # the worker and the release
    assert str(caught.value).startswith("INSTRUQT_TEAM_SLUG: needed with INSTRUQT_API_KEY")
    Settings.from_env(
        {**BASE, "INSTRUQT_API_KEY": "k", "INSTRUQT_TEAM_SLUG": "acme"}
    ).require_lookup_team()


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("fifteen-chars-x", "METRICS_TOKEN: expected at least 16 characters"),
        ("two words-of-a-long-token", "METRICS_TOKEN: expected a bearer token: letters, "
         "digits and -._~+/ (no spaces)"),
        ('quote"in-a-long-token', "METRICS_TOKEN: expected a bearer token: letters, digits "
         "and -._~+/ (no spaces)"),
    ],
)  # fmt: skip
def test_a_metrics_token_that_cannot_be_a_bearer_token_stops_start_up(
    token: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**BASE, "METRICS_TOKEN": token})
    assert str(caught.value) == expected  # never the token itself


def test_a_metrics_token_is_optional_and_kept_secret() -> None:
    assert Settings.from_env(BASE).metrics_token is None  # /metrics is open
    settings = Settings.from_env({**BASE, "METRICS_TOKEN": "abcDEF0123456789+/=="})
    assert settings.metrics_token is not None
    assert settings.metrics_token.get_secret_value() == "abcDEF0123456789+/=="
    assert "abcDEF" not in repr(settings)
