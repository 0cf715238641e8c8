"""Learners whose ledger state expired (STATE_IDLE_DAYS) come back to the values they had.

Their first flush reads the CRM's current values (one batch read per 100) and merges them in,
so HubSpot ends where it would have ended had the state never expired, for every merge
policy of the default mapping (first, min, max, latest, union, count). The expected records
come from ``samples.history``'s independent oracle, not from the engine.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.base import ContactChange
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.engine import ledger
from instruqt_crm.engine.flush import flush
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.mapping import PropertyChange, load_mapping
from samples.history import crm_records, expected_in_crm, expected_records, history
from tests.engine_helpers import drain, enqueue_all, installed
from tests.fakes.hubspot import FakeHubSpot
from tests.test_hubspot_full_path import hubspot_env

MAPPING = load_mapping(Path("mappings/hubspot.yaml"))
READ = "/crm/v3/objects/contacts/batch/read"
UPSERT = "/crm/v3/objects/contacts/batch/upsert"


def halves(events: list[dict]) -> tuple[list[dict], list[dict]]:
    """Each learner's earlier and later events (by time)."""
    by_user: dict[str, list[dict]] = {}
    for event in events:
        by_user.setdefault(event["user_id"], []).append(event)
    early, late = [], []
    for mine in by_user.values():
        mine.sort(key=lambda e: e["timestamp"])
        cut = len(mine) // 2
        early += mine[:cut]
        late += mine[cut:]
    return early, late


def forget_every_learner(conn: redis.Redis) -> int:
    """What STATE_IDLE_DAYS does to learners with no event for that long."""
    found = list(conn.scan_iter(f"{keys.PREFIX}learner:*"))
    conn.delete(*found)
    return len(found)


@pytest.mark.parametrize("forget", [True, False], ids=["state expired", "state kept"])
def test_learners_back_after_their_state_expired_get_the_values_it_would_have_given(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, forget: bool
) -> None:
    events = history(60, seed=17)
    early, late = halves(events)
    with FakeHubSpot() as fake:
        env = hubspot_env(redis_url, tmp_path, fake)
        runtime = Runtime.from_settings(Settings.from_env(env))
        adapter = HubSpotAdapter(fake.token, fake.url)
        hubspot_setup.apply(adapter, runtime.mapping, hubspot_setup.plan(adapter, runtime.mapping))
        with installed(runtime):
            enqueue_all(redis_conn, [(f"early{n}", body) for n, body in enumerate(early)])
            drain(redis_conn)
            returning = forget_every_learner(redis_conn) if forget else 0
            before_late = {email: dict(values) for email, values in fake.contacts.items()}
            before = len(fake.requests)
            enqueue_all(redis_conn, [(f"late{n}", body) for n, body in enumerate(late)])
            drain(redis_conn)
        assert crm_records(fake.contacts) == expected_in_crm(expected_records(events))
        later = fake.requests[before:]
        reads = [r for r in later if r.path == READ]
        if forget:
            assert returning > 40
            assert 1 <= len(reads) <= len([r for r in later if r.path == UPSERT])
            assert len(reads) <= -(-returning // 100) * 2  # a batch of 100 needs one read
        else:  # learners the ledger knows are never read, only those new in the late half
            asked = {item["id"] for r in reads for item in r.body["inputs"]}
            assert asked and asked.isdisjoint(crm_records(before_late))


def hubspot_with(fake: FakeHubSpot, email: str, **values: str) -> HubSpotAdapter:
    adapter = HubSpotAdapter(fake.token, fake.url)
    hubspot_setup.apply(adapter, MAPPING, hubspot_setup.plan(adapter, MAPPING))
    adapter.upsert([ContactChange(email, email, dict(values))])
    return adapter


def at(day: int) -> datetime:
    return datetime(2026, 11, day, tzinfo=UTC)


def test_every_policy_continues_from_what_the_crm_holds(redis_conn: redis.Redis) -> None:
    """A learner new to the ledger whose record HubSpot already holds (written before the
    state expired): first keeps the CRM's, min/max compare with it, latest takes the newer
    event, union adds to it, count adds distinct new values to the CRM's number; unchanged
    values are not sent again."""
    email = "back@example.com"
    with FakeHubSpot() as fake:
        adapter = hubspot_with(
            fake,
            email,
            instruqt_user_id="u-old",
            instruqt_first_activity_at="2026-01-05T10:00:00.000Z",
            instruqt_last_activity_at="2026-02-01T10:00:00.000Z",
            instruqt_last_track="old-track",
            instruqt_tracks_started="a;c",
            instruqt_tracks_completed_count="2",
            instruqt_last_review_score="4",
        )
        changes = [
            PropertyChange("instruqt_user_id", "set_once", "u-new", at(3)),
            PropertyChange("instruqt_first_activity_at", "min", "2026-11-03T00:00:00.000Z", at(3)),
            PropertyChange("instruqt_last_activity_at", "max", "2026-11-03T00:00:00.000Z", at(3)),
            PropertyChange("instruqt_last_track", "latest", "new-track", at(3)),
            PropertyChange("instruqt_tracks_started", "union", "b", at(3)),
            PropertyChange("instruqt_tracks_completed_count", "count", "new-track", at(3)),
        ]
        ledger.merge(redis_conn, email, changes, "m1", email)
        assert ledger.pending(redis_conn, email, MAPPING).needs_read
        report = flush(redis_conn, adapter, MAPPING)
        assert report.contacts.synced == 1 and report.requests == 2  # one read, one upsert
        sent = [r.body for r in fake.requests if r.path == UPSERT][-1]["inputs"][0]["properties"]
        expected = {
            "instruqt_user_id": "u-old",
            "instruqt_first_activity_at": "2026-01-05T10:00:00.000Z",
            "instruqt_last_activity_at": "2026-11-03T00:00:00.000Z",
            "instruqt_last_track": "new-track",
            "instruqt_tracks_started": "a;b;c",
            "instruqt_tracks_completed_count": "3",
            "instruqt_last_review_score": "4",
        }
        assert {name: fake.contacts[email].get(name) for name in expected} == expected
        assert set(sent) - {"email"} == {  # what equals the CRM's value is not sent again
            "instruqt_last_activity_at",
            "instruqt_last_track",
            "instruqt_tracks_started",
            "instruqt_tracks_completed_count",
        }
        assert not ledger.pending(redis_conn, email, MAPPING).needs_read


def test_a_learner_the_crm_does_not_hold_is_read_once_then_created(
    redis_conn: redis.Redis,
) -> None:
    with FakeHubSpot() as fake:
        adapter = hubspot_with(fake, "someone-else@example.com", instruqt_last_track="x")
        email = "new@example.com"
        ledger.merge(
            redis_conn, email, [PropertyChange("instruqt_last_track", "latest", "t", at(2))],
            "m1", email,
        )  # fmt: skip
        assert flush(redis_conn, adapter, MAPPING).requests == 2
        assert fake.contacts[email]["instruqt_last_track"] == "t"
        ledger.merge(
            redis_conn, email, [PropertyChange("instruqt_last_track", "latest", "u", at(3))],
            "m2", email,
        )  # fmt: skip
        assert flush(redis_conn, adapter, MAPPING).requests == 1  # known now: no read


def test_only_learners_hubspot_answered_for_are_read_in() -> None:
    """A learner HubSpot says it does not have is None (created from the ledger's values);
    one it was not asked about or did not answer for is left out, to be read again later."""
    with FakeHubSpot() as fake:
        adapter = hubspot_with(fake, "held@example.com", instruqt_last_track="x")
        changes = [
            ContactChange("held@example.com", "held@example.com", {}),
            ContactChange("absent@example.com", "absent@example.com", {}),
        ]
        current = adapter.current_values(changes, ["instruqt_last_track"])
        assert current.requests == 1
        assert current.found["absent@example.com"] is None
        assert (current.found["held@example.com"] or {})["instruqt_last_track"] == "x"
        by_user = HubSpotAdapter(fake.token, fake.url, id_property="instruqt_user_id")
        keyless = [ContactChange("k", "k@example.com", {"instruqt_last_track": "y"})]
        assert by_user.current_values(keyless, ["instruqt_last_track"]).found == {}
