"""Skipping by condition: developer plays (by default) and a mapping's own `skip:` conditions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
import responses

from instruqt_crm.crm.dryrun import dry_run_records
from instruqt_crm.engine import identity, ledger
from instruqt_crm.engine.handling import handle_batch
from instruqt_crm.engine.inbox import Entry
from instruqt_crm.events import parse_event
from instruqt_crm.journal import counters, trail
from instruqt_crm.mapping import MappingError, load_mapping, parse_mapping
from instruqt_crm.ops import metrics, preview, status
from instruqt_crm.ops.examples import example_event
from tests.engine_helpers import (
    CountingConnection,
    counting_client,
    drain,
    engine_runtime,
    enqueue_all,
    installed,
    merged_ids,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "mappings" / "hubspot.yaml"
GRAPHQL = "https://instruqt.test/graphql"


def play(user_id: str, email: str | None, developer: bool, kind: str = "track.started") -> dict:
    """An event of a play, as Instruqt sends it (developer play or not)."""
    body = example_event(kind, user_id=user_id, email=email)
    body["is_developer_play"] = developer
    return body


def edited(extra: str) -> str:
    """The default mapping with ``extra`` YAML: a skip_developer_plays line replaces its own."""
    text = DEFAULT.read_text()
    if extra.startswith("skip_developer_plays:"):
        return text.replace("skip_developer_plays: true\n", extra)
    return text + "\n" + extra


def with_skip(tmp_path: Path, extra: str) -> Path:
    """A mapping file: the default one, ``edited``."""
    path = tmp_path / "mapping.yaml"
    path.write_text(edited(extra))
    return path


def test_the_shipped_mappings_skip_developer_plays() -> None:
    for name in ("hubspot.yaml", "salesforce.yaml"):
        assert load_mapping(ROOT / "mappings" / name).skip_developer_plays


@responses.activate
def test_a_developer_play_is_skipped_counted_and_traced_never_looked_up(
    engine: Path, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """A developer play writes nothing and costs no Instruqt lookup, even for a learner whose
    email is unknown; it shows in the counters, the metrics, status and the learner's trail."""
    events = [
        ("m1", play("u-author", "author@example.com", developer=True)),
        ("m2", play("u-author", None, developer=True, kind="track.completed")),
        ("m3", play("u-learner", "learner@example.com", developer=False)),
        ("m4", play("u-nobody", None, developer=True)),
    ]
    enqueue_all(redis_conn, events)
    responses.post(GRAPHQL, json={"data": {"user": None}})  # Instruqt knows none of them
    lookups = {
        "INSTRUQT_API_KEY": "k",
        "INSTRUQT_TEAM_SLUG": "acme",
        "INSTRUQT_GRAPHQL_URL": GRAPHQL,
    }
    run = engine_runtime(redis_url, tmp_path, **lookups)
    with installed(run):
        drain(redis_conn)
    asked = [json.loads(call.request.body)["variables"]["userID"] for call in responses.calls]
    assert asked == ["u-learner"]  # none for the author nor the unknown one
    assert set(dry_run_records(redis_conn)) == {"learner@example.com"}
    assert ledger.cells(redis_conn, "author@example.com") == {}
    stats = counters.stats(redis_conn)
    assert stats["skipped"] == {"developer_play": 3}
    assert stats["events"]["skipped"] == 3 and stats["events"]["merged"] == 1
    exposed = metrics.render(redis_conn).decode()
    assert 'instruqt_crm_events_skipped_total{reason="developer_play"} 3.0' in exposed
    lines = status.render(status.collect(redis_conn, run))
    assert "Skipped       by mapping conditions: developer_play 3" in lines
    kinds = [
        (entry["kind"], entry.get("reason"))
        for entry in trail.entries(redis_conn, "author@example.com")
    ]
    assert kinds == [("skipped", "developer_play")]  # m1: the one whose email is known


def test_a_mapping_may_sync_developer_plays(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    path = with_skip(tmp_path, "skip_developer_plays: false\n")
    enqueue_all(redis_conn, [("m1", play("u-author", "author@example.com", developer=True))])
    with installed(engine_runtime(redis_url, tmp_path, MAPPING_PATH=str(path))):
        drain(redis_conn)
    assert set(dry_run_records(redis_conn)) == {"author@example.com"}


def test_a_skip_condition_skips_by_what_the_event_says(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    path = with_skip(tmp_path, "skip:\n  staff: \"{{ email.endswith('@acme.io') }}\"\n")
    events = [
        ("m1", play("u1", "ada@acme.io", developer=False)),
        ("m2", play("u2", "bo@example.com", developer=False)),
    ]
    enqueue_all(redis_conn, events)
    with installed(engine_runtime(redis_url, tmp_path, MAPPING_PATH=str(path))):
        drain(redis_conn)
    assert set(dry_run_records(redis_conn)) == {"bo@example.com"}
    assert counters.stats(redis_conn)["skipped"] == {"staff": 1}


def test_preview_lists_skipped_events(tmp_path: Path) -> None:
    mapping = load_mapping(DEFAULT)
    items = [
        preview.Item("e1", play("u1", "a@example.com", developer=True), "m1"),
        preview.Item("e2", play("u2", "b@example.com", developer=False), "m2"),
    ]
    result = preview.preview(mapping, items)
    assert result.skipped == [("e1", "developer_play")]
    assert list(result.contacts) == ["b@example.com"]
    lines = preview.render(result, mapping)
    assert "2 event(s): 1 mapped, 0 ignored, 0 unknown, 1 skipped, 0 failed" in lines
    assert "  skipped by a mapping condition: developer_play" in lines


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("skip:\n  Staff Members: '{{ true }}'\n", "use lowercase letters, digits and _"),
        ("skip:\n  developer_play: '{{ true }}'\n", "use skip_developer_plays instead"),
        ("skip:\n  broken: '{{ email ! }}'\n", "skip.broken"),
        ("skip_developer_plays: maybe\n", "skip_developer_plays"),
    ],
)
def test_skip_settings_are_checked_at_load(extra: str, message: str) -> None:
    with pytest.raises(MappingError) as caught:
        parse_mapping(edited(extra))
    assert message in str(caught.value)


def test_a_skip_condition_sees_instruqts_email_before_the_parameters(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """The trusted email decides: a learner cannot be skipped (nor kept) by typing an address."""
    path = with_skip(tmp_path, "skip:\n  staff: \"{{ email.endswith('@acme.io') }}\"\n")
    staff = identity.Learner("ada@acme.io", "instruqt")
    identity.remember(redis_conn, "u1", staff, identity.CACHE_TTL)
    enqueue_all(redis_conn, [("m1", play("u1", "ada@gmail.example", developer=False))])
    with installed(engine_runtime(redis_url, tmp_path, MAPPING_PATH=str(path))):
        drain(redis_conn)
    assert dry_run_records(redis_conn) == {}
    assert counters.stats(redis_conn)["skipped"] == {"staff": 1}


def test_developer_plays_that_waited_for_an_email_stay_skipped_when_released(
    engine: Path, redis_conn: redis.Redis
) -> None:
    waiting = play("u1", None, developer=True)
    identity.park(redis_conn, parse_event("m0", waiting))  # parked before plays were skipped
    enqueue_all(redis_conn, [("m1", play("u1", "ada@example.com", developer=False))])
    drain(redis_conn)
    assert identity.parked_events(redis_conn, "u1") == []
    assert merged_ids(redis_conn, "ada@example.com") == {"m1"}
    assert counters.stats(redis_conn)["skipped"] == {"developer_play": 1}


def test_skipped_events_cost_no_round_trip_each(redis_url: str, redis_conn, tmp_path) -> None:
    run = engine_runtime(redis_url, tmp_path)

    def round_trips(count: int) -> int:
        redis_conn.flushdb()
        entries = [
            Entry(f"{n}-0", f"m{n}", play(f"u{n}", None, developer=True)) for n in range(count)
        ]
        counted = counting_client(redis_url)
        CountingConnection.sent = 0
        handle_batch(counted, run, entries)
        return CountingConnection.sent

    assert round_trips(2) == round_trips(20)
