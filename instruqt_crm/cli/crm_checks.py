"""The CRM steps `check`, `setup` and `release` share: compare the account with the mapping,
create what is missing (HubSpot), check the Salesforce user's access and assign its permission
set, and report problems in the same lines everywhere.

Each raises ``click.ClickException`` (the CRM could not be read or written: one line) or
``click.exceptions.Exit(1)`` (what was checked failed, its lines already printed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.crm.salesforce import SalesforceAdapter
from instruqt_crm.crm.salesforce_access import PERMISSION_SET, assign_permission_set, user_named
from instruqt_crm.errors import SyncError
from instruqt_crm.mapping import Mapping


@dataclass
class HubSpotProperties:
    """What the account has of the mapping's properties, and what was created."""

    steps: hubspot_setup.Plan
    created: list[str] = field(default_factory=list)  # property names
    created_group: bool = False

    @property
    def missing(self) -> list[str]:
        """Mapped properties the account lacks (still, when nothing was created), sorted."""
        return sorted(set(self.steps.create) - set(self.created))


def hubspot_properties(
    adapter: HubSpotAdapter, mapping: Mapping, create: bool
) -> HubSpotProperties:
    """Compare the account's contact properties with the mapping (``hubspot_setup.plan``, two
    GETs) and, with ``create``, create the group and the missing properties
    (``hubspot_setup.apply``); existing properties are never changed."""
    try:
        steps = hubspot_setup.plan(adapter, mapping)
    except SyncError as exc:
        raise click.ClickException(
            f"HubSpot: cannot read the contact properties: {exc.reason}"
        ) from None
    return create_missing(adapter, mapping, steps) if create else HubSpotProperties(steps)


def create_missing(
    adapter: HubSpotAdapter, mapping: Mapping, steps: hubspot_setup.Plan
) -> HubSpotProperties:
    """Create the group and the properties ``steps`` (a plan) says are missing."""
    try:
        created = hubspot_setup.apply(adapter, mapping, steps)
    except SyncError as exc:
        raise click.ClickException(f"HubSpot: cannot create the properties: {exc.reason}") from None
    group = f"group {hubspot_setup.GROUP}"
    names = [name for name in created if name != group]
    return HubSpotProperties(steps, names, created_group=group in created)


def lacks(missing: list[str]) -> str:
    """The line that names the mapped properties the HubSpot account lacks."""
    return (
        f"HubSpot: the account lacks {len(missing)} mapped propert"
        f"{'y' if len(missing) == 1 else 'ies'}: {', '.join(missing)}"
    )


def fail_on_mismatches(steps: hubspot_setup.Plan) -> None:
    """Print each type mismatch (and the upsert-key problem) and exit 1, if there are any."""
    for mismatch in steps.mismatched:
        click.echo(f"type mismatch: {mismatch}")
    if steps.mismatched:
        click.echo("Fix these in HubSpot (or rename the property in the mapping).")
        raise click.exceptions.Exit(1)


def check_salesforce(mapping: Mapping, adapter: object) -> None:
    """Every mapped field on Contact and Lead (and the play-record fields) visible to the user,
    and its access to every Contact and Lead; exit 1 printing each problem with its fix."""
    if not isinstance(adapter, SalesforceAdapter):
        click.echo("Salesforce: fields not checked (no SALESFORCE_* credentials are set)")
        return
    try:
        problems = adapter.problems()
    except SyncError as exc:
        raise click.ClickException(f"Salesforce: cannot check the org: {exc.reason}") from None
    for line in problems:
        click.echo(line)
    if problems:
        raise click.exceptions.Exit(1)
    click.echo(f"Salesforce: every mapped field exists ({len(mapping.properties)})")
    click.echo(
        f"Salesforce: {adapter.connection.running_user()} may find and update every Contact "
        "and Lead (View All, Modify All)"
    )


def assign(adapter: SalesforceAdapter, username: str | None) -> str:
    """Assign the permission set to the user named ``username`` (None: the credentials' user);
    the line that says so."""
    try:
        user = user_named(adapter.call, username) if username else adapter.connection.running_user()
        assigned = assign_permission_set(adapter.call, user)
    except SyncError as exc:
        raise click.ClickException(exc.reason.removeprefix("Salesforce: ")) from None
    done = "assigned to" if assigned else "was already assigned to"
    return f"Salesforce: permission set {PERMISSION_SET} {done} {user}"
