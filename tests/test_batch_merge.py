"""Batched handling: the same ledger however events are split into batches, conflicts, isolation."""

from __future__ import annotations

import json

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.client import Pipeline

from instruqt_crm import keys
from instruqt_crm.engine import identity, inbox, ledger
from instruqt_crm.engine.handling import Batch, handle_batch, handle_event
from instruqt_crm.events import parse_event
from instruqt_crm.journal import counters, failures
from samples.history import history
from samples.signing import track_event
from tests.engine_helpers import merged_ids
from tests.test_ledger import EVENTS, runtime, snapshot

MANY = history(12, seed=33)  # ~80 events, several per learner


def entries(events: list[dict], order: list[int]) -> list[inbox.Entry]:
    return [inbox.Entry(f"e{i}", f"msg_{i}", events[i]) for i in order]


def one_by_one(conn: redis.Redis, run, events: list[dict]) -> dict:
    conn.flushdb()
    for index, body in enumerate(events):
        handle_event(conn, run, parse_event(f"msg_{index}", body))
    return snapshot(conn)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(order=st.permutations(range(len(MANY))), cuts=st.lists(st.integers(1, 40), max_size=6))
def test_any_batching_gives_the_ledger_of_one_by_one(
    redis_url: str, redis_conn: redis.Redis, order: list[int], cuts: list[int]
) -> None:
    run = runtime(redis_url)
    expected = one_by_one(redis_conn, run, MANY)
    redis_conn.flushdb()
    taken, start = entries(MANY, order), 0
    for size in [*cuts, len(taken)]:
        if start < len(taken):
            handle_batch(redis_conn, run, taken[start : start + size])
            start += size
    assert snapshot(redis_conn) == expected


def test_a_contact_changed_between_read_and_write_is_merged_again(
    redis_url: str, redis_conn: redis.Redis, monkeypatch
) -> None:
    run = runtime(redis_url)
    expected = one_by_one(redis_conn, run, EVENTS)
    redis_conn.flushdb()
    real = ledger._fold
    folded: list[str] = []

    def meddling(items, current):
        folded.append(items[0].key)
        return real(items, current)

    def other_worker(items, current):  # merges into this contact between our read and write
        monkeypatch.setattr(ledger, "_fold", meddling)
        assert ledger.merge(redis_conn, items[0].key, items[0].changes, "other", items[0].email)
        folded.clear()
        return meddling(items, current)

    monkeypatch.setattr(ledger, "_fold", other_worker)
    handle_batch(redis_conn, run, entries(EVENTS, list(range(len(EVENTS)))))
    assert len(folded) == len(set(folded)) + 1  # that contact was read and folded again
    assert snapshot(redis_conn) == expected


def test_an_event_that_breaks_the_batch_merge_fails_alone(
    redis_url: str, redis_conn: redis.Redis, monkeypatch
) -> None:
    run = runtime(redis_url)
    real = ledger._fold

    def fragile(items, current):
        if any(item.event_id == "msg_2" for item in items):
            raise ValueError("cannot encode this value")
        return real(items, current)

    monkeypatch.setattr(ledger, "_fold", fragile)
    statuses = handle_batch(redis_conn, run, entries(EVENTS, list(range(len(EVENTS)))))
    assert statuses["failed"] == 1 and statuses["merged"] == len(EVENTS) - 1
    [failure] = failures.every(redis_conn)
    assert failure.message_id == "msg_2" and "cannot encode this value" in failure.reason
    assert json.loads(failure.payload) == EVENTS[2]
    email = EVENTS[2]["custom_parameters"]["email"]
    assert "msg_2" not in merged_ids(redis_conn, email)
    assert merged_ids(redis_conn, email)  # its learner's other events were merged


def test_a_deterministic_redis_error_fails_the_event_not_the_batch(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    """A type error on one contact's key would fail every retry: that event fails alone."""
    run = runtime(redis_url)
    broken = EVENTS[0]["custom_parameters"]["email"]
    redis_conn.set(keys.contact(broken), "not a hash")
    statuses = handle_batch(redis_conn, run, entries(EVENTS, list(range(len(EVENTS)))))
    learner_events = sum(1 for body in EVENTS if body["user_id"] == EVENTS[0]["user_id"])
    assert statuses["failed"] == learner_events
    assert statuses["merged"] == len(EVENTS) - learner_events
    assert all("WRONGTYPE" in f.reason for f in failures.every(redis_conn))


def test_a_learner_with_thousands_of_waiting_events_is_released_in_one_batch(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    run = runtime(redis_url)
    body = {**EVENTS[0], "user_id": "u-busy", "custom_parameters": {}}
    for number in range(9000):  # more than Lua's unpack() takes at once
        identity.park(redis_conn, parse_event(f"w{number}", {**body, "challenge_id": f"c{number}"}))
    reveal = {**body, "custom_parameters": {"email": "busy@example.com"}}
    handle_batch(redis_conn, run, [inbox.Entry("1-0", "reveal", reveal)])
    assert identity.parked_events(redis_conn, "u-busy") == []
    assert counters.stats(redis_conn)["events"]["merged"] == 9001


def test_a_learner_parked_by_another_worker_mid_batch_is_released_at_commit(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    run = runtime(redis_url)
    reveal = track_event("u-race", challenge_id="c1", params={"email": "race@example.com"})
    hidden = track_event("u-race", challenge_id="c2")
    first = Batch(redis_conn, run, ["u-race"])  # u-race is not waiting when it starts
    first.handle(parse_event("reveal", reveal))
    assert handle_event(redis_conn, run, parse_event("hidden", hidden)).status == "parked"
    first.commit()  # caches the email, then looks for learners parked meanwhile
    assert identity.parked_events(redis_conn, "u-race") == []
    assert merged_ids(redis_conn, "race@example.com") == {"hidden", "reveal"}


def test_an_event_parked_just_after_another_worker_cached_the_email_is_released(
    redis_url: str, redis_conn: redis.Redis, monkeypatch
) -> None:
    run = runtime(redis_url)
    reveal = track_event("u-race", challenge_id="c1", params={"email": "race@example.com"})
    hidden = track_event("u-race", challenge_id="c2")
    real_park = identity.park

    def other_worker_commits_first(conn, event):  # between this worker's lookup and its park
        handle_batch(conn, run, [inbox.Entry("1-0", "reveal", reveal)])
        real_park(conn, event)

    monkeypatch.setattr(identity, "park", other_worker_commits_first)
    handle_event(redis_conn, run, parse_event("hidden", hidden))
    assert identity.parked_events(redis_conn, "u-race") == []
    assert merged_ids(redis_conn, "race@example.com") == {"hidden", "reveal"}


def test_a_released_event_survives_redis_going_away_as_the_batch_is_written(
    redis_url: str, redis_conn: redis.Redis, monkeypatch
) -> None:
    """Merged, then Redis gone before the batch's trail and counters were written: the
    released event is still parked, so the batch taken again releases and trails it."""
    run = runtime(redis_url)
    hidden = track_event("u-gone", challenge_id="c1")
    reveal = track_event("u-gone", challenge_id="c2", params={"email": "gone@example.com"})
    assert handle_event(redis_conn, run, parse_event("hidden", hidden)).status == "parked"
    real_execute = Pipeline.execute

    def redis_gone_once(self: Pipeline, raise_on_error: bool = True) -> list:
        if raise_on_error:  # not the batch's writes (trail, counters, cache)
            return real_execute(self, raise_on_error)
        monkeypatch.setattr(Pipeline, "execute", real_execute)
        self.reset()
        raise redis.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(Pipeline, "execute", redis_gone_once)
    taken = [inbox.Entry("1-0", "reveal", reveal)]
    with pytest.raises(redis.ConnectionError):
        handle_batch(redis_conn, run, taken)  # not acknowledged: the batch is taken again
    assert [event_id for event_id, _ in identity.parked_events(redis_conn, "u-gone")] == ["hidden"]
    handle_batch(redis_conn, run, taken)
    assert identity.parked_events(redis_conn, "u-gone") == []
    assert merged_ids(redis_conn, "gone@example.com") == {"hidden", "reveal"}


def test_the_same_event_twice_in_a_batch_gets_an_outcome_each(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    """Outcomes follow the events' positions: the first copy changed the contact, the second
    found nothing new."""
    run = runtime(redis_url)
    batch = Batch(redis_conn, run, [EVENTS[0]["user_id"]])
    for _ in range(2):
        batch.handle(parse_event("msg_0", EVENTS[0]))
    first, second = batch.commit()
    assert (first.status, first.changed) == ("merged", True)
    assert (second.status, second.changed) == ("merged", False)
