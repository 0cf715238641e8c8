"""Mapping commands: `check`, `preview`, and `setup` (create the mapped CRM properties)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .. import preview
from ..errors import SyncError
from .common import (
    DEFAULT_MAPPING,
    hubspot_adapter,
    json_option,
    load_mapping_or_exit,
    mapping_option,
    print_json,
)


@click.command(short_help="Validate a mapping and the CRM's properties.")
@click.argument(
    "mapping_path",
    metavar="[MAPPING]",
    required=False,
    type=click.Path(exists=True, dir_okay=False),
    envvar="MAPPING_PATH",
    default=DEFAULT_MAPPING,
)
@click.option(
    "--crm/--no-crm",
    "check_crm",
    default=True,
    show_default=True,
    help="Also check that the CRM has every mapped property (when its token is set).",
)
def check(mapping_path: str, check_crm: bool) -> None:
    """Validate a mapping (default: MAPPING_PATH) and the CRM's properties; exit 1 if not ok."""
    mapping = load_mapping_or_exit(mapping_path, err=False)
    for warning in mapping.warnings:
        click.echo(f"{warning} (warning)")
    click.echo(
        f"{mapping_path}: ok ({mapping.crm} {mapping.object}, "
        f"{len(mapping.properties)} properties, {len(mapping.events)} rules)"
    )
    if not check_crm:
        return
    token = os.environ.get("HUBSPOT_ACCESS_TOKEN", "").strip()
    if mapping.crm != "hubspot":
        click.echo(f"{mapping.crm}: fields not checked (not supported by this command yet)")
        return
    if not token:
        click.echo("HubSpot: properties not checked (HUBSPOT_ACCESS_TOKEN is not set)")
        return
    from ..crm import hubspot_setup

    try:
        missing = hubspot_setup.missing_properties(hubspot_adapter(token), mapping)
    except SyncError as exc:
        raise click.ClickException(
            f"HubSpot: cannot read the contact properties: {exc.reason}"
        ) from None
    if missing:
        click.echo(
            f"HubSpot: the account lacks {len(missing)} mapped propert"
            f"{'y' if len(missing) == 1 else 'ies'}: {', '.join(missing)}"
        )
        click.echo("Create them with: instruqt-crm setup hubspot")
        raise click.exceptions.Exit(1)
    click.echo(f"HubSpot: every mapped property exists ({len(mapping.properties)})")


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
    from ..crm import hubspot_setup

    token = os.environ.get("HUBSPOT_ACCESS_TOKEN", "").strip()
    if not token:
        raise click.UsageError(
            "HUBSPOT_ACCESS_TOKEN is not set: export the access token of a HubSpot private app "
            "with the crm.schemas.contacts.read and crm.schemas.contacts.write scopes"
        )
    mapping = load_mapping_or_exit(mapping_path)
    if mapping.crm != "hubspot":
        raise click.UsageError(f"{mapping_path} is a {mapping.crm} mapping, not a HubSpot one")
    adapter = hubspot_adapter(token)
    try:
        steps = hubspot_setup.plan(adapter, mapping)
        created = [] if dry_run else hubspot_setup.apply(adapter, mapping, steps)
    except SyncError as exc:
        raise click.ClickException(f"HubSpot: {exc.reason}") from None
    verb = "would create" if dry_run else "created"
    group = f"{verb} group" if steps.create_group else "group exists"
    click.echo(f"{hubspot_setup.GROUP}: {group}")
    click.echo(f"exist ({len(steps.existing)}): {', '.join(steps.existing) or '-'}")
    names = steps.create if dry_run else [n for n in created if not n.startswith("group ")]
    click.echo(f"{verb} ({len(names)}): {', '.join(names) or '-'}")
    for mismatch in steps.mismatched:
        click.echo(f"type mismatch: {mismatch}")
    if steps.mismatched:
        click.echo("Fix these in HubSpot (or rename the property in the mapping).")
        raise click.exceptions.Exit(1)
