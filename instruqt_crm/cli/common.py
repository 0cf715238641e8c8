"""Shared by the commands: settings, Redis, mapping loading, output options."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
import redis

from ..config import DEFAULT_HUBSPOT_API_BASE, Settings, SettingsError
from ..mapping import Mapping, MappingError, load_mapping
from ..queueing import EmbeddedRedis, connect

if TYPE_CHECKING:
    from ..crm.hubspot import HubSpotAdapter

DEFAULT_URL = "http://127.0.0.1:8000/webhooks/instruqt"
DEFAULT_MAPPING = "mappings/hubspot.yaml"
LOCAL_REDIS = Path("var/redis")  # the embedded Redis `dev` uses when REDIS_URL is unset
UNUSED_SECRET = "whsec_" + base64.b64encode(b"not used by this command").decode()


def settings_or_exit(need_secret: bool = True) -> Settings:
    """Settings from the environment (the webhook secret only if needed), or exit 2."""
    env = dict(os.environ)
    if not need_secret:
        env["INSTRUQT_WEBHOOK_SECRET"] = UNUSED_SECRET
    try:
        return Settings.from_env(env)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


def redis_for(settings: Settings) -> redis.Redis:
    """The Redis at REDIS_URL (else the local embedded one `dev` uses); exit 1 if unreachable."""
    if settings.redis_url is None:
        conn: redis.Redis = EmbeddedRedis(LOCAL_REDIS).server
    else:
        conn = connect(settings.redis_url)
    try:
        conn.ping()
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot reach Redis: {exc}") from None
    return conn


def load_mapping_or_exit(path: str | Path, err: bool = True) -> Mapping:
    """The mapping; on problems print each ``file:line: key: message`` and exit 1."""
    try:
        return load_mapping(path)
    except MappingError as exc:
        for problem in exc.problems:
            click.echo(problem, err=err)
        click.echo(f"{path}: invalid mapping ({len(exc.problems)} problem(s))", err=True)
        raise click.exceptions.Exit(1) from None


def print_json(data: object) -> None:
    """Pretty JSON on stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


mapping_option = click.option(
    "--mapping",
    "mapping_path",
    type=click.Path(exists=True, dir_okay=False),
    envvar="MAPPING_PATH",
    default=DEFAULT_MAPPING,
    show_default=True,
    show_envvar=True,
    help="The mapping file.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def hubspot_adapter(token: str) -> HubSpotAdapter:
    """A HubSpot client for provisioning and checks (HUBSPOT_API_BASE read directly)."""
    from ..crm.hubspot import HubSpotAdapter

    base = os.environ.get("HUBSPOT_API_BASE", "").strip() or DEFAULT_HUBSPOT_API_BASE
    if not base.startswith(("http://", "https://")):
        raise click.UsageError(
            f"HUBSPOT_API_BASE: expected an http:// or https:// URL, got {base!r}"
        )
    return HubSpotAdapter(token, base.rstrip("/"), attempts=3)


def optional_mapping() -> Mapping | None:
    """The mapping at MAPPING_PATH, or None (with a warning) when it cannot be loaded."""
    path = os.environ.get("MAPPING_PATH", "").strip() or DEFAULT_MAPPING
    try:
        return load_mapping(path)
    except MappingError as exc:
        click.echo(
            f"warning: values shown raw, the mapping is unusable: {exc.problems[0]}", err=True
        )
        return None
