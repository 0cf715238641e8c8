"""`release`: the Procfile's release phase. A deploy goes live only when everything it needs
is there: a valid mapping, valid settings, a Redis that answers, and the CRM's properties.

Each step prints one summary line (and, when it fails, the lines that say why); the last line
says whether the release passed. Steps that need an earlier one (Redis and the CRM need the
settings, the CRM needs the mapping) are skipped when it failed, and HubSpot properties are
only created when every earlier step passed: a release that fails changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click
import redis

from instruqt_crm.config import Settings, SettingsError
from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.engine import ledger, memory
from instruqt_crm.engine.queueing import connect, unreachable
from instruqt_crm.mapping import Mapping

from .common import checked_mapping, crm_adapter, mapping_option
from .crm_checks import (
    HubSpotProperties,
    check_salesforce,
    create_missing,
    fail_on_mismatches,
    hubspot_properties,
    lacks,
)
from .mapping_commands import stored_value_lines

T = TypeVar("T")


def run_step(results: dict[str, int], name: str, step: Callable[[], T]) -> T | None:
    """Run one step, recording its exit code under ``name`` (0: passed); its value, or None
    when it failed (its lines printed: a one-line error, or what was checked and failed)."""
    try:
        value = step()
    except click.exceptions.Exit as exc:  # what was checked failed; its lines are printed
        results[name] = exc.exit_code or 1
        return None
    except click.ClickException as exc:  # one line; a UsageError (a setting) exits 2
        click.echo(exc.format_message())
        results[name] = exc.exit_code
        return None
    results[name] = 0
    return value


def valid_settings() -> Settings:
    """Every setting as the worker and the web process read them (the webhook secret too:
    the web process refuses to start without it)."""
    try:
        settings = Settings.from_env()
        settings.require_webhook_secrets()
        settings.require_lookup_team()
    except SettingsError as exc:
        raise click.UsageError(f"settings: {exc}") from None
    click.echo("settings: ok")
    return settings


def redis_location(url: str) -> str:
    """The URL without its credentials, to name the server in a line."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"


def redis_answers(settings: Settings) -> None:
    """Redis at REDIS_URL answers (with the TLS settings the processes use) and its eviction
    policy cannot drop queued events or state; how full it is."""
    if settings.redis_url is None:
        raise click.UsageError(
            "Redis: REDIS_URL is not set: a deployment needs REDIS_URL (the platform's Redis "
            "add-on sets it); the embedded Redis is for local use only"
        )
    where = redis_location(settings.redis_url)
    try:
        conn = connect(settings)
    except ValueError as exc:  # a URL redis-py cannot parse
        raise click.UsageError(f"Redis: REDIS_URL is not usable ({where}): {exc}") from None
    try:
        conn.ping()
        found = memory.read(conn)
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis: cannot reach {where}: {unreachable(exc)}") from None
    finally:
        conn.close()
    if refusal := found.refusal():
        raise click.ClickException(f"Redis: {refusal}")
    click.echo(f"Redis: ok ({where} answers; {found.summary()})")
    if warning := found.warning():
        click.echo(f"Redis: warning: {warning}")


def crm_ready(settings: Settings, mapping: Mapping, create: bool) -> None:
    """The CRM has what the mapping writes: HubSpot properties are created when missing (with
    ``create``), Salesforce fields are reported; without credentials, a dry run passes."""
    adapter = crm_adapter(settings, mapping)
    if adapter is None:
        needs = "HUBSPOT_ACCESS_TOKEN" if mapping.crm == "hubspot" else "SALESFORCE_* credentials"
        click.echo(
            f"{crm_name(mapping)}: not checked, dry run (no {needs}: the worker writes what "
            f"it would send to {settings.dry_run_path})"
        )
        return
    if not isinstance(adapter, HubSpotAdapter):
        check_salesforce(mapping, adapter)
        return
    found = hubspot_properties(adapter, mapping, create=False)
    fail_on_mismatches(found.steps)  # before anything is created: a failed release changes nothing
    if create and found.missing:
        found = create_missing(adapter, mapping, found.steps)
    for line in hubspot_lines(found, len(mapping.properties)):
        click.echo(line)
    if found.missing:
        raise click.exceptions.Exit(1)


def crm_name(mapping: Mapping) -> str:
    """The mapping's CRM as its maker spells it."""
    return "Salesforce" if mapping.crm == "salesforce" else "HubSpot"


def hubspot_lines(found: HubSpotProperties, mapped: int) -> list[str]:
    """What the HubSpot step did, in a line (two when properties are missing)."""
    if found.missing:  # not created: an earlier step failed
        return [
            lacks(found.missing),
            "Not created, as the release fails: they are created by the release that passes "
            "(or now with: instruqt-crm setup hubspot)",
        ]
    made = [f"the {hubspot_setup.GROUP} group"] if found.created_group else []
    if found.created:
        count = len(found.created)
        made.append(f"{count} propert{'y' if count == 1 else 'ies'}: {', '.join(found.created)}")
    if made:
        return [f"HubSpot: created {' and '.join(made)}"]
    return [f"HubSpot: every mapped property exists ({mapped}), nothing created"]


def converted_state(settings: Settings) -> None:
    """Learners' state an earlier version kept (one hash per contact) rewritten packed."""
    conn = connect(settings)
    try:
        count = ledger.migrate(conn, settings.state_idle_seconds)
    except redis.RedisError as exc:
        raise click.ClickException(f"Learner state: not converted: {unreachable(exc)}") from None
    finally:
        conn.close()
    found = f"{count} learner(s) converted to the packed form" if count else "nothing to convert"
    click.echo(f"Learner state: ok ({found})")


@click.command(
    short_help="The release phase: mapping, settings, Redis, CRM properties, learner state."
)
@mapping_option
def release(mapping_path: str) -> None:
    """Check that a deploy can run before it goes live (the Procfile's release phase): the
    mapping, every setting, that Redis answers, and the CRM. With HUBSPOT_ACCESS_TOKEN the
    missing mapped properties are created (as `setup hubspot` does; existing ones are never
    changed); with SALESFORCE_* credentials missing fields are reported. Then learners' state
    an earlier version kept is rewritten in the packed form. Exit 0 when every
    step passed, 1 when one failed, 2 when a setting is missing or malformed."""
    results: dict[str, int] = {}
    mapping = run_step(results, "mapping", lambda: checked_mapping(mapping_path))
    settings = run_step(results, "settings", valid_settings)
    if settings is None:
        click.echo("Redis: not checked (the settings are not valid)")
    else:
        run_step(results, "Redis", lambda: redis_answers(settings))
        if mapping is not None and results["Redis"] == 0:  # warnings: they fail nothing
            for line in stored_value_lines(mapping, warnings_only=True):
                click.echo(line)
    if settings is None or mapping is None:
        click.echo("CRM: not checked (the mapping or the settings are not valid)")
    else:
        passed = not any(results.values())  # a release that fails creates nothing
        run_step(results, crm_name(mapping), lambda: crm_ready(settings, mapping, passed))
        if not any(results.values()):
            run_step(results, "learner state", lambda: converted_state(settings))
    failed = [name for name, code in results.items() if code]
    if not failed:
        click.echo(f"release: ok ({', '.join(results)})")
        return
    click.echo(f"release: failed ({', '.join(failed)})", err=True)
    raise click.exceptions.Exit(max(results.values()))
