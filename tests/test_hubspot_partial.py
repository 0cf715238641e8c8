"""HubSpot's 207 answers: failed inputs named by trace id, errors naming none, inputs in
neither list. Only what HubSpot's ``results`` hold is ever recorded as synced, and every
input gets exactly one outcome."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.base import ContactChange, Outcome
from instruqt_crm.crm.hubspot import MISSING_RESENDS, HubSpotAdapter
from instruqt_crm.engine import ledger
from instruqt_crm.engine.flush import flush
from instruqt_crm.journal import failures
from instruqt_crm.mapping import load_mapping
from tests.fakes.hubspot import FakeHubSpot
from tests.test_fake_hubspot import create_property
from tests.test_ledger import dirty_contacts, runtime

MAPPING = load_mapping(Path("mappings/hubspot.yaml"))
KEY = "instruqt_user_id"


@pytest.fixture
def fake() -> Iterator[FakeHubSpot]:
    with FakeHubSpot() as server:
        yield server


@pytest.fixture
def by_user(fake: FakeHubSpot) -> HubSpotAdapter:
    """An adapter upserting on a unique property: HubSpot answers 207 for a partial failure."""
    create_property(HubSpotAdapter(fake.token, fake.url).client, KEY, has_unique_value=True)
    return HubSpotAdapter(fake.token, fake.url, sleep=lambda s: None, id_property=KEY)


def learner(number: int, email: str | None = None) -> ContactChange:
    email = email or f"learner{number}@example.com"
    return ContactChange(f"k{number}", email, {KEY: f"u{number}", "firstname": f"L{number}"})


def statuses(outcomes: list[Outcome]) -> Counter[str]:
    """How many outcomes of each status (a list: a duplicate outcome would show)."""
    return Counter(o.status for o in outcomes)


def upserts(fake: FakeHubSpot) -> list[dict]:
    """The bodies of the batch upserts the fake answered."""
    return [r.body for r in fake.requests if r.path.endswith("/batch/upsert")]


def take_email(fake: FakeHubSpot, email: str) -> None:
    """Another contact holds ``email``: an input writing it gets a CONFLICT in a 207."""
    HubSpotAdapter(fake.token, fake.url).upsert([ContactChange("other", email, {})])


def test_every_input_carries_its_own_trace_id_and_never_the_email(
    by_user: HubSpotAdapter, fake: FakeHubSpot
) -> None:
    by_user.upsert([learner(n) for n in range(5)])
    [body] = upserts(fake)
    traces = [item["objectWriteTraceId"] for item in body["inputs"]]
    assert len(set(traces)) == 5
    assert not any("@" in trace for trace in traces)


def test_a_207_names_the_failed_input_by_its_trace_id(
    by_user: HubSpotAdapter, fake: FakeHubSpot
) -> None:
    take_email(fake, "taken@example.com")
    batch = [learner(1), learner(2, "taken@example.com"), learner(3)]
    outcomes = by_user.upsert(batch)
    assert len(outcomes) == 3 and statuses(outcomes) == {"synced": 2, "rejected": 1}
    [rejected] = [o for o in outcomes if o.status == "rejected"]
    assert rejected.key == "k2" and rejected.reason.startswith("CONFLICT: ")
    [error] = fake.requests[-1].answer["errors"]
    assert list(error["context"]) == ["objectWriteTraceId"]
    assert "taken@example.com" not in str(error["context"])
    synced = {o.key: o.record_id for o in outcomes if o.status == "synced"}
    assert synced == {
        "k1": fake.contacts["learner1@example.com"]["hs_object_id"],
        "k3": fake.contacts["learner3@example.com"]["hs_object_id"],
    }


@pytest.mark.parametrize("echo", [True, False], ids=["results-traced", "results-by-key"])
def test_results_are_matched_to_inputs_whatever_their_order(
    fake: FakeHubSpot, by_user: HubSpotAdapter, echo: bool
) -> None:
    """Results come in any order; they are matched by trace id, or by the upsert key's value
    when a result carries no trace id."""
    fake.echo_trace_ids = echo
    take_email(fake, "taken@example.com")
    batch = [learner(n) for n in range(20)]
    batch[7] = learner(7, "taken@example.com")
    outcomes = by_user.upsert(batch)
    assert len(outcomes) == 20 and statuses(outcomes) == {"synced": 19, "rejected": 1}
    for outcome in outcomes:
        if outcome.status == "synced":
            number = outcome.key[1:]
            assert (
                fake.contacts[f"learner{number}@example.com"]["hs_object_id"] == outcome.record_id
            )


def test_an_error_naming_no_input_never_counts_as_written(
    by_user: HubSpotAdapter, fake: FakeHubSpot
) -> None:
    """The failed input is in neither list as far as we can tell: it is sent again, and
    HubSpot's later answer (naming it) decides; the others are written once."""
    take_email(fake, "taken@example.com")
    fake.errors_without_ids(1)
    outcomes = by_user.upsert([learner(1), learner(2, "taken@example.com"), learner(3)])
    assert len(outcomes) == 3 and statuses(outcomes) == {"synced": 2, "rejected": 1}
    [rejected] = [o for o in outcomes if o.status == "rejected"]
    assert rejected.key == "k2" and "CONFLICT" in rejected.reason
    first, second = upserts(fake)[-2:]
    assert len(first["inputs"]) == 3 and [i["id"] for i in second["inputs"]] == ["u2"]


def test_an_error_naming_no_input_rejects_it_after_the_resends(
    by_user: HubSpotAdapter, fake: FakeHubSpot
) -> None:
    take_email(fake, "taken@example.com")
    fake.errors_without_ids(10)
    before = len(upserts(fake))
    outcomes = by_user.upsert([learner(1), learner(2, "taken@example.com")])
    assert len(outcomes) == 2 and statuses(outcomes) == {"synced": 1, "rejected": 1}
    rejected = next(o for o in outcomes if o.status == "rejected")
    assert rejected.key == "k2"
    assert "neither" in rejected.reason and "Contact already exists" in rejected.reason
    assert len(upserts(fake)) - before == 1 + MISSING_RESENDS


@pytest.mark.parametrize("times", [1, 100], ids=["found-on-resend", "never-answered"])
def test_an_input_in_neither_list_is_resent_then_rejected(
    by_user: HubSpotAdapter, fake: FakeHubSpot, times: int
) -> None:
    fake.lose_inputs("u2", times=times)
    batch = [learner(n) for n in range(1, 5)]
    outcomes = by_user.upsert(batch)
    assert len(outcomes) == 4
    lost = next(o for o in outcomes if o.key == "k2")
    assert statuses(o for o in outcomes if o.key != "k2") == {"synced": 3}
    if times == 1:
        assert lost.status == "synced" and "learner2@example.com" in fake.contacts
    else:
        assert lost.status == "rejected" and "neither" in lost.reason
        assert "learner2@example.com" not in fake.contacts
    resent = upserts(fake)[1:]
    assert all([i["id"] for i in body["inputs"]] == ["u2"] for body in resent)
    assert len(resent) == (1 if times == 1 else MISSING_RESENDS)


def test_a_contact_missing_from_an_email_keyed_200_is_not_recorded_as_synced(
    fake: FakeHubSpot, redis_url: str, redis_conn: redis.Redis
) -> None:
    """Through a flush: the contact HubSpot never answered for is not settled as sent but
    filed in the failure registry with HubSpot's answer; its batch-mates are settled."""
    hub = HubSpotAdapter(fake.token, fake.url, sleep=lambda s: None)
    hubspot_setup.apply(hub, MAPPING, hubspot_setup.plan(hub, MAPPING))
    dirty_contacts(redis_conn, runtime(redis_url), 5)
    fake.lose_inputs("u2@example.com", times=100)
    report = flush(redis_conn, hub, MAPPING)
    assert (report.contacts.synced, report.contacts.rejected, report.contacts.retry) == (4, 1, 0)
    assert "u2@example.com" not in fake.contacts and len(fake.contacts) == 4
    [failure] = failures.recent(redis_conn)
    assert failure.message_id == "u2@example.com" and "neither" in failure.reason
    assert ledger.dirty_count(redis_conn) == 0
    assert ledger.pending(redis_conn, "u1@example.com", MAPPING).change is None  # sent
    unsent = ledger.pending(redis_conn, "u2@example.com", MAPPING).change
    assert unsent is not None and unsent.properties["instruqt_user_id"] == "u2"  # never sent


def test_a_failed_resend_leaves_the_missing_input_to_retry(
    by_user: HubSpotAdapter, fake: FakeHubSpot
) -> None:
    """The resend meets only server errors: the input stays to be retried by a later flush,
    and its batch-mates keep the outcome the first answer gave them."""
    fake.lose_inputs("u2", times=1)
    fake.inject_errors(503, count=by_user.attempts, after=1)  # after the first answer
    outcomes = by_user.upsert([learner(1), learner(2), learner(3)])
    assert len(outcomes) == 3 and statuses(outcomes) == {"synced": 2, "retry": 1}
    assert next(o for o in outcomes if o.status == "retry").key == "k2"


def test_two_changes_upserted_on_the_same_id_are_not_sent_together(
    fake: FakeHubSpot,
) -> None:
    """HubSpot refuses a batch with duplicate ids; the second change waits for a later batch."""
    hub = HubSpotAdapter(fake.token, fake.url, sleep=lambda s: None)
    same = [
        ContactChange("k1", "Ada@example.com", {"firstname": "Ada"}),
        ContactChange("k2", "ada@example.com", {"lastname": "Lovelace"}),
        ContactChange("k3", "bob@example.com", {"firstname": "Bob"}),
    ]
    outcomes = hub.upsert(same)
    assert len(outcomes) == 3 and statuses(outcomes) == {"synced": 2, "retry": 1}
    assert next(o for o in outcomes if o.status == "retry").key == "k2"
    assert [len(body["inputs"]) for body in upserts(fake)] == [2]


def test_results_without_trace_ids_match_by_email_on_an_email_keyed_batch(
    fake: FakeHubSpot,
) -> None:
    """The email travels in every input's properties, so each result names its contact."""
    fake.echo_trace_ids = False
    hub = HubSpotAdapter(fake.token, fake.url, sleep=lambda s: None)
    batch = [
        ContactChange(f"k{n}", f"Learner{n}@Example.com", {"firstname": "x"}) for n in range(9)
    ]
    outcomes = hub.upsert(batch)
    assert len(outcomes) == 9 and statuses(outcomes) == {"synced": 9}
    for outcome in outcomes:
        stored = fake.contacts[f"learner{outcome.key[1:]}@example.com"]
        assert stored["hs_object_id"] == outcome.record_id
