"""`failed`: list, show, requeue or purge what failed for good."""

from __future__ import annotations

import dataclasses
import json

import click
import redis

from instruqt_crm.engine import requeue
from instruqt_crm.errors import Category
from instruqt_crm.journal import failures
from instruqt_crm.journal.trail import when
from instruqt_crm.ops import status

from .common import (
    json_option,
    print_json,
    redis_for,
    settings_or_exit,
)

category_option = click.option(
    "--category",
    type=click.Choice([category.value for category in Category]),
    callback=lambda _ctx, _param, value: Category(value) if value else None,
    help="Only this category.",
)


@click.group("failed", short_help="List, show, requeue or purge failures.")
def failed_group() -> None:
    """Inspect, requeue or purge failures (events, contacts and plays that need an operator)."""


def _failure_line(failure: failures.Failure) -> str:
    """One failure on one line."""
    return f"  {failure.id}  {when(failure.at)}  {failure.message_id}  {failure.reason}"


@failed_group.command("list")
@category_option
@click.option("--limit", default=20, show_default=True, help="Failures shown per category.")
@json_option
def failed_list(category: Category | None, limit: int, as_json: bool) -> None:
    """List stored failures by category, newest first, with counts."""
    conn = redis_for(settings_or_exit())
    groups = failures.by_category(conn)
    if category:
        groups = {category: groups.get(category, [])}
    if as_json:
        print_json(
            {name: [dataclasses.asdict(f) for f in items[:limit]] for name, items in groups.items()}
        )
        return
    total = sum(len(items) for items in groups.values())
    click.echo(f"{total} failure(s) stored" + (f" in {category}" if category else ""))
    for name, items in sorted(groups.items()):
        click.echo(f"{name} ({len(items)})")
        for failure in items[:limit]:
            click.echo(_failure_line(failure))
        if len(items) > limit:
            click.echo(f"  ... {len(items) - limit} more (use --limit)")
    jobs_failed = status.queue_figures(conn)["jobs"]["failed"]  # the failed queue's are those above
    if jobs_failed:
        click.echo(f"and {jobs_failed} job(s) in the jobs queue's failed registry (dashboard)")


def _one_failure(conn: redis.Redis, wanted: str) -> failures.Failure:
    """The failure with this id, else the one of this message (svix-id); ClickException if
    there is none, or if several share the message id (their ids are listed)."""
    failure = failures.get(conn, wanted)
    if failure is not None:
        return failure
    found = [f for f in failures.every(conn) if f.message_id == wanted]
    if len(found) == 1:
        return found[0]
    if found:
        raise click.ClickException(
            f"message {wanted!r} has {len(found)} failures: "
            f"{', '.join(f.id for f in found)} (show one by its id)"
        )
    raise click.ClickException(
        f"no failure with id or message id {wanted!r} (see: instruqt-crm failed list)"
    )


@failed_group.command("show")
@click.argument("failure_id", metavar="ID")
@json_option
def failed_show(failure_id: str, as_json: bool) -> None:
    """Show one failure's reason and payload, by its id or its event's message id (svix-id);
    exit 1 if there is no such failure."""
    conn = redis_for(settings_or_exit())
    failure = _one_failure(conn, failure_id)
    if as_json:
        print_json({**dataclasses.asdict(failure), "payload": failure.body()})
        return
    click.echo(f"id:        {failure.id}")
    click.echo(f"category:  {failure.category}")
    click.echo(f"when:      {when(failure.at)}")
    click.echo(f"message:   {failure.message_id}")
    click.echo(f"reason:    {failure.reason}")
    click.echo(f"kind:      {failure.kind}")
    click.echo(f"requeue:   {requeue.MEANING[failure.kind]}")
    body = failure.body()
    click.echo("payload:")
    click.echo(json.dumps(body, indent=2, sort_keys=True) if not isinstance(body, str) else body)


@failed_group.command("requeue")
@click.argument("failure_id", required=False)
@click.option("--all", "requeue_all", is_flag=True, help="Requeue every failure (of --category).")
@click.option("--reason", "reason_text", help="Requeue failures whose reason contains TEXT.")
@category_option
def failed_requeue(
    failure_id: str | None, requeue_all: bool, reason_text: str | None, category: Category | None
) -> None:
    """Requeue failures (FAILURE_ID, --all or --reason) and forget them."""
    if sum((failure_id is not None, requeue_all, reason_text is not None)) != 1:
        raise click.UsageError("give exactly one of FAILURE_ID, --all or --reason TEXT")
    conn = redis_for(settings_or_exit())
    if failure_id is not None:
        try:
            kind = requeue.requeue(conn, failure_id)
        except KeyError:
            raise click.ClickException(f"no failure with id {failure_id!r}") from None
        except requeue.NotRequeueable as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"requeued {failure_id} ({kind})")
        return
    chosen = failures.every(conn, category)
    if reason_text is not None:
        chosen = [f for f in chosen if reason_text.lower() in f.reason.lower()]
    done = skipped = 0
    for failure in chosen:
        try:
            kind = requeue.requeue(conn, failure.id)
        except (KeyError, requeue.NotRequeueable):
            skipped += 1
            continue
        done += 1
        click.echo(f"requeued {failure.id} ({kind})")
    click.echo(f"{done} requeued, {skipped} not requeueable (purge those once read)")


@failed_group.command("purge")
@category_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def failed_purge(category: Category | None, yes: bool) -> None:
    """Delete stored failures (all, or one category) for good."""
    conn = redis_for(settings_or_exit())
    count = len(failures.every(conn, category))
    if count and not yes:
        click.confirm(f"Delete {count} failure(s) for good?", abort=True)
    click.echo(f"purged {failures.purge(conn, category)} failure(s)")
