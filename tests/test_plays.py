"""Play records: the per-participant ledger (order- and duplicate-proof), diffs, and the flush
that writes ``Instruqt_Play__c`` to the fake Salesforce after the learner records."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instruqt_crm.cli import main
from instruqt_crm.config import Settings
from instruqt_crm.crm.dryrun import DryRunAdapter
from instruqt_crm.crm.salesforce import SalesforceAdapter
from instruqt_crm.crm.salesforce_plays import PLAY_KEY, PLAY_OBJECT
from instruqt_crm.crm.salesforce_routing import field_name
from instruqt_crm.crm.salesforce_setup import package
from instruqt_crm.engine import ledger, plays
from instruqt_crm.engine.flush import RetryLater, flush, flush_batch
from instruqt_crm.engine.flush_plays import flush_plays
from instruqt_crm.engine.handling import handle_batch, handle_event
from instruqt_crm.engine.inbox import Entry
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.engine.send import Tally
from instruqt_crm.events import format_timestamp, parse_event, parse_timestamp
from instruqt_crm.journal import failures
from instruqt_crm.mapping import MappingError, load_mapping, parse_mapping
from samples.history import history
from samples.signing import SECRET
from tests.engine_helpers import CountingConnection, counting_client, drain, enqueue_all, installed
from tests.fakes.salesforce import FakeSalesforce
from tests.test_salesforce import adapter
from tests.test_salesforce_full_path import salesforce_env

MAPPING = load_mapping("mappings/salesforce.yaml")
HUBSPOT = load_mapping("mappings/hubspot.yaml")
T0 = "2026-11-01T10:00:00Z"


def moment(event: dict[str, Any]) -> str:
    """An event's time as the engine normalises it (UTC, milliseconds)."""
    return format_timestamp(parse_timestamp(event["timestamp"]))


def later(event: dict[str, Any], kind: str, minutes: float, **extra: Any) -> dict[str, Any]:
    """An event of the same play, ``minutes`` after ``event``."""
    stamp = parse_timestamp(event["timestamp"]) + timedelta(minutes=minutes)
    keep = {k: v for k, v in event.items() if k not in ("challenge_id", "completed")}
    return {**keep, "type": kind, "timestamp": format_timestamp(stamp), **extra}


def play_history(learners: int, seed: int) -> list[dict[str, Any]]:
    """``history()`` plus stopped plays (some also completed), challenge completions and
    failed attempts: every kind of event a play record depends on."""
    rng = random.Random(seed)
    events = history(learners, seed=seed)
    extra = []
    for event in events:
        if event["type"] != "track.started":
            continue
        if rng.random() < 0.5:
            extra.append(later(event, "track.stopped", rng.uniform(20, 90)))
        if rng.random() < 0.5:
            extra.append(later(event, "track.challenge_completed", 5, challenge_id="ch0"))
        if rng.random() < 0.3:
            extra.append(
                later(event, "track.challenge_attempted", 7, challenge_id="hard", completed=False)
            )
    return events + extra


def expected_plays(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The play records the events imply, computed directly (not by the engine)."""
    by_play: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event.get("participant_id") and not event.get("is_developer_play"):
            by_play.setdefault(event["participant_id"], []).append(event)
    records = {}
    for participant, mine in by_play.items():
        times = sorted(moment(e) for e in mine)
        completed = sorted(moment(e) for e in mine if e["type"] == "track.completed")
        stopped = sorted(moment(e) for e in mine if e["type"] == "track.stopped")
        challenges = {
            e["challenge_id"]
            for e in mine
            if e["type"] in ("track.challenge_completed", "track.challenge_attempted")
            and e.get("completed") is not False
        }
        end = (completed or stopped or times[-1:])[0]
        seconds = (parse_timestamp(end) - parse_timestamp(times[0])).total_seconds()
        durations = [e["duration"] for e in mine if "duration" in e]
        seconds = max(durations) if durations else seconds  # Instruqt's own figure first
        record: dict[str, Any] = {
            "track": next(e["track_slug"] for e in mine if e.get("track_slug")),
            "status": "Completed" if completed else "Stopped" if stopped else "Started",
            "started_at": times[0],
            "challenges_completed": len(challenges),
            "minutes_spent": int((seconds + 30) // 60),
        }
        if completed:
            record["completed_at"] = completed[0]
        records[participant] = record
    return records


def email_of(event: dict[str, Any]) -> str:
    """The learner's email, as ``history()`` makes it."""
    return f"learner{int(event['user_id'][4:]):05d}@example.com"


def salesforce_fields(record: dict[str, Any]) -> dict[str, Any]:
    """An expected play record as the fake org stores it (API names)."""
    return {field_name(name): value for name, value in record.items()}


EVENTS = play_history(3, seed=31)


def merge_all(conn: redis.Redis, order: list[int], together: bool = False) -> dict[str, Any]:
    """Merge EVENTS in ``order`` into an empty database, one by one or all in one
    ``merge_many``; every play's cells and unsent fields."""
    conn.flushdb()
    events = [(parse_event(f"m{index}", EVENTS[index]), email_of(EVENTS[index])) for index in order]
    if together:
        found = [plays.play_merge(MAPPING, event, email) for event, email in events]
        plays.merge_many(conn, [merge for merge in found if merge is not None])
    else:
        for event, email in events:
            plays.merge_event(conn, MAPPING, event, email)
    found = sorted(plays.dirty(conn, 1000))
    return {p: (plays.cells(conn, p), plays.pending(conn, p).change) for p in found}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    order=st.permutations(range(len(EVENTS))),
    repeats=st.lists(st.integers(0, len(EVENTS) - 1), max_size=15),
)
def test_any_order_and_duplicates_give_the_same_plays(
    redis_conn: redis.Redis, order: list[int], repeats: list[int]
) -> None:
    expected = merge_all(redis_conn, list(range(len(EVENTS))))
    shuffled = list(order)
    for position, index in enumerate(repeats):
        shuffled.insert((position * 7) % (len(shuffled) + 1), index)
    assert merge_all(redis_conn, shuffled) == expected
    assert merge_all(redis_conn, shuffled, together=True) == expected
    want = expected_plays(EVENTS)
    assert {p: change.properties for p, (_, change) in expected.items()} == want
    assert {p: change.email for p, (_, change) in expected.items()} == {
        e["participant_id"]: email_of(e) for e in EVENTS if e.get("participant_id")
    }


def test_the_history_covers_every_status() -> None:
    statuses = {record["status"] for record in expected_plays(EVENTS).values()}
    assert statuses == {"Started", "Stopped", "Completed"}
    assert any(e["type"] == "track.stopped" for e in EVENTS)


def play_event(kind: str, minute: int, **extra: Any) -> dict[str, Any]:
    """An event of play p1 (learner u1), ``minute`` minutes after T0."""
    stamp = parse_timestamp(T0) + timedelta(minutes=minute)
    return {
        "type": kind,
        "user_id": "u1",
        "participant_id": "p1",
        "track_id": "id-k8s",
        "track_slug": "k8s",
        "params": {"email": "u1@acme.io"},
        "timestamp": format_timestamp(stamp),
        **extra,
    }


def merge(conn: redis.Redis, *bodies: dict[str, Any], mapping=MAPPING) -> bool:
    changed = False
    for number, body in enumerate(bodies):
        event = parse_event(f"e{number}-{body['type']}", body)
        changed = plays.merge_event(conn, mapping, event, "u1@acme.io") or changed
    return changed


def fields(conn: redis.Redis, participant: str = "p1") -> dict[str, Any]:
    change = plays.pending(conn, participant).change
    assert change is not None
    return change.properties


def test_completed_beats_stopped_and_challenges_count_once(redis_conn: redis.Redis) -> None:
    merge(
        redis_conn,
        play_event("track.started", 0, track_slug=""),  # the slug may be missing on some events
        play_event("track.challenge_attempted", 3, challenge_id="c1", completed=False),
        play_event("track.challenge_attempted", 5, challenge_id="c1", completed=True),
        play_event("track.challenge_completed", 6, challenge_id="c1"),
        play_event("track.challenge_completed", 9, challenge_id="c2"),
        play_event("track.challenge_attempted", 10, challenge_id="c3", completed=False),
        play_event("track.completed", 12),
        play_event("track.stopped", 40),
    )
    assert fields(redis_conn) == {
        "track": "k8s",
        "status": "Completed",
        "started_at": "2026-11-01T10:00:00.000Z",
        "completed_at": "2026-11-01T10:12:00.000Z",
        "challenges_completed": 2,
        "minutes_spent": 12,
    }


def test_stopped_and_started_plays(redis_conn: redis.Redis) -> None:
    merge(redis_conn, play_event("track.started", 0), play_event("track.challenge_started", 4))
    assert fields(redis_conn) == {
        "track": "k8s",
        "status": "Started",
        "started_at": "2026-11-01T10:00:00.000Z",
        "challenges_completed": 0,
        "minutes_spent": 4,
    }
    merge(redis_conn, play_event("track.stopped", 25))
    assert fields(redis_conn)["status"] == "Stopped"
    assert fields(redis_conn)["minutes_spent"] == 25


def test_only_events_with_a_participant_of_a_play_mapping_count(redis_conn: redis.Redis) -> None:
    review = {**play_event("review.created", 1, score=5), "participant_id": None}
    assert not merge(redis_conn, review)
    assert not merge(redis_conn, play_event("track.started", 0), mapping=HUBSPOT)
    off = MAPPING.model_copy(
        update={"salesforce": MAPPING.salesforce.model_copy(update={"plays": None})}
    )
    assert off.plays is None
    assert not merge(redis_conn, play_event("track.started", 0), mapping=off)
    assert plays.dirty_count(redis_conn) == 0 and not redis_conn.keys("instruqt_crm:play:*")


def test_only_changed_fields_are_pending_and_a_late_merge_keeps_the_play_dirty(
    redis_conn: redis.Redis,
) -> None:
    assert merge(redis_conn, play_event("track.started", 0))
    first = plays.pending(redis_conn, "p1")
    assert first.change is not None
    assert plays.settle(redis_conn, "p1", first.version, first.change.properties)
    assert plays.pending(redis_conn, "p1").change is None and plays.dirty_count(redis_conn) == 0
    assert not merge(redis_conn, play_event("track.started", 0))  # a duplicate changes nothing
    assert merge(redis_conn, play_event("track.challenge_completed", 8, challenge_id="c1"))
    assert fields(redis_conn) == {"challenges_completed": 1, "minutes_spent": 8}
    seen = plays.pending(redis_conn, "p1")
    merge(redis_conn, play_event("track.completed", 20))  # arrives while the batch is out
    assert seen.change is not None
    assert not plays.settle(redis_conn, "p1", seen.version, seen.change.properties)
    assert plays.dirty_count(redis_conn) == 1
    assert fields(redis_conn) == {
        "status": "Completed",
        "completed_at": "2026-11-01T10:20:00.000Z",
        "minutes_spent": 20,
    }


# -- the flush, against the fake Salesforce ------------------------------------------------


def engine_runtime(redis_url: str) -> Runtime:
    env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url, "FLUSH_WINDOW_SECONDS": "0"}
    return Runtime(Settings.from_env(env), MAPPING)


def handle(conn: redis.Redis, run: Runtime, bodies: list[dict[str, Any]], tag: str = "m") -> None:
    for number, body in enumerate(bodies):
        handle_event(conn, run, parse_event(f"{tag}{number}", body))


def handle_learners(conn: redis.Redis, run: Runtime, count: int) -> None:
    """Learners u0, u1, ... each with one play (p0, p1, ...) started and completed."""
    for n in range(count):
        handle(conn, run, learner(f"p{n}", f"u{n}@acme.io", f"u{n}"), tag=f"l{n}-")


def play_records(fake: FakeSalesforce) -> dict[str, dict[str, Any]]:
    return fake.by_field(PLAY_OBJECT, PLAY_KEY)


def learner(participant: str, email: str, user: str, track: str = "k8s") -> list[dict[str, Any]]:
    """A started and a completed event of one play."""
    base = {
        "user_id": user,
        "participant_id": participant,
        "track_id": f"id-{track}",
        "track_slug": track,
        "params": {"email": email},
    }
    return [
        {**base, "type": "track.started", "timestamp": "2026-11-01T10:00:00Z"},
        {**base, "type": "track.completed", "timestamp": "2026-11-01T10:30:00Z"},
    ]


def test_plays_are_linked_to_the_learners_contact_or_lead(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        contact = fake.add("Contact", Email="known@acme.io", LastName="Known")
        run = engine_runtime(redis_url)
        handle(redis_conn, run, learner("p1", "known@acme.io", "u1"))
        handle(redis_conn, run, learner("p2", "new@acme.io", "u2"), tag="n")
        handle(redis_conn, run, learner("p3", "new@acme.io", "u2", track="vault"), tag="o")
        report = flush(redis_conn, sf, MAPPING)
        lead = fake.by_email("Lead")["new@acme.io"]["Id"]
        records = play_records(fake)
        assert (records["p1"]["Contact__c"], records["p1"]["Lead__c"]) == (contact, None)
        assert (records["p2"]["Contact__c"], records["p2"]["Lead__c"]) == (None, lead)
        assert records["p3"]["Lead__c"] == lead and records["p3"]["Track__c"] == "vault"
        assert records["p1"]["Status__c"] == "Completed" and records["p1"]["Minutes_Spent__c"] == 30
        assert records["p1"]["Name"].startswith("INST-")
        assert report.contacts.synced == 2 and plays.dirty_count(redis_conn) == 0
        # the learners were written in this flush: their Ids need no second lookup
        assert len(fake.data_calls("GET", "query")) == 2
        assert len(fake.data_calls("PATCH", f"composite/sobjects/{PLAY_OBJECT}/{PLAY_KEY}")) == 1


def test_a_converted_lead_links_its_plays_to_the_contact(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        contact = fake.add("Contact", Email="other@acme.io", LastName="C")
        fake.add_converted_lead("u1@acme.io", contact)
        handle(redis_conn, engine_runtime(redis_url), learner("p1", "u1@acme.io", "u1"))
        flush(redis_conn, sf, MAPPING)
        assert play_records(fake)["p1"]["Contact__c"] == contact


def test_one_bad_play_does_not_fail_its_batch_mates(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        run = engine_runtime(redis_url)
        handle_learners(redis_conn, run, 3)
        fake.record_errors["p1"] = ["FIELD_CUSTOM_VALIDATION_EXCEPTION"]
        flush(redis_conn, sf, MAPPING)
        assert set(play_records(fake)) == {"p0", "p2"}
        assert plays.dirty_count(redis_conn) == 0  # rejected, not retried forever
        [failure] = failures.every(redis_conn)
        assert failure.message_id == "play:p1" and failure.category == "validation"
        assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in failure.reason
        assert json.loads(failure.payload)["email"] == "u1@acme.io"
        assert failure.kind == "play"  # requeueing it must not touch contacts
        # the play's next event sends the whole play again
        stopped = {**learner("p1", "u1@acme.io", "u1")[0], "type": "track.stopped"}
        handle(redis_conn, run, [{**stopped, "timestamp": "2026-11-01T11:00:00Z"}], tag="x")
        flush(redis_conn, sf, MAPPING)
        assert play_records(fake)["p1"]["Status__c"] == "Completed"
        assert play_records(fake)["p1"]["Started_At__c"] == "2026-11-01T10:00:00.000Z"


def test_locked_plays_are_retried_then_left_for_the_next_flush(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        handle(redis_conn, engine_runtime(redis_url), learner("p1", "u1@acme.io", "u1"))
        fake.record_errors["p1"] = ["UNABLE_TO_LOCK_ROW"] * 3
        report = flush(redis_conn, sf, MAPPING)
        assert report.plays.retry == 1 and plays.dirty_count(redis_conn) == 1
        assert isinstance(report.next, RetryLater)  # RQ retries the job on its backoff
        assert "p1" not in play_records(fake)
        assert flush(redis_conn, sf, MAPPING).next is None
        assert play_records(fake)["p1"]["Status__c"] == "Completed"
        assert plays.dirty_count(redis_conn) == 0


def test_a_play_waits_while_its_learner_is_unwritten_and_fails_if_it_never_is(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        run = engine_runtime(redis_url)
        handle(redis_conn, run, learner("p1", "u1@acme.io", "u1"))
        handle(redis_conn, run, learner("p2", "u2@acme.io", "u2"), tag="n")
        handle(redis_conn, run, learner("p3", "u3@acme.io", "u3"), tag="o")
        fake.record_errors["u1@acme.io"] = ["UNABLE_TO_LOCK_ROW"] * 3  # learner: retry later
        fake.record_errors["u2@acme.io"] = ["DUPLICATES_DETECTED"]  # learner: rejected
        flush(redis_conn, sf, MAPPING)
        assert set(play_records(fake)) == {"p3"}
        assert plays.dirty_count(redis_conn) == 1  # p1 waits for its learner
        reasons = {f.message_id: f.reason for f in failures.every(redis_conn)}
        assert "no Contact or Lead found for u2@acme.io" in reasons["play:p2"]
        flush(redis_conn, sf, MAPPING)
        assert set(play_records(fake)) == {"p1", "p3"}
        lead = fake.by_email("Lead")["u1@acme.io"]["Id"]
        assert play_records(fake)["p1"]["Lead__c"] == lead


def test_a_refused_play_request_is_split_to_find_the_record(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        run = engine_runtime(redis_url)
        handle_learners(redis_conn, run, 4)
        fake.custom_objects[PLAY_OBJECT].pop("Minutes_Spent__c")  # an admin deleted the field
        report = flush(redis_conn, sf, MAPPING)
        assert report.contacts.synced == 4 and play_records(fake) == {}
        assert {f.message_id for f in failures.every(redis_conn)} == {
            f"play:p{n}" for n in range(4)
        }
        assert all("INVALID_FIELD" in f.reason for f in failures.every(redis_conn))
        writes = fake.data_calls("PATCH", f"composite/sobjects/{PLAY_OBJECT}")
        assert len(writes) == 7  # 4, then 2 + 2, then 1 + 1 + 1 + 1


def test_adapters_without_play_records_leave_plays_alone(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    run = engine_runtime(redis_url)
    handle(redis_conn, run, learner("p1", "u1@acme.io", "u1"))
    dry = DryRunAdapter(redis_conn, MAPPING, tmp_path / "dry.jsonl")
    assert flush(redis_conn, dry, MAPPING).contacts.synced == 1
    assert plays.dirty_count(redis_conn) == 1  # kept for when Salesforce is configured
    assert ledger.dirty_count(redis_conn) == 0


# -- real workers: events through the queue, flush jobs with the runtime's adapter -----------


@pytest.fixture
def salesforce_runtime(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Runtime]:
    """The runtime the jobs get, and the same settings in the environment for the CLI."""
    env = salesforce_env(redis_url, tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with installed(Runtime.from_settings(Settings.from_env(env))) as run:
        yield run


def test_plays_are_created_then_updated_by_participant_id(
    salesforce_runtime: Runtime, redis_conn: redis.Redis
) -> None:
    events = play_history(6, seed=8)
    first = [e for e in events if e["type"] == "track.started"]
    rest = [e for e in events if e["type"] != "track.started"]
    with FakeSalesforce() as fake:
        assert isinstance(salesforce_runtime.adapter(redis_conn), SalesforceAdapter)
        fake.deploy(package(MAPPING))
        enqueue_all(redis_conn, [(f"a{n}", body) for n, body in enumerate(first)])
        drain(redis_conn)
        created = play_records(fake)
        want = expected_plays(first)
        assert {p: r["Status__c"] for p, r in created.items()} == {p: "Started" for p in want}
        ids = {p: r["Id"] for p, r in created.items()}

        enqueue_all(redis_conn, [(f"b{n}", body) for n, body in enumerate(rest)])
        enqueue_all(redis_conn, [(f"a{n}", body) for n, body in enumerate(first)])  # redelivered
        drain(redis_conn)
        updated = play_records(fake)
        assert {p: r["Id"] for p, r in updated.items()} == ids  # updated in place, no duplicates
        for participant, record in expected_plays(events).items():
            got = updated[participant]
            assert {k: got.get(k) for k in salesforce_fields(record)} == salesforce_fields(
                record
            ), participant
        assert plays.dirty_count(redis_conn) == 0

        before = len(fake.data_calls(contains=PLAY_OBJECT))
        enqueue_all(redis_conn, [(f"c{n}", body) for n, body in enumerate(events)])
        drain(redis_conn)
        assert len(fake.data_calls(contains=PLAY_OBJECT)) == before  # nothing changed: no writes


def test_a_rejected_play_is_requeued_by_the_operator_and_written_once_fixed(
    salesforce_runtime: Runtime, redis_conn: redis.Redis
) -> None:
    with FakeSalesforce() as fake:
        fake.deploy(package(MAPPING))
        fake.record_errors["p1"] = ["FIELD_CUSTOM_VALIDATION_EXCEPTION"] * 10  # a validation rule
        events = learner("p1", "u1@acme.io", "u1")
        enqueue_all(redis_conn, [(f"m{n}", body) for n, body in enumerate(events)])
        drain(redis_conn)
        assert "p1" not in play_records(fake) and plays.dirty_count(redis_conn) == 0
        [failure] = failures.every(redis_conn)
        assert failure.message_id == "play:p1" and failure.kind == "play"
        cli = CliRunner()
        assert "play:p1" in cli.invoke(main, ["failed", "list"]).output
        shown = cli.invoke(main, ["failed", "show", failure.id])
        assert "requeue:   mark the play record for sending again" in shown.output

        requeued = cli.invoke(main, ["failed", "requeue", failure.id])  # before the fix
        assert requeued.exit_code == 0, requeued.output
        assert f"requeued {failure.id} (play)" in requeued.output
        drain(redis_conn)
        [again] = failures.every(redis_conn)  # rejected again, visibly
        assert again.id != failure.id and again.message_id == "play:p1"
        assert "p1" not in play_records(fake)

        fake.record_errors.pop("p1")  # the admin fixes the validation rule
        result = cli.invoke(main, ["failed", "requeue", "--all"])
        assert "1 requeued, 0 not requeueable" in result.output, result.output
        assert plays.dirty(redis_conn, 10) == ["p1"] and failures.every(redis_conn) == []
        drain(redis_conn)  # the flush the requeue scheduled
        want = salesforce_fields(expected_plays(events)["p1"])
        record = play_records(fake)["p1"]
        assert {name: record.get(name) for name in want} == want
        assert record["Lead__c"] == fake.by_email("Lead")["u1@acme.io"]["Id"]
        assert plays.dirty_count(redis_conn) == 0 and failures.every(redis_conn) == []


# -- the plays section of the mapping ----------------------------------------------------------


def sf_mapping(plays_section: str, rules: str = '  "track.*":\n    properties: {A__c: x}\n') -> str:
    return (
        "version: 1\ncrm: salesforce\nobject: auto\n"
        "properties:\n  A__c: {}\n"
        f"events:\n{rules}"
        "ignore: [track.challenge_setup]\n"
        f"salesforce:\n  plays:\n{plays_section}"
    )


def test_the_plays_section_defaults_and_switch() -> None:
    assert (
        parse_mapping(sf_mapping("")).plays
        == parse_mapping(sf_mapping("    enabled: true\n")).plays
    )
    on = parse_mapping(sf_mapping(""))
    assert on.plays is not None and on.plays.completed == ["track.completed"]
    assert parse_mapping(sf_mapping("    enabled: false\n")).plays is None
    assert MAPPING.plays is not None and HUBSPOT.plays is None


@pytest.mark.parametrize(
    ("section", "rules", "message"),
    [
        (
            "    complete: [track.completed]\n",
            None,
            "unknown key 'complete' (did you mean 'completed'?)",
        ),
        ("    stopped: track.stopped\n", None, "salesforce.plays.stopped: expected a list"),
        ("    stopped: ['track stopped']\n", None, "is not a glob"),
        (
            "    completed: [track.challenge_setup]\n",
            None,
            "play records never see 'track.challenge_setup': ignore pattern",
        ),
        (
            "    stopped: [track.stopped]\n",
            "  track.started:\n    properties: {A__c: x}\n",
            "play records never see 'track.stopped': no rule under events matches it",
        ),
    ],
)
def test_the_plays_section_is_validated(section: str, rules: str | None, message: str) -> None:
    text = sf_mapping(section, rules) if rules else sf_mapping(section)
    with pytest.raises(MappingError) as caught:
        parse_mapping(text, "m.yaml")
    assert message in str(caught.value)
    assert "m.yaml:" in str(caught.value)


def test_plays_are_only_for_salesforce_and_typos_warn() -> None:
    hubspot = (
        "version: 1\ncrm: hubspot\nobject: contact\nproperties: {a: {}}\n"
        "events: {track.started: {properties: {a: x}}}\nsalesforce:\n  plays: {}\n"
    )
    with pytest.raises(MappingError, match="only allowed when crm is salesforce"):
        parse_mapping(hubspot)
    warned = parse_mapping(sf_mapping("    stopped: [track.stoped]\n"))
    assert any("did you mean 'track.stopped'" in w for w in warned.warnings)


def round_trips_of_handling(redis_url: str, conn: redis.Redis, learners: int) -> int:
    """Round trips ``handle_batch`` takes for one play event of each of ``learners``."""
    conn.flushdb()
    env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url}
    run = Runtime(Settings.from_env(env), MAPPING)
    entries = [
        Entry(f"{n}-0", f"m{n}", {**play_event("track.started", n), "user_id": f"u{n}",
              "participant_id": f"p{n}", "params": {"email": f"u{n}@acme.io"}})
        for n in range(learners)
    ]  # fmt: skip
    counted = counting_client(redis_url)
    CountingConnection.sent = 0
    assert handle_batch(counted, run, entries) == {"merged": learners}
    assert plays.dirty_count(conn) == learners
    return CountingConnection.sent


def test_a_batch_merges_its_plays_in_the_same_round_trips_whatever_its_size(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    assert round_trips_of_handling(redis_url, redis_conn, 2) == round_trips_of_handling(
        redis_url, redis_conn, 40
    )


def round_trips_of_sending_plays(redis_url: str, conn: redis.Redis, learners: int) -> int:
    """Round trips of the plays part of a flush, for ``learners`` learners with one play each
    (two of them already sent and unchanged since, and their learners written already)."""
    conn.flushdb()
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        handle_learners(conn, engine_runtime(redis_url), learners)
        sent = [f"p{n}" for n in range(2)]
        flush_plays(conn, sf, time.monotonic() + 30)  # learners dirty: nothing sent
        while isinstance(step := flush_batch(conn, sf, MAPPING), Tally) and not step.retry:
            pass  # the learners only
        for participant in sent:  # sent before, unchanged since: settled, not sent again
            found = plays.pending(conn, participant)
            assert found.change is not None
            plays.settle(conn, participant, found.version, found.change.properties)
            plays.mark_dirty(conn, participant)
        counted = counting_client(redis_url)
        CountingConnection.sent = 0
        flushed = flush_plays(counted, sf, time.monotonic() + 30)
        assert flushed.tally.requests == 1 and plays.dirty_count(conn) == 0
        assert len(play_records(fake)) == learners - 2  # the two "sent before" were not
        return CountingConnection.sent


def test_a_batch_of_plays_is_sent_in_the_same_round_trips_whatever_its_size(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    small = round_trips_of_sending_plays(redis_url, redis_conn, 3)
    assert small == round_trips_of_sending_plays(redis_url, redis_conn, 30)
