"""Mapping commands: `check`, `preview`, and `setup` (create the mapped CRM properties)."""

from __future__ import annotations

from pathlib import Path

import click
import redis

from instruqt_crm.config import DEFAULT_MAPPING_PATH, Settings, SettingsError
from instruqt_crm.crm import hubspot_setup, salesforce_setup
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.crm.salesforce import SalesforceAdapter
from instruqt_crm.engine import mapping_record
from instruqt_crm.engine.queueing import connect, unreachable
from instruqt_crm.errors import SyncError
from instruqt_crm.mapping import Mapping
from instruqt_crm.ops import preview

from .common import (
    SettingProblem,
    checked_mapping,
    crm_adapter,
    json_option,
    load_mapping_or_exit,
    mapping_option,
    print_json,
    settings_or_exit,
)
from .crm_checks import assign, check_salesforce, fail_on_mismatches, hubspot_properties, lacks


@click.command(short_help="Validate a mapping and the CRM's properties.")
@click.argument(
    "mapping_path",
    metavar="[MAPPING]",
    required=False,
    type=click.Path(exists=True, dir_okay=False),
    envvar="MAPPING_PATH",
    default=str(DEFAULT_MAPPING_PATH),
)
@click.option(
    "--crm/--no-crm",
    "check_crm",
    default=True,
    show_default=True,
    help="Also check that the CRM has every mapped property (when its token is set).",
)
def check(mapping_path: str, check_crm: bool) -> None:
    """Validate a mapping (default: MAPPING_PATH), compare it with what the stored values were
    merged under (at REDIS_URL), and check the CRM's properties; exit 1 if not ok."""
    mapping = checked_mapping(mapping_path)
    for line in stored_value_lines(mapping):
        click.echo(line)
    if not check_crm:
        return
    adapter = crm_adapter(settings_or_exit(), mapping)
    if mapping.crm == "salesforce":
        check_salesforce(mapping, adapter)
        return
    if not isinstance(adapter, HubSpotAdapter):
        click.echo("HubSpot: properties not checked (HUBSPOT_ACCESS_TOKEN is not set)")
        return
    found = hubspot_properties(adapter, mapping, create=False)
    if found.missing:
        click.echo(lacks(found.missing))
        click.echo("Create them with: instruqt-crm setup hubspot")
    fail_on_mismatches(found.steps)  # reported with the missing ones, as setup --dry-run does
    if found.missing:
        raise click.exceptions.Exit(1)
    click.echo(f"HubSpot: every mapped property exists ({len(mapping.properties)})")


def stored_value_lines(mapping: Mapping, warnings_only: bool = False) -> list[str]:
    """What check says about the values stored in Redis (REDIS_URL): for each property whose
    merge policy or type the mapping changes, a warning saying what happens to its values
    (with ``warnings_only``, nothing else: not why they could not be compared)."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        said = [f"stored values: not compared ({exc})"]
    else:
        said = _compared(settings, mapping)
    return [line for line in said if line.endswith("(warning)") or not warnings_only]


def _compared(settings: Settings, mapping: Mapping) -> list[str]:
    """The stored-values lines, once the settings are read."""
    if settings.redis_url is None:
        return ["stored values: not compared (REDIS_URL is not set)"]
    conn = connect(settings)
    try:
        changes = mapping_record.stored_value_changes(conn, mapping)
    except redis.RedisError as exc:
        return [f"stored values: not compared (Redis: {unreachable(exc)})"]
    finally:
        conn.close()
    if not changes:
        return ["stored values: no property's merge policy or type changes"]
    return [f"stored values: {line} (warning)" for line in changes]


@click.command("preview", short_help="Show what events would write (no Redis, no CRM).")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@mapping_option
@click.option("--email", default=None, help="Email for events whose own parameters have none.")
@json_option
def preview_command(
    files: tuple[Path, ...], mapping_path: str, email: str | None, as_json: bool
) -> None:
    """Show what events would write to the CRM (no Redis, no CRM); exit 1 if any failed."""
    mapping = load_mapping_or_exit(mapping_path)
    try:
        items = [item for path in files for item in preview.read_items(path)]
    except preview.EventFileError as exc:
        raise click.ClickException(str(exc)) from None
    result = preview.preview(mapping, items, email)
    if as_json:
        print_json(result.as_dict(mapping))
    else:
        for line in preview.render(result, mapping):
            click.echo(line)
    if result.failed:
        raise click.exceptions.Exit(1)


@click.group(short_help="Create the mapped properties in the CRM.")
def setup() -> None:
    """Create the properties a mapping writes in the CRM."""


@setup.command("hubspot")
@mapping_option
@click.option("--dry-run", is_flag=True, help="Only say what would be created.")
def setup_hubspot(mapping_path: str, dry_run: bool) -> None:
    """Create the instruqt group and every mapped contact property; exit 1 on type mismatches."""
    settings = settings_or_exit()
    if settings.hubspot_access_token is None:
        raise SettingProblem(
            "HUBSPOT_ACCESS_TOKEN is not set: export the access token of a HubSpot private app "
            "with the crm.schemas.contacts.read and crm.schemas.contacts.write scopes"
        )
    mapping = load_mapping_or_exit(mapping_path)
    if mapping.crm != "hubspot":
        raise click.UsageError(f"{mapping_path} is a {mapping.crm} mapping, not a HubSpot one")
    adapter = crm_adapter(settings, mapping)
    assert isinstance(adapter, HubSpotAdapter)  # a HubSpot mapping with a token
    result = hubspot_properties(adapter, mapping, create=not dry_run)
    steps = result.steps
    verb = "would create" if dry_run else "created"
    group = f"{verb} group" if steps.create_group else "group exists"
    click.echo(f"{hubspot_setup.GROUP}: {group}")
    click.echo(f"exist ({len(steps.existing)}): {', '.join(steps.existing) or '-'}")
    names = steps.create if dry_run else result.created
    click.echo(f"{verb} ({len(names)}): {', '.join(names) or '-'}")
    fail_on_mismatches(steps)


@setup.command("salesforce")
@mapping_option
@click.option(
    "--out",
    "out",
    default="salesforce-metadata",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the sfdx project.",
)
@click.option(
    "--dry-run", is_flag=True, help="Only list what would be written (and missing fields)."
)
@click.option("--deploy", is_flag=True, help="Also deploy it through the Metadata API.")
@click.option("--sandbox", is_flag=True, help="The org is a sandbox (deploy options).")
@click.option(
    "--assign-to",
    "assign_to",
    metavar="USERNAME",
    default=None,
    help="Assign the permission set to this user (with --deploy, by default to the user of "
    "the SALESFORCE_* credentials).",
)
def setup_salesforce(
    mapping_path: str,
    out: Path,
    dry_run: bool,
    deploy: bool,
    sandbox: bool,
    assign_to: str | None,
) -> None:
    """Write the custom fields + permission set as an sfdx project; optionally deploy them and
    assign the permission set."""
    mapping = load_mapping_or_exit(mapping_path)
    if mapping.crm != "salesforce":
        raise click.UsageError(f"{mapping_path} is a {mapping.crm} mapping, not a Salesforce one")
    settings = settings_or_exit()
    files = salesforce_setup.package(mapping, settings.salesforce_api_version)
    states = (salesforce_setup.changes if dry_run else salesforce_setup.write)(files, out)
    verb = "would write" if dry_run else "wrote"
    for relative, state in states.items():
        if state != "unchanged":
            click.echo(f"{verb} ({state}): {out / relative}")
    unchanged = sum(state == "unchanged" for state in states.values())
    click.echo(f"{out}: {len(states) - unchanged} file(s) {verb}, {unchanged} unchanged")
    adapter = crm_adapter(settings, mapping) if (dry_run or deploy or assign_to) else None
    if (deploy or assign_to) and adapter is None:
        raise SettingProblem(
            "--deploy and --assign-to need SALESFORCE_* credentials (see docs/salesforce.md)"
        )
    if not isinstance(adapter, SalesforceAdapter):
        return
    try:
        if dry_run:
            report = adapter.field_report()
            created = [*report.missing, *report.unknown]
            click.echo(f"deploy would create ({len(created)}): {', '.join(created) or '-'}")
            if report.hidden:
                click.echo(
                    f"exist, hidden from the user until the permission set is assigned "
                    f"({len(report.hidden)}): {', '.join(report.hidden)}"
                )
            return
        if deploy:
            result = salesforce_setup.deploy(adapter.connection, mapping, sandbox=sandbox)
            click.echo(f"deployed: {result.get('state')}")
    except SyncError as exc:
        raise click.ClickException(f"Salesforce: {exc.reason}") from None
    click.echo(assign(adapter, assign_to))
