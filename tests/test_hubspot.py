"""The HubSpot adapter and provisioning against the fake HubSpot, through the real SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hubspot import HubSpot

from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.base import ContactChange, missing_properties
from instruqt_crm.crm.hubspot import HubSpotAdapter, format_value
from instruqt_crm.engine import ledger
from instruqt_crm.engine.flush import flush
from instruqt_crm.engine.send import send
from instruqt_crm.errors import PermanentError
from instruqt_crm.mapping import load_mapping
from instruqt_crm.ratelimit import RequestBudget
from tests.fakes.hubspot import FakeHubSpot
from tests.test_fake_hubspot import create_property
from tests.test_ledger import dirty_contacts, runtime
from tests.test_ratelimit import FakeClock

MAPPING = load_mapping(Path("mappings/hubspot.yaml"))


@pytest.fixture
def clock() -> FakeClock:
    """One clock for the fake's rolling window, the budget and the adapter's waits."""
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> Iterator[FakeHubSpot]:
    with FakeHubSpot(requests_per_window=100, window_seconds=1.0, clock=clock) as server:
        yield server


def budgeted(fake: FakeHubSpot, clock: FakeClock, budget: RequestBudget) -> HubSpotAdapter:
    """An adapter spending ``budget``, waiting on ``clock``; the mapping's properties created."""
    hub = HubSpotAdapter(fake.token, fake.url, budget, sleep=clock.sleep)
    hubspot_setup.apply(hub, MAPPING, hubspot_setup.plan(hub, MAPPING))
    return hub


@pytest.fixture
def adapter(fake: FakeHubSpot, clock: FakeClock, redis_conn: redis.Redis) -> HubSpotAdapter:
    budget = RequestBudget(redis_conn, "hubspot-test", 100, 1.0, clock=clock, sleep=clock.sleep)
    return budgeted(fake, clock, budget)


def change(number: int, **properties) -> ContactChange:
    email = f"learner{number}@example.com"
    return ContactChange(email, email, properties or {"instruqt_user_id": f"u{number}"})


def test_upsert_creates_then_updates(adapter: HubSpotAdapter, fake: FakeHubSpot) -> None:
    outcomes = adapter.upsert([change(1, instruqt_last_track="a"), change(2)])
    assert {o.status for o in outcomes} == {"synced"}
    assert fake.contacts["learner1@example.com"]["instruqt_last_track"] == "a"
    adapter.upsert([change(1, instruqt_last_track="b")])
    contacts = fake.contacts
    assert contacts["learner1@example.com"]["instruqt_last_track"] == "b"
    assert len(contacts) == 2


def test_values_are_formatted_for_hubspot(adapter: HubSpotAdapter, fake: FakeHubSpot) -> None:
    adapter.upsert(
        [
            change(
                1,
                instruqt_last_activity_at="2021-07-29T16:14:57.312Z",
                instruqt_tracks_completed_count=3,
                instruqt_last_review_score=4.0,
            )
        ]
    )
    stored = fake.contacts["learner1@example.com"]
    assert stored["instruqt_last_activity_at"] == "2021-07-29T16:14:57.312Z"
    assert stored["instruqt_tracks_completed_count"] == "3"
    assert stored["instruqt_last_review_score"] == "4"
    assert format_value(True) == "true" and format_value(None) == "" and format_value(2.5) == "2.5"


def test_unknown_property_is_rejected_naming_it(adapter: HubSpotAdapter, fake: FakeHubSpot) -> None:
    outcomes = send(adapter, [change(1, instruqt_no_such_thing="x"), change(2)]).outcomes
    by_key = {o.key: o for o in outcomes}
    assert by_key["learner2@example.com"].status == "synced"
    rejected = by_key["learner1@example.com"]
    assert rejected.status == "rejected"
    assert "instruqt_no_such_thing" in rejected.reason


def test_one_invalid_email_among_100(adapter: HubSpotAdapter, fake: FakeHubSpot) -> None:
    batch = [change(n) for n in range(99)]
    batch.insert(42, ContactChange("bad", "not-an-email", {"instruqt_user_id": "x"}))
    sent = send(adapter, batch)
    outcomes = sent.outcomes
    assert sum(o.status == "synced" for o in outcomes) == 99
    [bad] = [o for o in outcomes if o.status == "rejected"]
    assert bad.key == "bad" and "not-an-email" in bad.reason
    assert len(fake.contacts) == 99
    assert sent.requests <= 15


def test_429_waits_and_succeeds_without_going_over(
    fake: FakeHubSpot, clock: FakeClock, redis_conn: redis.Redis
) -> None:
    """A 429 caused by another integration pauses the budget for HubSpot's interval: the
    retry goes out a whole window later, and then the budget keeps us under the limit."""
    budget = RequestBudget(redis_conn, "hubspot-shared", 5, 1.2, clock=clock, sleep=clock.sleep)
    hub = budgeted(fake, clock, budget)  # 1.2 s: with a margin, as in production
    fake.set_rate_limit(5, window_seconds=1.0)
    clock.sleep(2.0)  # the set-up requests age out of both windows
    other = HubSpot(access_token=fake.token, host=fake.url)  # another integration, same quota
    for _ in range(5):
        other.crm.properties.core_api.get_all("contacts")
    assert hub.upsert([change(1)])[0].status == "synced"
    assert fake.count_429 == 1, fake.summary()
    [limited] = fake.rate_limited_requests
    retried = fake.requests[-1]
    assert retried.status == 200 and retried.path.endswith("/batch/upsert")
    assert retried.time - limited.time >= 1.0, "it must wait for the window, not hammer"
    assert fake.summary()["max_admitted_in_window"] <= 5
    for number in range(2, 12):
        assert hub.upsert([change(number)])[0].status == "synced"
    assert fake.count_429 == 1, fake.summary()
    assert len(fake.contacts) == 11


def test_budget_at_the_limit_gets_no_429(
    fake: FakeHubSpot, clock: FakeClock, redis_conn: redis.Redis
) -> None:
    fake.set_rate_limit(5, window_seconds=1.0)
    budget = RequestBudget(redis_conn, "hubspot-right", 5, 1.2, clock=clock, sleep=clock.sleep)
    hub = budgeted(fake, clock, budget)  # 1.2 s: with a margin, as in production
    for number in range(8):
        hub.upsert([change(number)])
    assert fake.count_429 == 0
    assert len(fake.contacts) == 8
    assert fake.summary()["max_in_window"] == 5  # it did use the whole limit


def test_a_flush_of_250_contacts_sends_no_batch_over_100(
    adapter: HubSpotAdapter, fake: FakeHubSpot, redis_url: str, redis_conn: redis.Redis
) -> None:
    """HubSpot answers 400 to a batch of more than 100 inputs (so does the fake)."""
    dirty_contacts(redis_conn, runtime(redis_url), 250)
    before = len(fake.requests)
    report = flush(redis_conn, adapter, MAPPING)
    sent = fake.requests[before:]
    upserts = [r for r in sent if r.path.endswith("/batch/upsert")]
    assert upserts and max(r.inputs for r in upserts) <= 100
    assert 400 not in {r.status for r in sent}
    assert sum(r.inputs for r in upserts) == 250 == report.contacts.synced
    assert len(fake.contacts) == 250
    assert ledger.dirty_count(redis_conn) == 0


def test_5xx_twice_then_success(adapter: HubSpotAdapter, fake: FakeHubSpot) -> None:
    before = len(fake.requests)
    fake.inject_errors(502, count=2)
    assert adapter.upsert([change(1)])[0].status == "synced"
    assert [r.status for r in fake.requests[before:]] == [502, 502, 200]


def test_401_is_permanent_with_a_clear_message(fake: FakeHubSpot) -> None:
    hub = HubSpotAdapter("wrong-token", fake.url, sleep=lambda s: None)
    with pytest.raises(PermanentError) as caught:
        hub.upsert([change(1)])
    assert caught.value.category == "auth"
    assert "HUBSPOT_ACCESS_TOKEN" in caught.value.reason
    assert "wrong-token" not in caught.value.reason
    assert len(fake.requests) == 1


def test_403_names_the_missing_scope(fake: FakeHubSpot) -> None:
    fake.add_token("read-only", scopes=["crm.objects.contacts.read"])
    hub = HubSpotAdapter("read-only", fake.url, sleep=lambda s: None)
    with pytest.raises(PermanentError, match=r"crm\.objects\.contacts\.write"):
        hub.upsert([change(1)])


def test_provisioning_creates_exactly_the_missing_and_is_idempotent(fake: FakeHubSpot) -> None:
    hub = HubSpotAdapter(fake.token, fake.url, sleep=lambda s: None)
    first = hubspot_setup.plan(hub, MAPPING)
    assert sorted(first.create) == sorted(MAPPING.properties)
    assert first.create_group
    created = hubspot_setup.apply(hub, MAPPING, first)
    assert "group instruqt" in created
    definition = fake.properties["instruqt_last_activity_at"]
    assert (definition["type"], definition["groupName"]) == ("datetime", "instruqt")
    again = hubspot_setup.plan(hub, MAPPING)
    assert again.create == [] and not again.create_group
    assert sorted(again.existing) == sorted(MAPPING.properties)
    assert missing_properties(hub.describe(), MAPPING.properties) == []


def test_provisioning_reports_a_type_mismatch(fake: FakeHubSpot) -> None:
    hub = HubSpotAdapter(fake.token, fake.url, sleep=lambda s: None)
    create_property(hub.client, "instruqt_last_review_score")  # a string, not a number
    steps = hubspot_setup.plan(hub, MAPPING)
    assert steps.mismatched == ["instruqt_last_review_score: is string, the mapping needs number"]
    assert "instruqt_last_review_score" not in steps.create


def test_a_400_naming_the_bad_email_costs_one_extra_request(
    adapter: HubSpotAdapter, fake: FakeHubSpot
) -> None:
    batch = [change(n) for n in range(60)]
    batch.insert(7, ContactChange("bad", "not-an-email", {"instruqt_user_id": "x"}))
    sent = send(adapter, batch)
    assert [o.key for o in sent.outcomes if o.status == "rejected"] == ["bad"]
    assert sent.requests == 2
    assert len(fake.contacts) == 60


def test_a_409_conflict_on_an_email_keyed_batch_rejects_only_the_clashing_contact(
    adapter: HubSpotAdapter, fake: FakeHubSpot
) -> None:
    """A unique value another contact holds makes HubSpot refuse the whole email-keyed batch
    with 409; the batch is split until that contact stands alone, and the rest are written."""
    create_property(adapter.client, "instruqt_unique_id", has_unique_value=True)
    adapter.upsert([change(0, instruqt_unique_id="taken")])
    batch = [change(n) for n in range(1, 9)]
    batch.insert(3, change(99, instruqt_unique_id="taken"))
    sent = send(adapter, batch)
    rejected = [o for o in sent.outcomes if o.status == "rejected"]
    assert [o.key for o in rejected] == ["learner99@example.com"]
    assert "409" in rejected[0].reason and "Existing ID" in rejected[0].reason
    assert len(sent.outcomes) == len(batch)
    assert all(f"learner{n}@example.com" in fake.contacts for n in range(1, 9))


def test_upserting_on_a_unique_property_writes_the_email_and_reads_a_207(
    fake: FakeHubSpot, redis_conn: redis.Redis
) -> None:
    by_email = HubSpotAdapter(fake.token, fake.url, sleep=lambda s: None)
    create_property(by_email.client, "instruqt_user_id", has_unique_value=True)
    by_email.upsert([ContactChange("taken", "taken@x.com", {"firstname": "T"})])
    by_user = HubSpotAdapter(fake.token, fake.url, id_property="instruqt_user_id")
    outcomes = by_user.upsert(
        [
            ContactChange("k1", "new@x.com", {"instruqt_user_id": "u1"}),
            ContactChange("k2", "taken@x.com", {"instruqt_user_id": "u2"}),
            ContactChange("k3", "three@x.com", {"instruqt_user_id": "u3", "firstname": "3"}),
            ContactChange("k4", "nokey@x.com", {"firstname": "Four"}),
        ]
    )
    by_key = {o.key: o for o in outcomes}
    assert {key: o.status for key, o in by_key.items()} == {
        "k1": "synced", "k2": "rejected", "k3": "synced", "k4": "rejected"}  # fmt: skip
    assert by_key["k2"].reason.startswith("CONFLICT: ") and "Existing ID" in by_key["k2"].reason
    assert by_key["k4"].reason == "no instruqt_user_id value to upsert this contact on"
    assert fake.contacts["new@x.com"]["instruqt_user_id"] == "u1"  # the email went along
    assert fake.contacts["three@x.com"]["firstname"] == "3"
