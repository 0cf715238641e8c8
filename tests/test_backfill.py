"""Backfill: a fake team's past plays reach the CRM exactly as their live webhooks would have
taken them there; a rerun or an overlap with live events writes nothing new."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from instruqt_crm import keys, retry
from instruqt_crm.config import Settings
from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.engine import identity, inbox, ledger
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.instruqt_api import InstruqtClient
from instruqt_crm.instruqt_reports import PlayReports
from instruqt_crm.mapping import load_mapping
from instruqt_crm.ops import backfill as backfill_module
from instruqt_crm.ops.backfill import Backfill, Plan, Progress
from samples.history import crm_records
from samples.signing import track_event
from tests.engine_helpers import drain, enqueue_all, installed
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.instruqt import FakeInstruqt, report_item
from tests.fakes.instruqt_team import SINCE, TEAM, Team, team
from tests.test_hubspot_full_path import hubspot_env

MAPPING = Path(__file__).resolve().parent.parent / "mappings" / "hubspot.yaml"
UNTIL = SINCE + timedelta(days=90)


@contextmanager
def stack(
    redis_url: str, tmp_path: Path, fake: FakeInstruqt
) -> Iterator[tuple[FakeHubSpot, Runtime]]:
    """A fake HubSpot with the mapping's properties, and a runtime whose Instruqt is ``fake``."""
    with FakeHubSpot() as hubspot:
        env = hubspot_env(redis_url, tmp_path, hubspot) | {
            "INSTRUQT_API_KEY": fake.key,
            "INSTRUQT_TEAM_SLUG": TEAM,
            "INSTRUQT_GRAPHQL_URL": fake.url,
        }
        run = Runtime.from_settings(Settings.from_env(env))
        adapter = HubSpotAdapter(hubspot.token, hubspot.url)
        hubspot_setup.apply(adapter, run.mapping, hubspot_setup.plan(adapter, run.mapping))
        with installed(run):
            yield hubspot, run


def backfill(
    conn: redis.Redis | None, fake: FakeInstruqt, max_queued: int = 100_000, **plan: object
) -> Backfill:
    """A backfill of the fake team (no pacing; the lane's bound out of the way unless given)."""
    reports = PlayReports(InstruqtClient(fake.key, TEAM, fake.url), requests_per_second=1000)
    options = {"team": TEAM, "since": SINCE, "until": UNTIL, **plan}
    plan_ = Plan(**options)  # type: ignore[arg-type]
    return Backfill(conn, reports, load_mapping(MAPPING), plan_, max_queued=max_queued)


def writes(hubspot: FakeHubSpot) -> int:
    """Contact write requests the fake HubSpot answered."""
    return sum(1 for r in hubspot.requests if r.method == "POST" and "/batch/upsert" in r.path)


def run_backfill(conn: redis.Redis, fake: FakeInstruqt, **plan: object) -> Progress:
    seen: list[Progress] = []
    done = backfill(conn, fake, **plan).run(seen.append)
    drain(conn)
    return done


def interrupted(job: Backfill, pages: int) -> int:
    """Run ``job`` until it queued ``pages`` pages, then stop it as Ctrl-C would; the plays
    it had read."""
    seen: list[int] = []

    def stop(progress: Progress) -> None:
        seen.append(progress.read)
        if len([read for read in seen if read]) == pages:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        job.run(stop)
    return seen[-1]


@pytest.fixture
def the_team() -> Team:
    return team(seed=7, learners=8, plays=40)


def test_backfill_writes_what_the_live_events_would_have(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, the_team: Team
) -> None:
    with the_team.fake() as fake:
        with stack(redis_url, tmp_path, fake) as (hubspot, _):
            done = run_backfill(redis_conn, fake)
            from_backfill = crm_records(hubspot.contacts)
            waiting = identity.parked_count(redis_conn)
        redis_conn.flushdb()
        with stack(redis_url, tmp_path / "live", fake) as (hubspot, _):
            enqueue_all(redis_conn, the_team.live_events())
            drain(redis_conn)
            from_live = crm_records(hubspot.contacts)
            assert identity.parked_count(redis_conn) == waiting
    assert from_backfill == from_live
    normal = [p for p in the_team.plays if not p.developer]
    assert done.counts["plays"] == len(the_team.plays)
    assert done.counts["developer_skipped"] == len(the_team.plays) - len(normal)
    assert waiting == done.without_email == 2  # learners 3 and 7: no email anywhere
    assert done.learners == 8
    # the records are not trivially equal: every learner with an email has counts
    assert len(from_live) == 6
    challenge_counts = [int(r["instruqt_challenges_completed_count"]) for r in from_live.values()]
    assert all(count > 0 for count in challenge_counts)
    assert any("instruqt_last_review_score" in r for r in from_live.values())
    assert {r["email"] for r in from_live.values()} >= {"user0@acme.co", "user1.profile@mail.co"}
    assert "user2@param.co" in {r["email"] for r in from_live.values()}


def test_a_rerun_writes_nothing(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, the_team: Team
) -> None:
    with the_team.fake() as fake, stack(redis_url, tmp_path, fake) as (hubspot, _):
        run_backfill(redis_conn, fake)
        before, written = crm_records(hubspot.contacts), writes(hubspot)
        assert written > 0
        again = run_backfill(redis_conn, fake)
        assert again.counts["events"] > 0 and not again.resumed  # read and queued again
        assert writes(hubspot) == written
        assert crm_records(hubspot.contacts) == before
        assert not redis_conn.exists(keys.backfill(backfill(None, fake).plan.run_id))


def test_a_range_overlapping_live_events_leaves_every_record_as_it_was(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, the_team: Team
) -> None:
    with the_team.fake() as fake, stack(redis_url, tmp_path, fake) as (hubspot, _):
        enqueue_all(redis_conn, the_team.live_events())
        drain(redis_conn)
        before, written = crm_records(hubspot.contacts), writes(hubspot)
        run_backfill(redis_conn, fake, since=SINCE - timedelta(days=30))
        assert writes(hubspot) == written
        assert crm_records(hubspot.contacts) == before


def test_an_interrupted_run_continues_from_its_checkpoint(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """Stopped after its second page, a run continues at the third; the summary counts the
    whole range once; the pages before the stop are not read again."""
    many = team(seed=3, learners=30, plays=450)
    with many.fake() as fake:
        stopped_at = interrupted(backfill(redis_conn, fake), pages=2)
        assert 0 < stopped_at < 450
        done = backfill(redis_conn, fake).run(lambda _: None)
        assert done.resumed and done.counts["plays"] == 450  # the first pages not read again
        assert inbox.depth(redis_conn, inbox.BACKFILL) == done.counts["events"]  # each once
        redis_conn.delete(keys.BACKFILL_INBOX)
        whole = backfill(redis_conn, fake).run(lambda _: None, restart=True)
    assert not whole.resumed and whole.counts == done.counts
    assert done.learners == whole.learners == 30
    assert inbox.depth(redis_conn, inbox.BACKFILL) == whole.counts["events"]


def test_the_reader_waits_while_the_workers_are_behind(
    engine: Path, redis_conn: redis.Redis, the_team: Team
) -> None:
    """With at most 20 backfill events waiting, the reader pauses (saying so) until the
    workers took them: here its wait drains the queues."""
    said: list[str | None] = []
    with the_team.fake() as fake:
        job = backfill(redis_conn, fake, max_queued=20)
        job._sleep = lambda _s: drain(redis_conn)
        done = job.run(lambda progress: said.append(progress.waiting))
    assert "waiting for the workers" in said
    assert done.counts["plays"] == len(the_team.plays)
    assert inbox.depth(redis_conn, inbox.BACKFILL) < 20 + 100 * 8


def test_rate_limits_and_server_errors_are_waited_out(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, the_team: Team
) -> None:
    with the_team.fake() as fake:
        fake.fail_next = [429, 503, 502]
        job = backfill(redis_conn, fake)
        job.reports._sleep = lambda _s: None  # type: ignore[attr-defined]
        done = job.run(lambda _: None)
    assert done.counts["plays"] == len(the_team.plays)
    assert fake.statuses[:3] == [429, 503, 502]


def test_developer_plays_are_queued_when_asked(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, the_team: Team
) -> None:
    with the_team.fake() as fake:
        done = backfill(redis_conn, fake, include_developer=True).run(lambda _: None)
    assert done.counts["developer_skipped"] == 0
    bodies = [fields[b"body"] for _, fields in redis_conn.xrange(keys.BACKFILL_INBOX)]
    assert any(b'"is_developer_play": true' in body for body in bodies)


def test_a_dry_run_folds_per_learner_and_stores_nothing(
    redis_conn: redis.Redis, the_team: Team
) -> None:
    with the_team.fake() as fake:
        progress, result = backfill(None, fake).dry_run(lambda _: None)
    assert progress.counts["plays"] == len(the_team.plays)
    assert set(result.contacts) == {
        "user0@acme.co",
        "user1.profile@mail.co",
        "user2@param.co",
        "user4@acme.co",
        "user5.profile@mail.co",
        "user6@param.co",
    }
    assert {c for c in result.waiting} == {"user3", "user7"}
    assert redis_conn.dbsize() == 0


def test_learners_are_sent_once_when_the_backfill_is_done_and_live_ones_at_once(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, the_team: Team
) -> None:
    """Workers drain the backfill lane between pages (the reader waits for them): the learners
    it changed are held and written once, after its last event; a live event mid-backfill
    is written while the backfill still runs."""
    live_seen: list[dict[str, dict[str, str]]] = []
    with the_team.fake() as fake, stack(redis_url, tmp_path, fake) as (hubspot, _):
        job = backfill(redis_conn, fake, max_queued=20)

        def workers_run(_seconds: float) -> None:
            if not live_seen:
                enqueue_all(
                    redis_conn,
                    [("msg_live", track_event("live-user", params={"email": "live@x.co"}))],
                )
            drain(redis_conn)
            live_seen.append(crm_records(hubspot.contacts))

        job._sleep = workers_run
        done = job.run(lambda _: None)
        assert ledger.held_count(redis_conn) > 0  # the last page's learners, until drained
        drain(redis_conn)
        inputs = [
            item["properties"].get("email") or item["id"]
            for r in hubspot.requests
            if r.method == "POST" and "/batch/upsert" in r.path
            for item in r.body["inputs"]
        ]
    assert len(live_seen) > 2 and "live@x.co" in live_seen[0]
    assert all(set(seen) == {"live@x.co"} for seen in live_seen)  # nothing else before the end
    backfilled = [email for email in inputs if email != "live@x.co"]
    assert len(backfilled) == len(set(backfilled)) == 6  # each learner once
    assert ledger.held_count(redis_conn) == 0 and done.counts["plays"] == len(the_team.plays)


def test_an_open_ended_run_continues_up_to_the_end_its_first_run_fixed(
    redis_conn: redis.Redis,
) -> None:
    """Without --until, "now" differs on every run: the checkpoint is found all the same, and
    the continued run reads up to the first run's end."""
    many = team(seed=3, learners=30, plays=450)
    with many.fake() as fake:
        interrupted(backfill(redis_conn, fake, open_ended=True), pages=2)
        later = backfill(redis_conn, fake, open_ended=True, until=UNTIL + timedelta(hours=5))
        done = later.run(lambda _: None)
    assert done.resumed and done.counts["plays"] == 450
    assert later.plan.until == UNTIL


def test_hostile_report_rows_are_left_out_and_the_rest_is_queued(
    redis_conn: redis.Redis, the_team: Team
) -> None:
    """Rows no play can have are counted and left out, text no stage stores too (a lone
    surrogate in a review, or in the name Instruqt gives: the learner is cached without it),
    and the run goes on to queue every other play, once."""
    hostile = [
        report_item("huge-time", "user0", "2025-01-02T10:00:00Z", time_spent=10**15),
        report_item("future", "user0", "2025-01-02T10:00:00Z", time_spent=10**9),
        report_item(
            "many", "user0", "2025-01-02T10:00:00Z", total_challenges=0, completed_challenges=10**9
        ),
        report_item("bad-text", "user0", "2025-01-02T10:00:00Z", review=(5, "bad \ud800 text")),
        report_item("negative", "user0", "2025-01-02T10:00:00Z", time_spent=-5),
        {**report_item("nulls", "user9", "2025-01-02T10:00:00Z"), "track": None},
        report_item("odd-name", "odd", "2025-01-02T11:00:00Z", custom_parameters={"a": "b"}),
    ]
    with the_team.fake() as fake:
        fake.plays += hostile
        fake.details["odd"] = {"email": "odd@acme.co", "firstName": "Bad \ud800", "lastName": "L"}
        done = backfill(redis_conn, fake).run(lambda _: None)
    assert done.counts["unreadable"] == 4
    assert done.counts["malformed"] == 2
    assert done.counts["plays"] == len(the_team.plays) + 5
    ids = [fields[b"id"].decode() for _, fields in redis_conn.xrange(keys.BACKFILL_INBOX)]
    assert len(ids) == len(set(ids)) == done.counts["events"]
    assert "backfill:odd-name:track.started" in ids
    assert not any(i.split(":")[1] in ("huge-time", "future", "many", "bad-text") for i in ids)
    odd = identity.cached_learner(redis_conn, "odd")
    assert isinstance(odd, identity.Learner) and odd.email == "odd@acme.co"


def test_a_play_listed_twice_is_counted_and_queued_once(
    redis_conn: redis.Redis, the_team: Team, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paging by skip over an ordering with ties is not stable: a play that moves between two
    requests shows up on two pages. It is counted and queued once, also when the run is
    interrupted between those pages and continued."""
    monkeypatch.setattr(backfill_module, "PAGE_SIZE", 2)
    with the_team.fake() as fake:
        served = fake._reports

        def shifting(variables: dict[str, Any]) -> Any:
            """Each later page starts one play earlier (a play moved up): nothing is skipped,
            the last play of each page comes again on the next."""
            skip = variables["skip"]
            status, body, headers = served({**variables, "skip": max(0, skip - 1)})
            if skip and body.get("data"):
                body["data"]["playReports"]["totalItems"] += 1
            return status, body, headers

        fake._reports = shifting  # type: ignore[method-assign]
        interrupted(backfill(redis_conn, fake), pages=3)
        done = backfill(redis_conn, fake).run(lambda _: None)
    assert done.resumed and done.counts["plays"] == len(the_team.plays)
    ids = [fields[b"id"].decode() for _, fields in redis_conn.xrange(keys.BACKFILL_INBOX)]
    assert len(ids) == len(set(ids)) == done.counts["events"]


def test_the_reading_mark_outlasts_any_single_request(
    redis_conn: redis.Redis, the_team: Team
) -> None:
    """While the reader waits on one request to Instruqt (paced, retried on 429s with their
    Retry-After and on 5xx, each attempt up to the client's timeout), its mark that it still
    reads must not expire: else the workers, done with the queued events, would release the
    learners early and write them again after the next page."""
    with the_team.fake() as fake:
        job = backfill(redis_conn, fake)
        reports = job.reports
        client = reports.client
        longest = (
            client.attempts * (client.timeout + reports.interval)
            + (client.attempts - 1) * retry.DEFAULT_MAX_HINT
        )
        left: list[int] = []
        for name in ("page", "challenges"):
            method = getattr(reports, name)

            def watched(*args: Any, _method: Any = method) -> Any:
                until = redis_conn.zscore(keys.BACKFILL_RUNNING, job.plan.run_id)
                left.append(int((until or 0) - time.time()))
                return _method(*args)

            setattr(reports, name, watched)
        job.run(lambda _: None)
    assert len(left) > 10 and min(left) >= longest
