"""The ledger: order- and duplicate-proof merges, diffs, batching, version-guarded settling."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instruqt_crm.config import Settings
from instruqt_crm.crm.base import ContactChange, Outcome
from instruqt_crm.crm.dryrun import DryRunAdapter
from instruqt_crm.engine import flush as flush_module
from instruqt_crm.engine import ledger
from instruqt_crm.engine.flush import Reschedule, batch_wait, flush, flush_batch
from instruqt_crm.engine.flush_plays import PlaysFlushed
from instruqt_crm.engine.handling import handle_event
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.engine.send import Tally
from instruqt_crm.events import parse_event
from instruqt_crm.mapping import load_mapping
from instruqt_crm.ratelimit import RequestBudget
from samples.history import history
from samples.signing import SECRET
from tests.engine_helpers import CountingConnection, counting_client

MAPPING = load_mapping(Path("mappings/hubspot.yaml"))
EVENTS = history(4, seed=21)


def runtime(redis_url: str) -> Runtime:
    env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url, "FLUSH_WINDOW_SECONDS": "0"}
    return Runtime(Settings.from_env(env), MAPPING)


def snapshot(conn: redis.Redis) -> dict[str, Any]:
    """Every contact's cells and unsent values: the whole state the CRM will be told."""
    keys = sorted(k.decode().split(":", 2)[2] for k in conn.scan_iter("instruqt_crm:learner:*"))
    return {
        key: (ledger.cells(conn, key), ledger.pending(conn, key, MAPPING).change) for key in keys
    }


def apply_all(conn: redis.Redis, run: Runtime, order: list[int]) -> dict[str, Any]:
    conn.flushdb()
    for index in order:
        handle_event(conn, run, parse_event(f"msg_{index}", EVENTS[index]))
    return snapshot(conn)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    order=st.permutations(range(len(EVENTS))),
    repeats=st.lists(st.integers(0, len(EVENTS) - 1), max_size=15),
)
def test_any_order_and_duplicates_give_the_same_ledger(
    redis_url: str, redis_conn: redis.Redis, order: list[int], repeats: list[int]
) -> None:
    run = runtime(redis_url)
    expected = apply_all(redis_conn, run, list(range(len(EVENTS))))
    shuffled = list(order)
    for position, index in enumerate(repeats):
        shuffled.insert((position * 7) % (len(shuffled) + 1), index)
    assert apply_all(redis_conn, run, shuffled) == expected


class CountingAdapter(DryRunAdapter):
    """The dry-run CRM, counting requests and optionally refusing some emails."""

    def __init__(self, *args: Any, batch_size: int = 100) -> None:
        super().__init__(*args, batch_size=batch_size)
        self.calls: list[int] = []

    def upsert(self, changes: list[ContactChange]) -> list[Outcome]:
        self.calls.append(len(changes))
        return super().upsert(changes)


def next_day_event(kind: str) -> dict[str, Any]:
    """Learner u0's event of ``kind``, a day after the events of ``dirty_contacts``."""
    return {
        "type": kind,
        "user_id": "u0",
        "track_slug": "t",
        "params": {"email": "u0@example.com"},
        "timestamp": "2026-11-02T10:00:00Z",
    }


def dirty_contacts(conn: redis.Redis, run: Runtime, count: int) -> None:
    for number in range(count):
        body = {
            "type": "track.started",
            "user_id": f"u{number}",
            "track_slug": "t",
            "params": {"email": f"u{number}@example.com"},
            "timestamp": "2026-11-01T10:00:00Z",
        }
        handle_event(conn, run, parse_event(f"m{number}", body))


def test_250_dirty_contacts_with_batch_size_100_is_3_requests(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    run = runtime(redis_url)
    dirty_contacts(redis_conn, run, 250)
    adapter = CountingAdapter(redis_conn, MAPPING, tmp_path / "out.jsonl")
    report = flush(redis_conn, adapter, MAPPING)
    assert adapter.calls == [100, 100, 50]
    assert report.contacts.synced == 250 and report.requests == 3
    assert ledger.dirty_count(redis_conn) == 0


def test_no_change_means_no_request(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    run = runtime(redis_url)
    dirty_contacts(redis_conn, run, 3)
    adapter = CountingAdapter(redis_conn, MAPPING, tmp_path / "out.jsonl")
    flush(redis_conn, adapter, MAPPING)
    ledger.mark_dirty(redis_conn, ["u0@example.com", "u1@example.com"])
    dirty_contacts(redis_conn, run, 3)  # the same events again: nothing new
    report = flush(redis_conn, adapter, MAPPING)
    assert adapter.calls == [3]
    assert report.requests == 0 and report.contacts.unchanged == 2


def test_only_changed_properties_are_sent(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    run = runtime(redis_url)
    dirty_contacts(redis_conn, run, 1)
    adapter = CountingAdapter(redis_conn, MAPPING, tmp_path / "out.jsonl")
    flush(redis_conn, adapter, MAPPING)
    later = next_day_event("track.started")
    handle_event(redis_conn, run, parse_event("later", later))
    change = ledger.pending(redis_conn, "u0@example.com", MAPPING).change
    assert change is not None
    assert change.properties == {"instruqt_last_activity_at": "2026-11-02T10:00:00.000Z"}


def test_a_merge_during_a_flush_keeps_the_contact_dirty(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    run = runtime(redis_url)
    dirty_contacts(redis_conn, run, 1)
    seen = ledger.pending(redis_conn, "u0@example.com", MAPPING)
    later = next_day_event("track.completed")
    handle_event(redis_conn, run, parse_event("later", later))  # arrives while "sending"
    assert seen.change is not None
    accepted = seen.change.properties
    assert not ledger.settle(redis_conn, "u0@example.com", seen.version, accepted, MAPPING)
    assert ledger.dirty(redis_conn, 10) == ["u0@example.com"]
    remaining = ledger.pending(redis_conn, "u0@example.com", MAPPING).change
    assert remaining is not None and "instruqt_tracks_completed" in remaining.properties


def test_flush_sends_batches_not_one_call_per_event(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    run = runtime(redis_url)
    for number, body in enumerate(EVENTS):
        handle_event(redis_conn, run, parse_event(f"e{number}", body))
    adapter = CountingAdapter(redis_conn, MAPPING, tmp_path / "out.jsonl")
    assert flush(redis_conn, adapter, MAPPING).requests == 1
    assert adapter.calls == [4]


def test_a_stale_batch_landing_last_makes_the_contact_dirty_again(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    run = runtime(redis_url)
    dirty_contacts(redis_conn, run, 1)
    old = ledger.pending(redis_conn, "u0@example.com", MAPPING)
    later = next_day_event("track.completed")
    handle_event(redis_conn, run, parse_event("later", later))
    new = ledger.pending(redis_conn, "u0@example.com", MAPPING)
    assert old.change is not None and new.change is not None
    assert ledger.settle(redis_conn, "u0@example.com", new.version, new.change.properties, MAPPING)
    assert ledger.dirty(redis_conn, 10) == []
    # the older batch's answer arrives last: the CRM now holds its values, so resend the newer
    assert not ledger.settle(
        redis_conn, "u0@example.com", old.version, old.change.properties, MAPPING
    )
    assert ledger.dirty(redis_conn, 10) == ["u0@example.com"]
    resend = ledger.pending(redis_conn, "u0@example.com", MAPPING).change
    assert resend is not None  # only what the stale batch overwrote goes again
    assert resend.properties == {"instruqt_last_activity_at": "2026-11-02T10:00:00.000Z"}


def test_the_flush_lease_is_renewed_while_a_batch_is_slow(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    import time as clock

    run = runtime(redis_url)
    dirty_contacts(redis_conn, run, 2)

    class Slow(CountingAdapter):
        def upsert(self, changes):
            clock.sleep(2.5)  # longer than the 2 s lease
            assert redis_conn.exists("instruqt_crm:flush:lock"), "the lease lapsed mid-batch"
            return super().upsert(changes)

    report = flush(redis_conn, Slow(redis_conn, MAPPING, tmp_path / "o.jsonl"), MAPPING, lease=2)
    assert report.contacts.synced == 2
    assert not redis_conn.exists("instruqt_crm:flush:lock")


def round_trips_of_a_batch(redis_url: str, conn: redis.Redis, contacts: int, path: Path) -> int:
    """Round trips of one ``flush_batch`` of ``contacts`` changed and as many unchanged ones."""
    conn.flushdb()
    run = runtime(redis_url)
    dirty_contacts(conn, run, 2 * contacts)
    flush(conn, CountingAdapter(conn, MAPPING, path), MAPPING)  # all sent once...
    ledger.mark_dirty(conn, [f"u{n}@example.com" for n in range(contacts)])  # ...unchanged
    for number in range(contacts, 2 * contacts):  # ...changed
        later = {**next_day_event("track.completed"), "user_id": f"u{number}"}
        later["params"] = {"email": f"u{number}@example.com"}
        handle_event(conn, run, parse_event(f"later{number}", later))
    counted = counting_client(redis_url)
    adapter = CountingAdapter(counted, MAPPING, path, batch_size=2 * contacts)
    CountingConnection.sent = 0
    step = flush_batch(counted, adapter, MAPPING)
    assert isinstance(step, Tally) and (step.synced, step.unchanged) == (contacts, contacts)
    return CountingConnection.sent


def test_a_batch_costs_the_same_round_trips_whatever_its_size(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    small = round_trips_of_a_batch(redis_url, redis_conn, 2, tmp_path / "a.jsonl")
    large = round_trips_of_a_batch(redis_url, redis_conn, 50, tmp_path / "b.jsonl")
    assert small == large  # reads in one pipeline, outcomes in another: none per contact
    assert large <= 16  # connecting, the dirty set, reads, the CRM call, outcomes, metrics


def test_pending_many_reads_what_pending_reads(redis_url: str, redis_conn: redis.Redis) -> None:
    run = runtime(redis_url)
    dirty_contacts(redis_conn, run, 3)
    keys = ["u2@example.com", "nobody@example.com", "u0@example.com"]
    assert ledger.pending_many(redis_conn, keys, MAPPING) == [
        ledger.pending(redis_conn, key, MAPPING) for key in keys
    ]
    assert ledger.pending_many(redis_conn, keys, MAPPING)[1] == ledger.Unsent(None, "0", True)


def test_settle_many_acts_like_settle(redis_url: str, redis_conn: redis.Redis) -> None:
    run = runtime(redis_url)
    dirty_contacts(redis_conn, run, 2)
    first, second = (ledger.pending(redis_conn, f"u{n}@example.com", MAPPING) for n in (0, 1))
    assert first.change is not None and second.change is not None
    handle_event(redis_conn, run, parse_event("later", next_day_event("track.completed")))
    settles = [
        ledger.Settle("u0@example.com", first.version, first.change.properties),
        ledger.Settle("u1@example.com", second.version, second.change.properties),
    ]
    assert ledger.settle_many(redis_conn, settles, MAPPING) == 1  # u0 merged meanwhile: dirty
    assert ledger.dirty(redis_conn, 10) == ["u0@example.com"]
    assert ledger.pending(redis_conn, "u1@example.com", MAPPING).change is None


class BudgetedAdapter(CountingAdapter):
    """The dry-run CRM spending a shared request budget, as the real adapters do."""

    def __init__(self, *args: Any, budget: RequestBudget, batch_size: int = 10) -> None:
        super().__init__(*args, batch_size=batch_size)
        self.budget = budget


def budgeted(conn: redis.Redis, path: Path, left: int) -> BudgetedAdapter:
    """An adapter whose budget (10 per 10 s) has ``left`` requests left."""
    budget = RequestBudget(conn, "hold-test", 10, 10.0)
    if left < 10:
        assert budget.try_acquire(10 - left) == 0
    return BudgetedAdapter(conn, MAPPING, path, budget=budget)


def test_a_full_batch_waits_for_its_contacts_to_settle_while_the_budget_binds(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="instruqt_crm.engine.flush")
    dirty_contacts(redis_conn, runtime(redis_url), 30)  # 3 batches of 10, 2 requests left
    adapter = budgeted(redis_conn, tmp_path / "out.jsonl", left=2)
    dirty = ledger.dirty_since(redis_conn, 10)
    wait = batch_wait(redis_conn, adapter, dirty, window=1.0, hold=4.0)
    assert 3.0 < wait <= 4.0  # its newest contact became dirty just now
    report = flush(redis_conn, adapter, MAPPING, window=1.0, hold=4.0)
    assert adapter.calls == [] and isinstance(report.next, Reschedule)
    assert report.next.after > 3.0
    assert "30 contacts wait and 2 requests are left in the budget: holding" in caplog.text
    assert batch_wait(redis_conn, adapter, dirty, window=0.0, hold=4.0) == 0  # on demand
    settled = [(key, since - 4.0) for key, since in dirty]  # as if 4 s had passed
    assert batch_wait(redis_conn, adapter, settled, window=1.0, hold=4.0) == 0


def test_a_full_batch_goes_at_once_when_the_budget_can_carry_every_dirty_contact(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    dirty_contacts(redis_conn, runtime(redis_url), 30)  # 3 batches, 3 requests left
    adapter = budgeted(redis_conn, tmp_path / "out.jsonl", left=3)
    report = flush(redis_conn, adapter, MAPPING, window=1.0, hold=4.0)
    assert adapter.calls == [10, 10, 10] and report.next is None
    unbudgeted = CountingAdapter(redis_conn, MAPPING, tmp_path / "o.jsonl", batch_size=10)
    dirty_contacts(redis_conn, runtime(redis_url), 30)
    ledger.mark_dirty(redis_conn, [f"u{n}@example.com" for n in range(30)])
    dirty = ledger.dirty_since(redis_conn, 10)
    assert batch_wait(redis_conn, unbudgeted, dirty, window=1.0, hold=4.0) == 0  # dry run


def test_a_partial_batch_waits_out_the_window_whatever_the_budget(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    dirty_contacts(redis_conn, runtime(redis_url), 5)
    adapter = budgeted(redis_conn, tmp_path / "out.jsonl", left=10)
    dirty = ledger.dirty_since(redis_conn, 10)
    assert 0.5 < batch_wait(redis_conn, adapter, dirty, window=1.0, hold=4.0) <= 1.0


def test_a_flush_out_of_time_with_contacts_left_asks_to_go_on_at_once(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    adapter = CountingAdapter(redis_conn, MAPPING, tmp_path / "out.jsonl")
    assert flush(redis_conn, adapter, MAPPING, time_budget=0).next is None  # nothing dirty
    dirty_contacts(redis_conn, runtime(redis_url), 3)
    next_step = flush(redis_conn, adapter, MAPPING, time_budget=0).next
    assert isinstance(next_step, Reschedule) and next_step.after == 0.0


def test_plays_that_spend_the_time_budget_leave_new_contacts_to_the_window(
    redis_conn: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the contacts ran out of time is read before the plays are sent: contacts that
    changed while plays used up the budget wait for the window, not go at once."""
    now = [100.0]
    clock = SimpleNamespace(monotonic=lambda: now[0], time=time.time)
    monkeypatch.setattr(flush_module, "time", clock)

    def plays_using_the_budget(
        conn: redis.Redis, adapter: Any, deadline: float, idle_seconds: int
    ) -> PlaysFlushed:
        now[0] = deadline + 1
        ledger.mark_dirty(conn, ["late@example.com"])  # a contact changed meanwhile
        return PlaysFlushed(Tally())

    monkeypatch.setattr(flush_module, "flush_plays", plays_using_the_budget)
    adapter = CountingAdapter(redis_conn, MAPPING, tmp_path / "out.jsonl")
    report = flush(redis_conn, adapter, MAPPING, window=1.0)
    assert report.next == Reschedule(1.0, "changes arrived during the flush")
