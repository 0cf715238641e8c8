"""The shared request budget, on a real Redis: limits hold across threads and processes."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instruqt_crm.errors import RateLimited
from instruqt_crm.ratelimit import RequestBudget

START = 1_700_000_000.0


class FakeClock:
    """A clock that only moves when told to (or when something sleeps on it)."""

    def __init__(self, now: float = START) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


class RecordingBudget(RequestBudget):
    """A budget that notes the (Redis) time of every grant, to check windows afterwards."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.grants: list[float] = []

    def _attempt(self, n):
        attempt = super()._attempt(n)
        if attempt.granted:
            self.grants.extend([attempt.now] * n)
        return attempt


def busiest_window(grants: list[float], window: float) -> int:
    """The most grants any window (t - window, t] holds; the scripts count the same way."""
    grants = sorted(grants)
    best, lo = 0, 0
    for hi, t in enumerate(grants):
        while grants[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def budget(redis_conn, clock) -> RequestBudget:
    return RequestBudget(redis_conn, "hubspot-test", 5, 10.0, clock=clock, sleep=clock.sleep)


def test_grants_up_to_limit_then_says_how_long(budget, clock):
    assert [budget.try_acquire() for _ in range(5)] == [0.0] * 5
    assert budget.try_acquire() == pytest.approx(10.0)
    clock.now += 3
    assert budget.try_acquire() == pytest.approx(7.0)
    clock.now += 7
    assert budget.try_acquire() == 0.0


def test_refused_try_acquire_records_nothing(budget, clock):
    for _ in range(5):
        budget.try_acquire()
    for _ in range(10):
        assert budget.try_acquire() > 0
    clock.now += 10
    assert budget.remaining() == 5


def test_try_acquire_n_waits_for_enough_slots(budget, clock):
    budget.try_acquire(2)
    clock.now += 1
    budget.try_acquire(3)
    assert budget.try_acquire(3) == pytest.approx(10.0)  # the first two must leave
    assert budget.try_acquire(4) == pytest.approx(10.0)
    clock.now += 2
    assert budget.try_acquire(5) == pytest.approx(8.0)  # all five must leave


def test_keys_are_prefixed(budget, redis_conn):
    budget.try_acquire()
    budget.pause_for(5, "test")
    names = sorted(k.decode() for k in redis_conn.keys("*"))
    assert names == [
        "instruqt_crm:budget:{hubspot-test}",
        "instruqt_crm:budget:{hubspot-test}:pause",
    ]
    assert all(redis_conn.pttl(k) > 0 for k in names)


def test_acquire_waits_when_full(budget, clock):
    for _ in range(5):
        assert budget.acquire() == 0.0
    clock.now += 4
    waited = budget.acquire()
    assert waited == pytest.approx(6.0)
    assert clock.now == pytest.approx(START + 10.0)
    assert all(s <= budget.max_step + 1e-9 for s in clock.sleeps)


def test_acquire_timeout_raises_rate_limited(budget, clock):
    for _ in range(5):
        budget.acquire()
    with pytest.raises(RateLimited) as info:
        budget.acquire(timeout=2.0)
    assert info.value.wait == pytest.approx(10.0)
    assert info.value.policy == "window"
    assert clock.now == START  # it knew it could not make it: no pointless sleep
    assert budget.acquire(timeout=10.0) == pytest.approx(10.0)


def test_n_outside_one_to_limit_is_refused(budget):
    with pytest.raises(ValueError):
        budget.acquire(6)
    with pytest.raises(ValueError):
        budget.try_acquire(0)


def test_remaining(budget, clock):
    assert budget.remaining() == 5
    budget.acquire(3)
    assert budget.remaining() == 2
    clock.now += 10
    assert budget.remaining() == 5


def test_pause_is_honoured_by_every_worker(redis_conn, clock):
    one = RequestBudget(redis_conn, "acct", 100, 10.0, clock=clock, sleep=clock.sleep)
    two = RequestBudget(redis_conn, "acct", 100, 10.0, clock=clock, sleep=clock.sleep)
    assert one.paused_until() is None
    assert one.pause_until(START + 30, "429 from HubSpot", policy="TEN_SECONDLY_ROLLING")
    assert two.paused_until() == START + 30
    assert two.remaining() == 0
    assert two.try_acquire() == pytest.approx(30.0)
    with pytest.raises(RateLimited) as info:
        two.acquire(timeout=5)
    assert info.value.wait == pytest.approx(30.0)
    assert info.value.policy == "TEN_SECONDLY_ROLLING"
    assert "429 from HubSpot" in info.value.reason
    assert two.acquire() == pytest.approx(30.0)  # no timeout: waits the pause out
    assert two.paused_until() is None


def test_pause_is_never_shortened(budget, clock):
    assert budget.pause_for(3600, "DAILY quota", policy="DAILY") == START + 3600
    assert budget.pause_for(10, "a later, shorter 429") == START + 3600
    assert budget.pause_until(START + 7200, "longer") == START + 7200
    with pytest.raises(RateLimited) as info:
        budget.acquire(timeout=60)
    assert info.value.wait == pytest.approx(7200)


def test_pause_in_the_past_is_ignored(budget, clock):
    assert budget.pause_until(START - 5, "stale") is None
    assert budget.paused_until() is None
    assert budget.try_acquire() == 0.0


def test_observe_headers_reduces_the_budget(budget, clock):
    budget.acquire(2)
    assert budget.observe_headers(max=100, remaining=1, interval_ms=10_000) == 2
    assert budget.remaining() == 1
    assert budget.observe_headers(max=100, remaining=1, interval_ms=10_000) == 0  # idempotent
    assert budget.observe_headers(max=100, remaining=50, interval_ms=10_000) == 0
    assert budget.remaining() == 1
    clock.now += 10
    assert budget.remaining() == 5


def test_observe_headers_zero_remaining_blocks(budget, clock):
    budget.observe_headers(max=None, remaining=0, interval_ms=None)
    assert budget.remaining() == 0
    assert budget.try_acquire() == pytest.approx(10.0)


def test_phantom_usage_lasts_the_crms_interval(budget, clock):
    budget.observe_headers(max=5, remaining=0, interval_ms=25_000)
    clock.now += 10
    assert budget.remaining() == 0
    assert budget.try_acquire() == pytest.approx(15.0)
    clock.now += 15
    assert budget.remaining() == 5


def test_observe_headers_without_remaining_changes_nothing(budget, caplog):
    assert budget.observe_headers(max=3, remaining=None, interval_ms=10_000) == 0
    assert budget.remaining() == 5
    assert "exceeds the CRM's reported max 3" in caplog.text


def test_server_time_is_the_default(redis_conn):
    budget = RequestBudget(redis_conn, "server-time", 2, 0.2)
    assert budget.acquire() == 0.0
    assert budget.acquire() == 0.0
    waited = budget.acquire(timeout=1.0)
    assert 0.1 < waited < 0.5
    until = budget.pause_for(0.3, "test")
    assert until is not None
    seconds, micros = redis_conn.time()
    assert until == pytest.approx(seconds + micros / 1e6 + 0.3, abs=0.1)
    assert 0.2 < budget.acquire(timeout=2.0) < 0.8


def test_decoded_connections_work(redis_url, clock):
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    budget = RequestBudget(conn, "decoded", 1, 1.0, clock=clock, sleep=clock.sleep)
    assert budget.try_acquire() == 0.0
    budget.pause_for(2, "x")
    assert budget.paused_until() == START + 2
    conn.close()


LIMIT, WINDOW, RUN = 10, 0.3, 1.5
SENTINEL = "instruqt_crm:test:sentinel"


@pytest.fixture
def undisturbed(redis_conn):
    """A check that the test's database was not emptied under it (each run claims its own)."""
    redis_conn.set(SENTINEL, "1")

    def check() -> None:
        assert redis_conn.exists(SENTINEL), "the test database was emptied during the test"

    return check


def test_never_more_than_limit_across_threads(redis_url, undisturbed):
    grants: list[float] = []
    start = threading.Barrier(8)

    def hammer() -> None:
        conn = redis.Redis.from_url(redis_url)
        budget = RecordingBudget(conn, "threads", LIMIT, WINDOW)
        start.wait()
        deadline = time.monotonic() + RUN
        while time.monotonic() < deadline:
            budget.acquire(timeout=5)
        grants.extend(budget.grants)
        conn.close()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    undisturbed()
    assert busiest_window(grants, WINDOW) == LIMIT
    assert len(grants) >= LIMIT * int(RUN / WINDOW)


def _hammer_process(url: str, ready, go, out) -> None:
    """One worker process: acquire as fast as the budget allows, then report grant times."""
    conn = redis.Redis.from_url(url)
    budget = RecordingBudget(conn, "processes", LIMIT, WINDOW)
    ready.put(True)
    go.wait()
    deadline = time.monotonic() + RUN
    while time.monotonic() < deadline:
        budget.acquire(timeout=5)
    out.put(budget.grants)


def test_never_more_than_limit_across_processes(redis_url, undisturbed):
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_hammer_process, args=(redis_url, ready, go, out)) for _ in "abc"]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=60)
    go.set()
    grants = [t for _ in procs for t in out.get(timeout=60)]
    for proc in procs:
        proc.join(timeout=10)
        assert proc.exitcode == 0
    undisturbed()
    assert busiest_window(grants, WINDOW) == LIMIT
    assert len(grants) >= LIMIT * int(RUN / WINDOW)


operation = st.one_of(
    st.tuples(st.just("advance"), st.floats(0, 15, allow_nan=False)),
    st.tuples(st.just("try"), st.integers(1, 4)),
    st.tuples(st.just("acquire"), st.integers(1, 4), st.none() | st.floats(0, 20)),
    st.tuples(st.just("pause"), st.floats(0, 12, allow_nan=False)),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    limit=st.integers(1, 6),
    window=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
    ops=st.lists(operation, max_size=40),
)
def test_no_window_ever_holds_more_than_limit(redis_conn, limit, window, ops):
    clock = FakeClock()
    budget = RequestBudget(
        redis_conn, uuid.uuid4().hex, limit, window, clock=clock, sleep=clock.sleep
    )
    grants: list[float] = []
    pauses: list[tuple[float, float]] = []

    def granted(n: int) -> None:
        assert not [p for p in pauses if p[0] <= clock.now < p[1]], "granted while paused"
        grants.extend([clock.now] * n)

    for op in ops:
        if op[0] == "advance":
            clock.now += op[1]
        elif op[0] == "pause":
            end = budget.pause_for(op[1], "test")
            if end is not None:
                pauses.append((clock.now, end))
        else:
            n = min(op[1], limit)
            if op[0] == "try":
                if budget.try_acquire(n) == 0.0:
                    granted(n)
            else:
                before = clock.now
                try:
                    waited = budget.acquire(n, timeout=op[2])
                except RateLimited as exc:
                    assert exc.wait > 0
                    assert op[2] is not None and clock.now - before + exc.wait > op[2]
                else:
                    assert waited == pytest.approx(clock.now - before)
                    granted(n)
        assert 0 <= budget.remaining() <= limit
    assert busiest_window(grants, window) <= limit
