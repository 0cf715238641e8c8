"""Batched handling: the same ledger however events are split into batches, conflicts, isolation."""

from __future__ import annotations

import json

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instruqt_crm import failures, inbox, ledger
from instruqt_crm.events import parse_event
from instruqt_crm.handling import handle_batch, handle_event
from tests.history import history
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
    email = EVENTS[2]["params"]["email"]
    assert "msg_2" not in ledger.event_ids(redis_conn, email)
    assert ledger.event_ids(redis_conn, email)  # its learner's other events were merged
