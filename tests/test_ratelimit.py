"""The shared request budget, on a real Redis: limits hold across threads and processes."""

from __future__ import annotations

import multiprocessing
import threading
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instruqt_crm import keys
from instruqt_crm.errors import RateLimited
from instruqt_crm.ratelimit import PAUSE_STEP, RequestBudget

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


def server_time(conn: redis.Redis) -> float:
    """The Redis server's TIME as epoch seconds."""
    seconds, micros = conn.time()
    return seconds + micros / 1e6


def never_sleep(seconds: float) -> None:
    raise AssertionError(f"slept {seconds} s")


def test_server_time_is_the_default(redis_conn):
    """Without a clock, grants and pauses are stamped with Redis TIME (bracketed by reading it)."""
    budget = RequestBudget(redis_conn, "server-time", 2, 3600.0, sleep=never_sleep)
    before = server_time(redis_conn)
    assert budget.try_acquire() == 0.0 and budget.try_acquire() == 0.0
    wait = budget.try_acquire()
    after = server_time(redis_conn)
    assert 3600.0 - (after - before) - 1e-5 <= wait <= 3600.0 + 1e-5
    with pytest.raises(RateLimited):
        budget.acquire(timeout=1.0)  # it knew the wait without sleeping on it

    before = server_time(redis_conn)
    until = budget.pause_for(30, "test")
    after = server_time(redis_conn)
    assert until is not None and before + 30 - 1e-5 <= until <= after + 30 + 1e-5
    assert budget.paused_until() == until


def test_acquire_without_a_clock_sleeps_in_steps(redis_conn):
    """Without a clock, acquire sleeps (injected) in max_step steps on a full window and in
    PAUSE_STEP steps on a pause, asking Redis again after each."""
    slept: list[float] = []

    def time_passes(seconds: float) -> None:
        slept.append(seconds)
        redis_conn.delete(budget.key, budget.pause_key)  # as if the window or pause ended

    budget = RequestBudget(redis_conn, "server-steps", 1, 3600.0, sleep=time_passes)
    assert budget.acquire() == 0.0
    budget.acquire()
    assert slept == [budget.max_step]
    budget.pause_for(30, "test")
    budget.acquire()
    assert slept == [budget.max_step, PAUSE_STEP]
    assert budget.remaining() == 0  # the last grant was recorded


def test_decoded_connections_work(redis_url, clock):
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    budget = RequestBudget(conn, "decoded", 1, 1.0, clock=clock, sleep=clock.sleep)
    assert budget.try_acquire() == 0.0
    budget.pause_for(2, "x")
    assert budget.paused_until() == START + 2
    conn.close()


LIMIT, WINDOW = 10, 0.2
TRIES = 15  # try_acquire calls per worker on a budget whose window never ends
SENTINEL = "instruqt_crm:test:sentinel"


@pytest.fixture
def undisturbed(redis_conn):
    """A check that the test's database was not emptied under it (each run claims its own)."""
    redis_conn.set(SENTINEL, "1")

    def check() -> None:
        assert redis_conn.exists(SENTINEL), "the test database was emptied during the test"

    return check


def hammer(url: str, name: str, grants: int) -> tuple[int, list[float]]:
    """One worker: TRIES try_acquire calls on budget ``name``-fixed (3600 s window), then
    ``grants`` blocking acquires on ``name``-rolling; (tries granted, Redis times of grants)."""
    conn = redis.Redis.from_url(url)
    try:
        fixed = RequestBudget(conn, f"{name}-fixed", LIMIT, 3600.0)
        tried = sum(fixed.try_acquire() == 0.0 for _ in range(TRIES))
        rolling = RecordingBudget(conn, f"{name}-rolling", LIMIT, WINDOW)
        for _ in range(grants):
            rolling.acquire(timeout=60)
        return tried, rolling.grants
    finally:
        conn.close()


def check_hammered(conn, name: str, results: list[tuple[int, list[float]]], grants: int) -> None:
    """Exactly LIMIT tries were granted of all; every blocking acquire was granted, never more
    than LIMIT in any window (by Redis TIME, so no bound on how long it all took)."""
    assert sum(tried for tried, _ in results) == LIMIT
    assert conn.zcard(keys.budget(f"{name}-fixed")) == LIMIT
    times = [t for _, granted in results for t in granted]
    assert len(times) == len(results) * grants
    assert busiest_window(times, WINDOW) <= LIMIT


def test_never_more_than_limit_across_threads(redis_url, redis_conn, undisturbed):
    workers, grants = 8, 4
    results: list[tuple[int, list[float]]] = []
    start = threading.Barrier(workers)

    def work() -> None:
        start.wait()
        results.append(hammer(redis_url, "threads", grants))

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    undisturbed()
    assert len(results) == workers  # a thread that raised reports nothing
    check_hammered(redis_conn, "threads", results, grants)


def _hammer_process(url: str, grants: int, ready, go, out) -> None:
    """One worker process: hammer once the test says go, then report."""
    ready.put(True)
    go.wait()
    out.put(hammer(url, "processes", grants))


def test_never_more_than_limit_across_processes(redis_url, redis_conn, undisturbed):
    workers, grants = 3, 8
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_hammer_process, args=(redis_url, grants, ready, go, out))
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=60)
    go.set()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
        assert proc.exitcode == 0
    undisturbed()
    check_hammered(redis_conn, "processes", results, grants)


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
