"""The ``instruqt-crm`` command line: one click group, commands in the modules beside this one."""

from __future__ import annotations

import click

from .backfill import backfill
from .failed import failed_group
from .local import dev, send_example
from .mapping_commands import check, preview_command, setup
from .operations import replay, status_command, trace_command
from .release import release


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="instruqt-crm")
def main() -> None:
    """Sync Instruqt learner activity into HubSpot or Salesforce."""


for command in (
    dev,
    send_example,
    check,
    release,
    preview_command,
    setup,
    replay,
    failed_group,
    trace_command,
    status_command,
    backfill,
):
    main.add_command(command)

if __name__ == "__main__":
    main()
