"""``instruqt-crm backfill``: put learners' past plays on their CRM records."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import click

from instruqt_crm.config import Settings
from instruqt_crm.errors import PermanentError, RetryableError
from instruqt_crm.instruqt_api import InstruqtClient
from instruqt_crm.instruqt_reports import PlayReports
from instruqt_crm.ops import preview
from instruqt_crm.ops.backfill import Backfill, BackfillError
from instruqt_crm.ops.backfill_plan import Plan, Progress

from .common import (
    SettingProblem,
    load_mapping_or_exit,
    mapping_option,
    redis_for,
    settings_or_exit,
)

DATE = click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"])


def _utc(moment: datetime) -> datetime:
    """A date given on the command line, read as UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _reports(settings: Settings, requests_per_second: float) -> PlayReports:
    """The play report reader for INSTRUQT_API_KEY and INSTRUQT_TEAM_SLUG (exit 2 without)."""
    if settings.instruqt_api_key is None or not settings.instruqt_team_slug:
        raise SettingProblem(
            "INSTRUQT_API_KEY and INSTRUQT_TEAM_SLUG: needed to read play reports "
            "(team settings → API keys; the slug is in your team's URL)"
        )
    client = InstruqtClient(
        settings.instruqt_api_key.get_secret_value(),
        settings.instruqt_team_slug,
        settings.instruqt_graphql_url,
    )
    return PlayReports(client, requests_per_second=requests_per_second)


class ProgressBar:
    """A progress bar of plays read out of the report's total, with learners and events."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self._bar: Any = None
        self._shown = 0
        self._latest = Progress()

    def __call__(self, progress: Progress) -> None:
        self._latest = progress
        if self._bar is None:
            self._bar = click.progressbar(
                length=max(progress.total, 1),
                label="plays",
                show_pos=True,
                item_show_func=lambda _: self._line(),
                file=sys.stderr,
            )
            self._bar.__enter__()
        self._bar.length = max(progress.total, progress.read, 1)
        self._bar.update(progress.read - self._shown, progress)
        self._shown = progress.read

    def _line(self) -> str:
        now = self._latest
        line = f"{now.learners} learners, {now.counts['events']} events {self.verb}"
        return f"{line} ({now.waiting})" if now.waiting else line

    def close(self) -> None:
        """End the bar's line."""
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def summary(plan: Plan, progress: Progress, settings: Settings, dry_run: bool) -> list[str]:
    """What the run did, and what happens next to the learners it could not name."""
    counts = progress.counts
    until = plan.until.strftime("%Y-%m-%d %H:%M")
    lines = [
        f"Backfill of team {plan.team}: plays started {plan.since:%Y-%m-%d %H:%M} to {until} UTC"
        + (" (continued from a checkpoint)" if progress.resumed else ""),
        f"  plays read            {counts['plays']}",
        f"  learners              {progress.learners}",
        f"  events {'that would be queued' if dry_run else 'queued':<14} {counts['events']}",
    ]
    if counts["developer_skipped"]:
        lines.append(
            f"  developer plays       {counts['developer_skipped']} left out "
            "(--include-developer-plays queues them)"
        )
    if progress.without_email:
        lines.append(
            f"  without an email      {progress.without_email} learner(s): Instruqt gave no email "
            "and their plays' parameters name none. Their events wait, as live ones do: the "
            "workers ask Instruqt again on a backoff and sync them once an email is known; "
            f"after {settings.identity_wait_days:g} days (IDENTITY_WAIT_DAYS) they fail with a "
            "reason (instruqt-crm failed list)."
        )
    if counts["stand_ins"]:
        lines.append(
            f"  challenges by number  {counts['stand_ins']} play(s): the track's challenge list "
            "was not available, so their challenges count as #1, #2, … of the track"
        )
    for name, why in (
        ("malformed", "unusable report rows"),
        ("unreadable", "text no stage stores, or an end or a count no play has"),
    ):
        if counts[name]:
            lines.append(f"  left out             {counts[name]} play(s): {why} (see the log)")
    if counts["repeated"]:
        lines.append(
            f"  listed twice          {counts['repeated']} play(s): the report's pages shifted "
            "while read; each was counted and queued once"
        )
    return lines


@click.command("backfill")
@click.option(
    "--since", required=True, type=DATE, help="First play start time (UTC), e.g. 2025-01-01."
)
@click.option(
    "--until", type=DATE, default=None, help="End of the range (UTC, excluded). [default: now]"
)
@click.option(
    "--track", "tracks", multiple=True, metavar="SLUG", help="Only this track (repeatable)."
)
@click.option(
    "--dry-run", is_flag=True, help="Print what would be written per learner; queue nothing."
)
@click.option(
    "--include-developer-plays", is_flag=True, help="Queue track authors' test plays too."
)
@click.option(
    "--restart", is_flag=True, help="Start over instead of continuing an interrupted run."
)
@click.option(
    "--requests-per-second",
    type=click.FloatRange(min=0.01, max=50),
    default=2.0,
    show_default=True,
    help="Pace of requests to Instruqt's API.",
)
@mapping_option
def backfill(
    since: datetime,
    until: datetime | None,
    tracks: tuple[str, ...],
    dry_run: bool,
    include_developer_plays: bool,
    restart: bool,
    requests_per_second: float,
    mapping_path: str,
) -> None:
    """Put learners' past plays on their CRM records, from Instruqt's play report.

    Each play becomes the events its webhooks sent (track started, challenges completed,
    track completed or stopped, review), queued behind live events and synced like them.
    An interrupted run continues where it stopped when run again with the same options.
    """
    settings = settings_or_exit()
    reports = _reports(settings, requests_per_second)
    mapping = load_mapping_or_exit(mapping_path)
    end = _utc(until) if until else datetime.now(UTC)
    team = str(settings.instruqt_team_slug)
    plan = Plan(team, _utc(since), end, tracks, include_developer_plays, open_ended=not until)
    if plan.since >= plan.until:
        raise click.BadParameter("must be before --until (or now)", param_hint="--since")
    if include_developer_plays and mapping.skip_developer_plays:
        click.echo(
            "warning: the mapping skips developer plays (skip_developer_plays: true): "
            "their events will be counted as skipped, not written",
            err=True,
        )
    job = Backfill(None if dry_run else redis_for(settings), reports, mapping, plan)
    bar = ProgressBar("found" if dry_run else "queued")
    try:
        if dry_run:
            progress, result = job.dry_run(bar)
        else:
            progress = job.run(bar, restart=restart)
    except KeyboardInterrupt:
        bar.close()
        raise click.ClickException(_stopped("interrupted", dry_run)) from None
    except (BackfillError, PermanentError, RetryableError) as exc:
        bar.close()
        raise click.ClickException(_stopped(str(exc), dry_run)) from None
    bar.close()
    if dry_run:
        for line in preview.render(result, mapping):
            click.echo(line)
        click.echo("")
    for line in summary(job.plan, progress, settings, dry_run):
        click.echo(line)


def _stopped(why: str, dry_run: bool) -> str:
    """Why the backfill stopped, and how to go on."""
    if dry_run:
        return f"backfill stopped: {why}"
    return f"backfill stopped: {why}. Run the same command again to continue from its checkpoint."
