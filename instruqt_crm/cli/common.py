"""Shared by the commands: settings, Redis, mapping loading, the CRM adapter, output options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import click
import redis

from instruqt_crm.config import DEFAULT_MAPPING_PATH, Settings, SettingsError
from instruqt_crm.crm.adapters import adapter_name, build_adapter
from instruqt_crm.crm.base import CrmAdapter
from instruqt_crm.engine.queueing import EmbeddedRedis, connect, unreachable
from instruqt_crm.mapping import Mapping, MappingError, load_mapping

DEFAULT_URL = "http://127.0.0.1:8000/webhooks/instruqt"
LOCAL_REDIS = Path("var/redis")  # the embedded Redis `dev` uses when REDIS_URL is unset


class SettingProblem(click.ClickException):
    """A setting is missing or malformed: one line naming it (no usage text), exit 2."""

    exit_code = 2


def settings_error(exc: SettingsError) -> NoReturn:
    """Stop with a setting's one-line error (exit 2, as for wrong usage)."""
    raise SettingProblem(str(exc)) from None


def settings_or_exit() -> Settings:
    """Settings from the environment, or exit 2 naming the bad variable."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        settings_error(exc)


def webhook_secret_or_exit(settings: Settings) -> str:
    """The first webhook secret (commands that sign), or exit 2 saying it is missing."""
    try:
        return settings.require_webhook_secrets()[0].get_secret_value()
    except SettingsError as exc:
        settings_error(exc)


def redis_for(settings: Settings) -> redis.Redis:
    """The Redis at REDIS_URL (else the local embedded one `dev` uses); exit 1 if unreachable."""
    if settings.redis_url is None:
        conn: redis.Redis = EmbeddedRedis(LOCAL_REDIS).server
    else:
        conn = connect(settings)
    try:
        conn.ping()
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot reach Redis: {unreachable(exc)}") from None
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


def checked_mapping(path: str | Path) -> Mapping:
    """The mapping, validated as `check` reports it: its warnings, then one ``ok`` line naming
    what it maps; on problems each ``file:line: key: message`` and exit 1."""
    mapping = load_mapping_or_exit(path, err=False)
    for warning in mapping.warnings:
        click.echo(f"{warning} (warning)")
    click.echo(
        f"{path}: ok ({mapping.crm} {mapping.object}, "
        f"{len(mapping.properties)} properties, {len(mapping.events)} rules)"
    )
    return mapping


def crm_adapter(settings: Settings, mapping: Mapping) -> CrmAdapter | None:
    """The CRM adapter for one-off checks and setup (no Redis, no shared budget, 3 attempts),
    or None when the mapping's CRM has no credentials (a dry run has nothing to check)."""
    if adapter_name(settings, mapping) == "dry-run":
        return None
    return build_adapter(settings, mapping, None, attempts=3)


def print_json(data: object) -> None:
    """Pretty JSON on stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


mapping_option = click.option(
    "--mapping",
    "mapping_path",
    type=click.Path(exists=True, dir_okay=False),
    envvar="MAPPING_PATH",
    default=str(DEFAULT_MAPPING_PATH),
    show_default=True,
    show_envvar=True,
    help="The mapping file.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def optional_mapping(settings: Settings) -> Mapping | None:
    """The mapping at MAPPING_PATH, or None (with a warning) when it cannot be loaded."""
    try:
        return load_mapping(settings.mapping_path)
    except MappingError as exc:
        click.echo(
            f"warning: values shown raw, the mapping is unusable: {exc.problems[0]}",
            err=True,
        )
        return None
