"""The ``instruqt-crm`` command line, through click's CliRunner, on a real Redis."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import redis
from click.testing import CliRunner, Result
from svix.webhooks import Webhook, WebhookVerificationError
from werkzeug.serving import make_server

from instruqt_crm.cli import main
from instruqt_crm.cli.devstack import DevStack
from instruqt_crm.config import Settings
from instruqt_crm.crm.dryrun import dry_run_records
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.engine import identity, ledger, runtime
from instruqt_crm.engine.queueing import QUEUE_NAME, queue
from instruqt_crm.errors import Category
from instruqt_crm.journal import failures
from instruqt_crm.journal.failures import Kind
from instruqt_crm.ops.examples import example_event, example_types
from instruqt_crm.ops.preview import split_message, stable_id
from instruqt_crm.receiver.app import create_app
from samples.history import deliveries, history
from samples.signing import SECRET
from tests.engine_helpers import (
    drain,
    engine_env,
    engine_runtime,
    enqueue_all,
    inbox_events,
    installed,
)
from tests.fakes.hubspot import FakeHubSpot
from tests.redis_process import free_port
from tests.test_fake_hubspot import create_property

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MAPPING = ROOT / "mappings" / "hubspot.yaml"
PROBLEM_LINE = re.compile(r"^\S+\.yaml:\d+: \S+: .+", re.MULTILINE)


def run(*args: str, input: str | None = None) -> Result:
    """Invoke the CLI in-process (the environment is the test's)."""
    return CliRunner().invoke(main, list(args), input=input)


@pytest.fixture
def env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Engine settings in the environment (dry-run CRM); yields the dry-run output file."""
    monkeypatch.chdir(ROOT)
    for name in ("HUBSPOT_ACCESS_TOKEN", "HUBSPOT_API_BASE", "INSTRUQT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in engine_env(redis_url, tmp_path).items():
        monkeypatch.setenv(name, value)
    with installed(engine_runtime(redis_url, tmp_path)):  # for the jobs drain() runs
        yield tmp_path / "dry-run.jsonl"


@pytest.fixture
def no_secret(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a release step or an operator's shell may be: no webhook secret."""
    monkeypatch.delenv("INSTRUQT_WEBHOOK_SECRET", raising=False)


def review(email: str | None = "ada@example.com", user_id: str = "u-ada") -> dict[str, Any]:
    """A review.created body (with the email in its parameters if given)."""
    body = example_event("review.created", user_id=user_id)
    if email:
        body["params"] = {"email": email}
    return body


def write_jsonl(path: Path, bodies: list[Any]) -> Path:
    path.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    return path


# ------------------------------------------------------------------ help


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_every_command_has_help() -> None:
    paths = list(_commands(main))
    assert {("check",), ("release",), ("preview",), ("replay",), ("status",)} <= set(paths)
    assert ("trace",) in paths
    assert {("failed", "requeue"), ("setup", "hubspot"), ("dev",), ("send-example",)} <= set(paths)
    for path in paths:
        result = run(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output


# ------------------------------------------------------------------ check


def test_check_default_mapping_without_a_webhook_secret(no_secret: None) -> None:
    result = run("check")
    assert result.exit_code == 0, result.output
    assert "mappings/hubspot.yaml: ok" in result.output
    assert "HUBSPOT_ACCESS_TOKEN is not set" in result.output


def test_check_invalid_mapping_prints_file_and_line(no_secret: None, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_MAPPING.read_text().replace("merge: set_once", "merge: sett_once", 1))
    result = run("check", str(bad))
    assert result.exit_code == 1
    assert PROBLEM_LINE.search(result.output), result.output
    assert "did you mean 'set_once'" in result.output


def test_check_missing_file_is_a_usage_error(no_secret: None, tmp_path: Path) -> None:
    result = run("check", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_check_reads_mapping_path_from_the_environment(
    no_secret: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAPPING_PATH", str(tmp_path / "absent.yaml"))
    assert run("check").exit_code == 2


def test_check_with_a_token_reports_missing_properties_then_passes(
    no_secret: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeHubSpot() as fake:
        monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", fake.token)
        monkeypatch.setenv("HUBSPOT_API_BASE", fake.url)
        before = run("check")
        assert before.exit_code == 1
        assert "instruqt_last_track" in before.output
        assert "instruqt-crm setup hubspot" in before.output
        assert fake.token not in before.output
        assert run("setup", "hubspot").exit_code == 0
        after = run("check")
        assert after.exit_code == 0, after.output
        assert "every mapped property exists" in after.output
        assert run("check", "--no-crm").exit_code == 0


def test_check_reports_type_mismatches_as_setup_does(
    no_secret: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reported with the missing properties too (as `setup hubspot --dry-run`), and alone."""
    mismatch = "type mismatch: instruqt_last_review_score: is string, the mapping needs number"
    with FakeHubSpot() as fake:
        monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", fake.token)
        monkeypatch.setenv("HUBSPOT_API_BASE", fake.url)
        create_property(HubSpotAdapter(fake.token, fake.url).client, "instruqt_last_review_score")
        dry = run("setup", "hubspot", "--dry-run")
        both = run("check")
        assert run("setup", "hubspot").exit_code == 1  # creates the others
        result = run("check")
    assert dry.exit_code == both.exit_code == result.exit_code == 1
    assert mismatch in dry.output and mismatch in both.output and mismatch in result.output
    assert "HubSpot: the account lacks 9 mapped properties" in both.output
    assert "Fix these in HubSpot" in result.output


def test_check_with_a_bad_token_fails(no_secret: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHubSpot() as fake:
        monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", "wrong-token")
        monkeypatch.setenv("HUBSPOT_API_BASE", fake.url)
        result = run("check")
    assert result.exit_code == 1
    assert "401" in result.output
    assert "wrong-token" not in result.output


def edited_mapping(tmp_path: Path, *changes: tuple[str, str]) -> Path:
    """The default mapping with each (old, new) text replaced once."""
    text = DEFAULT_MAPPING.read_text()
    for old, new in changes:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "edited.yaml"
    path.write_text(text)
    return path


def test_check_refuses_a_template_field_no_event_of_its_rule_carries(
    no_secret: None, tmp_path: Path
) -> None:
    path = edited_mapping(tmp_path, ('"{{ event.score }}"', '"{{ event.scroe }}"'))
    result = run("check", str(path), "--no-crm")
    assert result.exit_code == 1
    line = next(x for x in result.output.splitlines() if "event.scroe" in x)
    assert re.fullmatch(r"\S+edited\.yaml:\d+: .+", line), line
    assert line.split(": ", 1)[1] == (
        "events.review.*.properties.instruqt_last_review_score: event.scroe: no 'review.*' "
        "event carries it, so this never writes anything (did you mean 'score'?)"
    )
    elsewhere = edited_mapping(tmp_path, ('"{{ event.timestamp }}"', '"{{ event.score }}"'))
    result = run("check", str(elsewhere), "--no-crm")
    assert result.exit_code == 1
    assert "event.score: no 'track.*' event carries it, so this never writes anything " in (
        result.output
    )
    assert "(review.created, review.updated events carry it)" in result.output
    declared = edited_mapping(
        tmp_path,
        ('"{{ event.timestamp }}"', '"{{ event.score }}"'),
        ("skip_developer_plays: true", "skip_developer_plays: true\nextra_event_fields: [score]"),
    )
    assert run("check", str(declared), "--no-crm").exit_code == 0


def test_check_warns_about_a_declared_property_no_rule_writes(
    no_secret: None, tmp_path: Path
) -> None:
    path = edited_mapping(
        tmp_path,
        ('      instruqt_last_review_track: "{{ event.track_slug or event.track_id }}"\n', ""),
    )
    result = run("check", str(path), "--no-crm")
    assert result.exit_code == 0, result.output
    [line] = [x for x in result.output.splitlines() if x.endswith("(warning)")]
    assert line.split(": ", 1)[1] == (
        "properties.instruqt_last_review_track: no rule under events writes it: it is never "
        "sent (a rule could, or drop it) (warning)"
    )


def test_check_says_what_a_changed_merge_policy_or_type_does_to_stored_values(
    env: Path, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    body = example_event("track.started", user_id="u1", email="ann@example.com")
    enqueue_all(redis_conn, [("msg_1", body)])
    drain(redis_conn)
    same = run("check", "--no-crm")
    assert same.exit_code == 0, same.output
    assert "stored values: no property's merge policy or type changes" in same.output
    path = edited_mapping(
        tmp_path,
        ('every track started."\n    merge: union', 'every track started."\n    merge: latest'),
        (
            "instruqt_first_activity_at:\n    type: datetime",
            "instruqt_first_activity_at:\n    type: date",
        ),
    )
    result = run("check", str(path), "--no-crm")
    assert result.exit_code == 0, result.output
    warnings = [x for x in result.output.splitlines() if x.startswith("stored values:")]
    assert warnings == [
        "stored values: instruqt_first_activity_at: its type changes from datetime to date: "
        "stored values are read as date and sent with each contact's next change; a value that "
        "is not a date is not sent (the CRM keeps what it has until an event writes one) "
        "(warning)",
        "stored values: instruqt_tracks_started: its merge changes from 'union' to 'latest': "
        "values stored under 'union' are dropped, not converted. Each contact keeps its CRM "
        "value until an event writes the property again; that sends the value of the newest "
        "event merged after the change (earlier events no longer count) (warning)",
    ]


# ------------------------------------------------------------------ setup


def test_setup_without_a_token_is_a_usage_error(no_secret: None) -> None:
    result = run("setup", "hubspot")
    assert result.exit_code == 2
    assert result.output.startswith("Error: HUBSPOT_ACCESS_TOKEN is not set")
    assert "Usage" not in result.output


def test_setup_dry_run_creates_nothing_and_setup_is_idempotent(
    no_secret: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeHubSpot() as fake:
        monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", fake.token)
        monkeypatch.setenv("HUBSPOT_API_BASE", fake.url)
        known = set(fake.properties)
        dry = run("setup", "hubspot", "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert "would create (10)" in dry.output
        assert "instruqt_last_track" in dry.output
        assert set(fake.properties) == known
        assert "instruqt" not in fake.groups

        first = run("setup", "hubspot")
        assert first.exit_code == 0, first.output
        assert "created (10)" in first.output
        assert "instruqt: created group" in first.output
        assert fake.properties["instruqt_last_track"]["groupName"] == "instruqt"
        assert fake.properties["instruqt_last_review_score"]["type"] == "number"

        second = run("setup", "hubspot")
        assert second.exit_code == 0, second.output
        assert "created (0)" in second.output
        assert "exist (10)" in second.output
        assert "instruqt: group exists" in second.output


def test_setup_reports_type_mismatches(no_secret: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHubSpot() as fake:
        monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", fake.token)
        monkeypatch.setenv("HUBSPOT_API_BASE", fake.url)
        create_property(HubSpotAdapter(fake.token, fake.url).client, "instruqt_last_review_score")
        result = run("setup", "hubspot")
        assert result.exit_code == 1
        assert "type mismatch: instruqt_last_review_score: is string" in result.output
        assert "instruqt_last_track" in fake.properties  # the others were still created


def test_setup_refuses_a_salesforce_mapping(
    no_secret: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", "token")
    result = run("setup", "hubspot", "--mapping", "mappings/salesforce.yaml")
    assert result.exit_code == 2
    assert "salesforce" in result.output


# ------------------------------------------------------------------ preview


def test_preview_of_the_example_events(no_secret: None, tmp_path: Path) -> None:
    bodies = [example_event(kind, email="Ada@Example.com") for kind in example_types()]
    events = write_jsonl(tmp_path / "examples.jsonl", bodies)
    result = run("preview", str(events))
    assert result.exit_code == 0, result.output
    assert "ada@example.com" in result.output
    assert "instruqt_tracks_completed_count" in result.output
    assert "ignored by the mapping: sandbox.cleaned" in result.output

    as_json = json.loads(run("preview", str(events), "--json").output)
    (contact,) = as_json["contacts"]
    assert contact["email"] == "ada@example.com"
    assert contact["properties"]["instruqt_last_review_score"] == 5
    assert contact["properties"]["instruqt_tracks_completed_count"] == 1
    # the latest track events are challenge events, which carry no slug and leave it alone
    assert contact["properties"]["instruqt_last_track"] == "getting-started-with-kubernetes"
    assert as_json["waiting_for_identity"] == []
    assert {item["type"] for item in as_json["ignored"]} == {
        t for t in example_types() if t.startswith("sandbox.") or t.endswith("cleanup")
    } | {"track.challenge_setup", "track.sandbox_cleaned"}
    assert as_json["failed"] == []


def test_preview_merges_like_the_ledger(no_secret: None, tmp_path: Path) -> None:
    older = example_event("track.completed", user_id="u1", track_slug="old")
    older["timestamp"] = "2026-01-01T00:00:00Z"
    newer = example_event("track.completed", user_id="u1", track_slug="new")
    newer["timestamp"] = "2026-02-01T00:00:00Z"
    single = tmp_path / "one.json"
    single.write_text(json.dumps(newer))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([older, {"type": "brand.new", "user_id": "u1"}]))
    result = run("preview", str(single), str(listed), "--email", "bo@example.com", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    values = data["contacts"][0]["properties"]
    assert values["instruqt_last_track"] == "new"  # by event time, not file order
    assert values["instruqt_tracks_completed"] == "new;old"
    assert values["instruqt_tracks_completed_count"] == 2
    assert values["instruqt_first_activity_at"] == "2026-01-01T00:00:00.000Z"
    assert data["unknown"] == [{"where": f"{listed}[1]", "type": "brand.new"}]


def test_preview_without_an_email_would_wait(no_secret: None, tmp_path: Path) -> None:
    events = write_jsonl(tmp_path / "e.jsonl", [example_event("track.started", user_id="u9")])
    result = run("preview", str(events))
    assert result.exit_code == 0
    assert "unknown — would wait for identity  (user u9; 1 event)" in result.output


def test_preview_and_replay_refuse_a_file_that_is_not_text(no_secret: None, tmp_path: Path) -> None:
    binary = tmp_path / "e.jsonl"
    binary.write_bytes(b'{"type": "track.started"}\n\xff\xfe\n')
    for command in ("preview", "replay"):
        result = run(command, str(binary))
        assert result.exit_code == 1
        assert f"{binary}:2: not UTF-8 text" in result.output


def test_delivery_ids_from_fields_svix_messages_or_content() -> None:
    body = {"type": "review.created", "id": "review-7"}
    assert split_message(body) == (body, None)  # a review's own id is no delivery id
    assert split_message({**body, "svix_id": "msg_1"})[1] == "msg_1"
    assert split_message({**body, "id": "msg_2"})[1] == "msg_2"
    assert split_message(body, "id") == (body, "review-7")
    wrapped = {"id": "msg_3", "eventType": "review.created", "payload": body}
    assert split_message(wrapped) == (body, "msg_3")
    assert stable_id(body) == stable_id(dict(reversed(list(body.items()))))
    assert stable_id(body) != stable_id({**body, "id": "review-8"})


def test_preview_bad_input(no_secret: None, tmp_path: Path) -> None:
    events = tmp_path / "e.jsonl"
    events.write_text(json.dumps(review()) + "\nnot json\n" + json.dumps({"no": "type"}) + "\n")
    result = run("preview", str(events))
    assert result.exit_code == 1
    assert f"{events}:2: not JSON" in result.output
    assert f"{events}:3: body must have a string 'type'" in result.output
    assert run("preview", str(tmp_path / "missing.json")).exit_code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ncrm: hubspot\nobject: contact\nproperties: {}\nevents: {x: 1}\n")
    invalid = run("preview", str(events), "--mapping", str(bad))
    assert invalid.exit_code == 1
    assert PROBLEM_LINE.search(invalid.output), invalid.output


# ------------------------------------------------------------------ replay


def test_replay_queues_new_events_once_and_reports_bad_lines(
    no_secret: None, tmp_path: Path, redis_conn: redis.Redis
) -> None:
    first, second = review(), example_event("track.started", email="bo@example.com")
    lines = [
        json.dumps(first),
        json.dumps({**second, "svix_id": "msg_abc"}),
        "",
        "{broken",
        json.dumps(first),  # same content: same derived id
        json.dumps({"id": "msg_abc", "eventType": "track.started", "payload": second}),
        json.dumps(["not", "an", "event"]),
    ]
    exported = tmp_path / "export.jsonl"
    exported.write_text("\n".join(lines) + "\n")
    result = run("replay", str(exported))
    assert result.exit_code == 1
    assert "2 queued, 2 duplicate(s) skipped, 2 invalid" in result.output
    assert f"{exported}:4: not JSON" in result.output
    assert f"{exported}:7: body must be a JSON object" in result.output
    kept = [message_id for message_id, _ in inbox_events(redis_conn)]
    assert len(kept) == 2 and "msg_abc" in kept

    clean = write_jsonl(tmp_path / "clean.jsonl", [first, second])
    again = run("replay", str(clean))
    assert again.exit_code == 0, again.output
    assert "1 queued, 1 duplicate(s) skipped, 0 invalid" in again.output
    assert len(inbox_events(redis_conn)) == 3  # `second` had no svix_id here


def test_replay_id_field_and_processing(env: Path, tmp_path: Path, redis_conn: redis.Redis) -> None:
    bodies = [{**review(), "delivery": "d1"}, {**review(), "delivery": "d1"}]
    exported = write_jsonl(tmp_path / "e.jsonl", bodies)
    result = run("replay", str(exported), "--id-field", "delivery")
    assert result.exit_code == 0, result.output
    assert "1 queued, 1 duplicate(s) skipped" in result.output
    drain(redis_conn)
    assert dry_run_records(redis_conn)["ada@example.com"]["instruqt_last_review_score"] == 5


def test_replay_missing_file(no_secret: None, tmp_path: Path) -> None:
    assert run("replay", str(tmp_path / "nope.jsonl")).exit_code == 2


# ------------------------------------------------------------------ failed


def broken_mapping(tmp_path: Path) -> Path:
    """The default mapping, but a review's score comes from its text (fails: not a number)."""
    path = tmp_path / "broken.yaml"
    text = DEFAULT_MAPPING.read_text()
    assert '"{{ event.score }}"' in text
    path.write_text(text.replace('"{{ event.score }}"', '"{{ event.content }}"'))
    return path


def test_failed_list_show_requeue_after_fixing_the_mapping(
    env: Path, tmp_path: Path, redis_url: str, redis_conn: redis.Redis
) -> None:
    broken = broken_mapping(tmp_path)
    runtime.install(engine_runtime(redis_url, tmp_path, MAPPING_PATH=str(broken)))
    enqueue_all(redis_conn, [("msg_review1", review())])
    drain(redis_conn)
    (failure,) = failures.recent(redis_conn)
    assert failure.category == "mapping"

    listed = run("failed", "list")
    assert listed.exit_code == 0, listed.output
    assert "mapping (1)" in listed.output
    assert failure.id in listed.output
    as_json = json.loads(run("failed", "list", "--json").output)
    assert as_json["mapping"][0]["message_id"] == "msg_review1"
    assert "mapping" not in json.loads(run("failed", "list", "--category", "auth", "--json").output)

    shown = run("failed", "show", failure.id)
    assert shown.exit_code == 0
    assert failure.reason in shown.output
    assert '"type": "review.created"' in shown.output
    assert "process the event again" in shown.output
    assert run("failed", "show", "no-such-id").exit_code == 1
    assert run("failed", "requeue", "no-such-id").exit_code == 1
    assert run("failed", "requeue").exit_code == 2
    assert run("failed", "requeue", failure.id, "--all").exit_code == 2

    runtime.install(engine_runtime(redis_url, tmp_path))  # the operator fixes the mapping
    requeued = run("failed", "requeue", failure.id)
    assert requeued.exit_code == 0, requeued.output
    assert "(event)" in requeued.output
    assert failures.get(redis_conn, failure.id) is None
    drain(redis_conn)
    assert failures.recent(redis_conn) == []
    assert dry_run_records(redis_conn)["ada@example.com"]["instruqt_last_review_score"] == 5


def test_requeue_a_rejected_contact_sends_it_again(env: Path, redis_conn: redis.Redis) -> None:
    enqueue_all(redis_conn, [("msg_1", review(email="ada@example.рф"))])
    drain(redis_conn)
    (failure,) = failures.recent(redis_conn)
    assert failure.category == "validation"
    assert failure.kind == "contact"
    result = run("failed", "requeue", "--reason", "INVALID EMAIL")
    assert result.exit_code == 0, result.output
    assert "1 requeued, 0 not requeueable" in result.output
    assert ledger.dirty(redis_conn, 10) == ["ada@example.рф"]
    assert queue(QUEUE_NAME, redis_conn).count == 1
    drain(redis_conn)
    (again,) = failures.recent(redis_conn)  # the dry-run CRM rejects it again, visibly
    assert again.id != failure.id and again.reason == failure.reason


def test_requeue_all_skips_what_cannot_be_requeued(env: Path, redis_conn: redis.Redis) -> None:
    failures.record(redis_conn, Kind.BODY, "invalid_body", "not JSON", "msg_x", b"{oops")
    failures.record(
        redis_conn, Kind.EVENT, "identity", "no email", "msg_y", json.dumps(review(email=None))
    )
    result = run("failed", "requeue", "--all")
    assert result.exit_code == 0, result.output
    assert "1 requeued, 1 not requeueable" in result.output
    assert [f.category for f in failures.recent(redis_conn)] == ["invalid_body"]
    (only,) = failures.recent(redis_conn)
    single = run("failed", "requeue", only.id)
    assert single.exit_code == 1
    assert "cannot requeue" in single.output
    assert queue(QUEUE_NAME, redis_conn).count == 1


def test_failed_purge(env: Path, redis_conn: redis.Redis) -> None:
    failures.record(redis_conn, Kind.BODY, "invalid_body", "not JSON", "msg_x", b"{oops")
    failures.record(
        redis_conn, Kind.EVENT, "mapping", "bad template", "msg_y", json.dumps(review())
    )
    refused = run("failed", "purge", input="n\n")
    assert refused.exit_code == 1
    assert len(failures.recent(redis_conn)) == 2
    some = run("failed", "purge", "--category", "mapping", "--yes")
    assert some.exit_code == 0
    assert "purged 1 failure(s)" in some.output
    assert [f.category for f in failures.recent(redis_conn)] == ["invalid_body"]
    assert run("failed", "purge", "--yes").exit_code == 0
    assert failures.recent(redis_conn) == []
    assert failures.counts(redis_conn) == {"invalid_body": 1, "mapping": 1}  # history stays
    assert run("failed", "purge", "--category", "nonsense", "--yes").exit_code == 2


# ------------------------------------------------------------------ trace and status


def test_trace_after_processing_a_history(env: Path, redis_conn: redis.Redis) -> None:
    events = history(3, seed=11)
    enqueue_all(redis_conn, deliveries(events, seed=2))
    enqueue_all(redis_conn, [("msg_wait", example_event("track.started", user_id="u-nomail"))])
    drain(redis_conn)

    result = run("trace", "learner00000@example.com")
    assert result.exit_code == 0, result.output
    assert "Learner learner00000@example.com (Instruqt user user00000)" in result.output
    assert " event " in result.output and " sent " in result.output
    assert '"user00000"  (in the CRM)' in result.output

    data = json.loads(run("trace", "user00000", "--json").output)
    assert data["email"] == "learner00000@example.com"
    assert {e["kind"] for e in data["trail"]} >= {"event", "sent"}
    assert data["ledger"]["values"]["instruqt_user_id"] == "user00000"
    assert data["ledger"]["pending"] == {}
    assert data["waiting"] == []

    waiting = run("trace", "u-nomail")
    assert waiting.exit_code == 0, waiting.output
    assert "Waiting for the learner's email: 1 event(s)" in waiting.output
    assert "msg_wait  track.started" in waiting.output
    assert identity.parked_count(redis_conn) == 1  # looking does not release anything

    unknown = run("trace", "nobody@example.com")
    assert unknown.exit_code == 1
    assert "nothing known about nobody@example.com" in unknown.output


def test_trace_shows_the_crms_value_when_a_mapping_change_dropped_the_stored_ones(
    env: Path, redis_conn: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = example_event("track.started", user_id="u1", email="ann@example.com")
    enqueue_all(redis_conn, [("msg_1", body)])
    drain(redis_conn)
    changed = DEFAULT_MAPPING.read_text().replace(
        'Sorted, ;-separated slugs of every track started."\n    merge: union',
        'Sorted, ;-separated slugs of every track started."\n    merge: latest',
    )
    assert "merge: latest" in changed
    monkeypatch.setenv("MAPPING_PATH", str(tmp_path / "latest.yaml"))
    (tmp_path / "latest.yaml").write_text(changed)

    result = run("trace", "ann@example.com")
    assert result.exit_code == 0, result.output
    [line] = [x for x in result.output.splitlines() if x.split()[:1] == ["instruqt_tracks_started"]]
    assert line.split(maxsplit=1)[1] == (
        '"getting-started-with-kubernetes"  (in the CRM; no stored value: the next event '
        "writing it sets it)"
    )
    assert "null" not in result.output
    data = json.loads(run("trace", "ann@example.com", "--json").output)
    assert data["ledger"]["crm"]["instruqt_tracks_started"] == "getting-started-with-kubernetes"


def test_status_json_has_every_figure(env: Path, redis_conn: redis.Redis) -> None:
    enqueue_all(redis_conn, deliveries(history(2, seed=4), seed=1))
    enqueue_all(redis_conn, [("msg_wait", example_event("track.started", user_id="u-nomail"))])
    drain(redis_conn)
    failures.record(redis_conn, Kind.BODY, "invalid_body", "not JSON", "msg_x", b"{oops")
    enqueue_all(redis_conn, [("msg_later", review())])

    result = run("status", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) >= {
        "queues",
        "contacts",
        "identity",
        "failures",
        "counters",
        "last_flush",
        "crm",
        "workers",
        "mapping",
    }
    assert data["queues"]["jobs"]["queued"] == 1
    assert set(data["queues"]["jobs"]) == {"queued", "scheduled", "started", "failed"}
    assert data["contacts"]["dirty"] == 0
    assert data["identity"] == {"waiting_learners": 1, "waiting_events": 1}
    assert data["failures"]["open"] == {"invalid_body": 1}
    assert data["counters"]["events"]["merged"] > 0
    assert data["counters"]["events"]["parked"] == 1
    assert data["last_flush"]["at"] is not None
    assert data["crm"]["crm"] == "hubspot" and data["crm"]["adapter"] == "dry-run"
    assert "budget" not in data["crm"]  # the dry run spends no request budget

    text = run("status")
    assert text.exit_code == 0
    assert "Queue jobs    1 queued" in text.output
    assert "invalid_body 1" in text.output


def test_status_needs_no_webhook_secret_but_a_reachable_redis(
    no_secret: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("status").exit_code == 0
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    down = run("status")
    assert down.exit_code == 1
    assert "cannot reach Redis" in down.output
    monkeypatch.setenv("REDIS_URL", "http://nope")
    assert run("status").exit_code == 2


# ------------------------------------------------------------------ send-example


@pytest.fixture
def receiver(env: Path, redis_conn: redis.Redis) -> Iterator[str]:
    """The Flask receiver on a real HTTP server thread; yields its webhook URL."""
    app = create_app(Settings.from_env(), conn=redis_conn)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/webhooks/instruqt"
    server.shutdown()
    thread.join(timeout=5)


def test_send_example_is_signed_and_accepted(receiver: str, redis_conn: redis.Redis) -> None:
    result = run("send-example", "track.completed", "--url", receiver, "--email", "a@example.com")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("track.completed: 202 ")
    assert '"status":"queued"' in result.output
    ((message_id, body),) = inbox_events(redis_conn)
    assert message_id.startswith("msg_")
    assert body["type"] == "track.completed"
    assert body["custom_parameters"] == {"email": "a@example.com"}

    everything = run("send-example", "--all", "--url", receiver)
    assert everything.exit_code == 0, everything.output
    assert everything.output.count(": 202 ") == len(example_types())


def test_send_example_with_the_wrong_secret_is_not_accepted(
    receiver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INSTRUQT_WEBHOOK_SECRET", "whsec_" + "b3RoZXItc2VjcmV0LXZhbHVl")
    result = run("send-example", "track.started", "--url", receiver)
    assert result.exit_code == 1
    assert "track.started: 401" in result.output
    assert "1 event(s) not accepted" in result.output


def test_send_example_signs_like_svix() -> None:
    from instruqt_crm.cli.local import sign_body

    body = json.dumps(example_event("track.started")).encode()
    headers = sign_body(SECRET, body, "msg_1")
    Webhook(SECRET).verify(body, headers)  # raises if the signature is wrong
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body + b" ", headers)


def test_send_example_usage_errors(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("send-example").exit_code == 2
    monkeypatch.delenv("INSTRUQT_WEBHOOK_SECRET")
    result = run("send-example", "track.started", "--url", "http://127.0.0.1:1/x")
    assert result.exit_code == 2
    assert "INSTRUQT_WEBHOOK_SECRET" in result.output


def test_settings_errors_are_one_line_without_usage_text(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INSTRUQT_WEBHOOK_SECRET")
    missing = run("send-example", "track.started")
    assert missing.exit_code == 2
    assert missing.output.startswith("Error: INSTRUQT_WEBHOOK_SECRET: missing;")
    assert len(missing.output.strip().splitlines()) == 1
    monkeypatch.setenv("HUBSPOT_REQUESTS_PER_10S", "0")
    malformed = run("status")
    assert malformed.exit_code == 2
    assert malformed.output.strip().splitlines() == [
        "Error: HUBSPOT_REQUESTS_PER_10S: expected at least 1, got '0'"
    ]


def test_send_example_suggests_the_event_type_meant(env: Path) -> None:
    result = run("send-example", "track.strated", "--url", "http://127.0.0.1:1/x")
    assert result.exit_code == 2
    assert "unknown event type 'track.strated' (did you mean 'track.started'?)" in result.output
    assert "did you mean" not in run("send-example", "zzz").output


def test_send_example_email_identifies_a_review_alone(
    receiver: str, redis_conn: redis.Redis, env: Path
) -> None:
    result = run(
        "send-example",
        "review.created",
        "--url",
        receiver,
        "--email",
        "ada@example.com",
        "--user-id",
        "u-who-only-reviewed",
    )
    assert result.exit_code == 0, result.output
    ((_, body),) = inbox_events(redis_conn)
    assert body["custom_parameters"] == {"email": "ada@example.com"}
    drain(redis_conn)
    assert dry_run_records(redis_conn)["ada@example.com"]["instruqt_last_review_score"] == 5


def test_send_example_says_whether_dev_runs_and_how_to_pass_the_url(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no `dev` started from here
    url = f"http://127.0.0.1:{free_port()}/webhooks/instruqt"
    refused = run("send-example", "track.started", "--url", url)
    assert refused.exit_code == 1
    assert refused.output.splitlines() == [
        f"Error: cannot reach {url}: connection refused. instruqt-crm dev is not running "
        "here: start it in another shell, or pass your receiver's webhook URL with --url"
    ]
    for noise in ("urllib3", "HTTPConnection", "Max retries", "Traceback"):
        assert noise not in refused.output

    dev_url = "http://127.0.0.1:8123/webhooks/instruqt"
    DevStack({}, print).remember(dev_url)  # as a running `dev` leaves word in var/
    hinted = run("send-example", "track.started", "--url", url)
    assert f"instruqt-crm dev is running at {dev_url}: pass --url {dev_url}" in hinted.output

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # a `dev` killed outright leaves its word behind
    (tmp_path / "var/dev.json").write_text(json.dumps({"pid": ended.pid, "url": dev_url}))
    assert "dev is not running here" in run("send-example", "track.started", "--url", url).output


def test_failed_show_takes_the_events_message_id(
    env: Path, tmp_path: Path, redis_url: str, redis_conn: redis.Redis
) -> None:
    runtime.install(engine_runtime(redis_url, tmp_path, MAPPING_PATH=str(broken_mapping(tmp_path))))
    enqueue_all(redis_conn, [("msg_review7", review())])
    drain(redis_conn)
    (failure,) = failures.recent(redis_conn)
    by_message = run("failed", "show", "msg_review7")
    assert by_message.exit_code == 0, by_message.output
    assert by_message.output == run("failed", "show", failure.id).output
    assert json.loads(run("failed", "show", "msg_review7", "--json").output)["id"] == failure.id
    missing = run("failed", "show", "msg_nope")
    assert missing.exit_code == 1
    assert "no failure with id or message id 'msg_nope'" in missing.output

    for _ in range(2):
        failures.record(redis_conn, Kind.FLUSH, Category.AUTH, "token refused", "flush", "{}")
    several = run("failed", "show", "flush")
    assert several.exit_code == 1
    assert "message 'flush' has 2 failures:" in several.output
