"""The sync engine end to end on the dry-run CRM: mapping, identity, ledger, flush."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from instruqt_crm import keys
from instruqt_crm.crm.dryrun import dry_run_records
from instruqt_crm.engine import identity, ledger
from instruqt_crm.journal import failures
from samples.history import deliveries, expected_records, history
from tests.engine_helpers import (
    drain,
    dry_run_batches,
    engine_runtime,
    enqueue_all,
    installed,
    merged_ids,
)


def started(user_id: str, email: str | None = None, **extra: object) -> dict[str, object]:
    """A track.started body for one learner (email in the custom parameters if given)."""
    body: dict[str, object] = {
        "type": "track.started",
        "user_id": user_id,
        "track_slug": "t",
        "timestamp": "2026-11-01T10:00:00Z",
        **extra,
    }
    if email:
        body["params"] = {"email": email}
    return body


def stats(conn: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in conn.hgetall(keys.STATS).items()}


def test_history_shuffled_and_duplicated_gives_the_data_model(
    engine: Path, redis_conn: redis.Redis
) -> None:
    events = history(30)
    accepted = enqueue_all(redis_conn, deliveries(events))
    assert accepted == len(events)
    drain(redis_conn)
    assert dry_run_records(redis_conn) == expected_records(events)
    assert ledger.dirty_count(redis_conn) == 0
    assert identity.parked_count(redis_conn) == 0


def test_same_events_under_new_ids_change_nothing(engine: Path, redis_conn: redis.Redis) -> None:
    events = history(5)
    enqueue_all(redis_conn, ((f"a{n}", e) for n, e in enumerate(events)))
    drain(redis_conn)
    batches = len(dry_run_batches(engine))
    enqueue_all(redis_conn, ((f"b{n}", e) for n, e in enumerate(events)))
    drain(redis_conn)
    assert len(dry_run_batches(engine)) == batches, "no change must mean no request"
    assert dry_run_records(redis_conn) == expected_records(events)


def test_unknown_and_ignored_types_are_counted_not_failed(
    engine: Path, redis_conn: redis.Redis
) -> None:
    enqueue_all(
        redis_conn,
        [
            ("m1", {"type": "sandbox.created", "user_id": "u"}),
            ("m2", {"type": "brand.new", "user_id": "u"}),
        ],
    )
    drain(redis_conn)
    counted = stats(redis_conn)
    assert counted["events:skipped:sandbox.created"] == 1
    assert counted["events:unknown:brand.new"] == 1
    assert failures.recent(redis_conn) == []


def test_event_without_email_waits_and_is_released_by_invite_claimed(
    engine: Path, redis_conn: redis.Redis
) -> None:
    enqueue_all(
        redis_conn,
        [
            (
                "m1",
                started(
                    "anon1", track_slug="intro-k8s", timestamp="2026-11-01T10:00:00.123456789Z"
                ),
            )
        ],
    )
    drain(redis_conn)
    assert identity.parked_count(redis_conn) == 1
    assert dry_run_records(redis_conn) == {}
    claimed = {
        "type": "invite.claimed",
        "user_id": "anon1",
        "invite_id": "inv",
        "params": {"email": "Ada@Example.com"},
        "timestamp": "2026-11-01T09:00:00Z",
    }
    enqueue_all(redis_conn, [("m2", claimed)])
    drain(redis_conn)
    assert identity.parked_count(redis_conn) == 0
    record = dry_run_records(redis_conn)["ada@example.com"]
    assert record["instruqt_tracks_started"] == "intro-k8s"
    assert record["instruqt_first_activity_at"] == "2026-11-01T09:00:00.000Z"
    assert record["instruqt_last_activity_at"] == "2026-11-01T10:00:00.123Z"


def test_event_without_user_or_email_fails_with_reason(
    engine: Path, redis_conn: redis.Redis
) -> None:
    enqueue_all(redis_conn, [("m1", {"type": "track.started", "track_slug": "x"})])
    drain(redis_conn)
    [failure] = failures.recent(redis_conn)
    assert failure.category == "identity"
    assert "cannot be identified" in failure.reason


def test_template_error_fails_that_event_only(
    redis_url: str, tmp_path: Path, redis_conn: redis.Redis
) -> None:
    mapping = (
        Path("mappings/hubspot.yaml")
        .read_text()
        .replace('"{{ event.score }}"', '"{{ 1 / event.score }}"', 1)
    )
    path = tmp_path / "broken.yaml"
    path.write_text(mapping)
    review = started("u1", "a@b.co", type="review.created", score=0)
    enqueue_all(redis_conn, [("bad", review), ("good", started("u2", "c@d.co"))])
    with installed(engine_runtime(redis_url, tmp_path, MAPPING_PATH=str(path))):
        drain(redis_conn)
    [failure] = failures.recent(redis_conn)
    assert failure.category == "mapping" and failure.message_id == "bad"
    assert "instruqt_last_review_score" in failure.reason
    assert "c@d.co" in dry_run_records(redis_conn)


def test_rejected_record_lands_in_registry_with_what_was_sent(
    engine: Path, redis_conn: redis.Redis
) -> None:
    bad = started("u1", "rejected@example.рф")
    enqueue_all(redis_conn, [("m-bad", bad), ("m-good", started("u2", "fine@example.com"))])
    drain(redis_conn)
    assert set(dry_run_records(redis_conn)) == {"fine@example.com"}
    [failure] = failures.recent(redis_conn)
    assert failure.category == "validation"
    assert "invalid email" in failure.reason
    payload = json.loads(failure.payload)
    assert payload["email"] == "rejected@example.рф" and payload["properties"]
    assert merged_ids(redis_conn, "rejected@example.рф") == {"m-bad"}  # the trail has its events
    assert ledger.dirty_count(redis_conn) == 0
