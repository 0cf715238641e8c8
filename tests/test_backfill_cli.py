"""``instruqt-crm backfill`` as an operator runs it: progress, summary, dry run, errors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from instruqt_crm import keys
from instruqt_crm.cli.backfill import summary
from instruqt_crm.config import Settings
from instruqt_crm.engine import inbox
from instruqt_crm.engine.worker import build_worker
from instruqt_crm.ops.backfill import Backfill, Plan, Progress
from tests.engine_helpers import drain
from tests.fakes.instruqt import FakeInstruqt
from tests.fakes.instruqt_team import TEAM, team
from tests.test_cli import env, run  # noqa: F401  (env is a fixture)


@pytest.fixture
def instruqt(env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeInstruqt]:  # noqa: F811
    """The fake team's Instruqt, in the environment the command reads."""
    with team(seed=7, learners=8, plays=40).fake() as fake:
        monkeypatch.setenv("INSTRUQT_API_KEY", fake.key)
        monkeypatch.setenv("INSTRUQT_TEAM_SLUG", TEAM)
        monkeypatch.setenv("INSTRUQT_GRAPHQL_URL", fake.url)
        yield fake


SINCE = ("--since", "2025-01-01", "--until", "2025-04-01", "--requests-per-second", "50")


def test_backfill_queues_and_summarises(instruqt: FakeInstruqt, redis_conn: redis.Redis) -> None:
    result = run("backfill", *SINCE)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Backfill of team acme: plays started 2025-01-01 00:00 to 2025-04-01 00:00 UTC" in out
    assert "plays read            40" in out
    assert "learners              8" in out
    assert "developer plays       5 left out" in out
    assert "without an email      2 learner(s)" in out and "IDENTITY_WAIT_DAYS" in out
    queued = inbox.depth(redis_conn, inbox.BACKFILL)
    assert f"events queued         {queued}" in out and queued > 40
    assert "plays" in result.stderr  # the progress bar's label (the bar itself needs a terminal)
    drain(redis_conn)
    assert inbox.depth(redis_conn, inbox.BACKFILL) == 0


def test_a_dry_run_prints_each_learner_and_queues_nothing(
    instruqt: FakeInstruqt, redis_conn: redis.Redis
) -> None:
    result = run("backfill", *SINCE, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "user0@acme.co  (user user0;" in result.output
    assert "instruqt_challenges_completed_count" in result.output
    assert "unknown — would wait for identity  (user user3;" in result.output
    assert "events that would be queued" in result.output
    assert redis_conn.dbsize() == 0 or not redis_conn.exists(keys.BACKFILL_INBOX)


def test_an_unknown_track_is_named(instruqt: FakeInstruqt) -> None:
    result = run("backfill", *SINCE, "--track", "no-such-track")
    assert result.exit_code == 1
    assert "team acme has no track 'no-such-track'" in result.output


def test_a_track_filter_reads_only_that_track(
    instruqt: FakeInstruqt, redis_conn: redis.Redis
) -> None:
    result = run("backfill", *SINCE, "--track", "track-1")
    assert result.exit_code == 0, result.output
    bodies = [fields[b"body"] for _, fields in redis_conn.xrange(keys.BACKFILL_INBOX)]
    assert bodies and all(b'"track_id": "trk1"' in body for body in bodies)


def test_without_the_api_key_it_says_what_is_missing(
    env: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("INSTRUQT_API_KEY", raising=False)
    result = run("backfill", "--since", "2025-01-01")
    assert result.exit_code == 2
    assert "INSTRUQT_API_KEY and INSTRUQT_TEAM_SLUG: needed" in result.output
    assert "Usage:" not in result.output


def test_an_api_that_keeps_failing_stops_with_how_to_continue(
    instruqt: FakeInstruqt, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("time.sleep", lambda _s: None)
    instruqt.down = True
    result = run("backfill", *SINCE)
    assert result.exit_code == 1
    assert "backfill stopped:" in result.output
    assert "Run the same command again to continue from its checkpoint." in result.output


def test_since_must_come_before_until(instruqt: FakeInstruqt) -> None:
    result = run("backfill", "--since", "2025-05-01", "--until", "2025-04-01")
    assert result.exit_code == 2
    assert "must be before --until" in result.output


def test_a_run_up_to_now_continues_from_its_checkpoint(
    instruqt: FakeInstruqt, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --until a run reads up to now; run again with the same options after an
    interruption, it continues (up to the first run's now) instead of starting over."""
    queued = Backfill._queue
    pages: list[int] = []

    def interrupted(self: Backfill, *args: Any) -> None:
        pages.append(1)
        if len(pages) == 2:
            raise KeyboardInterrupt
        queued(self, *args)

    monkeypatch.setattr(Backfill, "_queue", interrupted)
    first = run("backfill", "--since", "2025-01-01", "--requests-per-second", "50")
    assert first.exit_code == 1 and "Run the same command again" in first.output
    again = run("backfill", "--since", "2025-01-01", "--requests-per-second", "50")
    assert again.exit_code == 0, again.output
    assert "(continued from a checkpoint)" in again.output
    assert "plays read            40" in again.output
    ids = [fields[b"id"] for _, fields in redis_conn.xrange(keys.BACKFILL_INBOX)]
    assert len(ids) == len(set(ids))
    assert f"events queued         {len(ids)}" in again.output


def test_the_summary_names_plays_left_out_and_listed_twice(env: Path) -> None:  # noqa: F811
    counts = Counter(plays=40, events=170, unreadable=2, repeated=3)
    plan = Plan(TEAM, datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC))
    progress = Progress(total=40, counts=counts, learners=8)
    lines = summary(plan, progress, Settings.from_env(), False)
    assert "  left out             2 play(s): text no stage stores, or an end" in "\n".join(lines)
    assert any(line.startswith("  listed twice          3 play(s)") for line in lines)


def test_trace_says_when_a_learner_waits_for_the_backfill(
    instruqt: FakeInstruqt, redis_conn: redis.Redis
) -> None:
    inbox.backfill_reading(redis_conn, 600, "another-run")  # another backfill still reads
    assert run("backfill", *SINCE).exit_code == 0
    drain(redis_conn)
    held = run("trace", "user0@acme.co")
    assert held.exit_code == 0, held.output
    assert "Held for a backfill: its values are sent when the backfill is done" in held.output
    inbox.backfill_stopped(redis_conn, "another-run")
    build_worker(redis_conn, simple=True).run_maintenance_tasks()
    drain(redis_conn)
    assert "Held for a backfill" not in run("trace", "user0@acme.co").output
