"""Metrics: counters in Redis; the receiver's Tally writes its counts together, none lost."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.crm.hubspot import hubspot_budget
from instruqt_crm.engine import inbox
from instruqt_crm.engine.queueing import connect
from instruqt_crm.errors import Category
from instruqt_crm.journal import counters, failures
from instruqt_crm.journal.counters import Tally
from instruqt_crm.journal.failures import Kind
from instruqt_crm.keys import text
from instruqt_crm.ops import metrics
from instruqt_crm.receiver.app import create_app
from samples.signing import OTHER_SECRET, SECRET, signed, track_event
from tests.engine_helpers import drain, engine_runtime, installed
from tests.processes import ROOT, answers, start_web, wait_for
from tests.redis_process import free_port


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def counts(conn: redis.Redis, name: str = "webhook_requests") -> dict[str, int]:
    return {text(k): int(v) for k, v in conn.hgetall(keys.metric(name)).items()}


def test_incr_counts_at_once(redis_conn: redis.Redis) -> None:
    counters.incr(redis_conn, "crm_requests", "hubspot", "200")
    counters.incr(redis_conn, "crm_requests", "hubspot", "200", amount=2)
    assert counts(redis_conn, "crm_requests") == {"hubspot\x1f200": 3}


def test_tally_writes_the_first_count_at_once_and_batches_the_rest(
    redis_conn: redis.Redis, clock: Clock
) -> None:
    tally = Tally(redis_conn, interval=1.0, clock=clock)
    tally.incr("webhook_requests", "queued")
    assert counts(redis_conn) == {"queued": 1}  # nothing written lately: written at once
    clock.now += 0.2
    tally.incr("webhook_requests", "queued")
    tally.incr("webhook_requests", "bad_signature")
    assert counts(redis_conn) == {"queued": 1}  # within the interval: kept in memory
    clock.now += 0.9
    tally.incr("webhook_requests", "duplicate")  # the interval is over: all written together
    assert counts(redis_conn) == {"queued": 2, "bad_signature": 1, "duplicate": 1}


def test_render_writes_the_pending_counts_of_its_connection(
    redis_conn: redis.Redis, redis_url: str, clock: Clock
) -> None:
    other = redis.Redis.from_url(redis_url)
    mine, theirs = Tally(redis_conn, clock=clock), Tally(other, clock=clock)
    for tally in (mine, theirs):
        tally.incr("webhook_requests", "queued")
        tally.incr("webhook_requests", "queued")
    assert counts(redis_conn) == {"queued": 2}
    text = metrics.render(redis_conn).decode()
    assert 'instruqt_crm_webhook_requests_total{outcome="queued"} 3.0' in text
    counters.flush_tallies()
    assert counts(redis_conn) == {"queued": 4}
    other.close()


def test_counts_survive_a_failed_write(redis_conn: redis.Redis, clock: Clock) -> None:
    dead = connect(
        Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1"})
    )  # the app's own client: fails fast
    tally = Tally(dead, clock=clock)
    tally.incr("webhook_requests", "bad_signature")  # the write fails: kept, caller unharmed
    clock.now += 5
    tally.incr("webhook_requests", "bad_signature")
    tally.conn = redis_conn  # Redis is back
    tally.flush()
    assert counts(redis_conn) == {"bad_signature": 2}


def test_no_count_lost_between_threads(redis_conn: redis.Redis) -> None:
    tally = Tally(redis_conn, interval=0.001)  # writes while other threads keep counting

    def count() -> None:
        for _ in range(500):
            tally.incr("webhook_requests", "queued")

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tally.flush()
    assert counts(redis_conn) == {"queued": 4000}


def test_a_forked_child_forgets_the_parents_pending_counts(
    redis_conn: redis.Redis, clock: Clock
) -> None:
    tally = Tally(redis_conn, clock=clock)
    tally.incr("webhook_requests", "queued")
    tally.incr("webhook_requests", "queued")  # pending: the parent will write it
    counters._after_fork_in_child()  # what os.fork runs in the child
    tally.flush()
    assert counts(redis_conn) == {"queued": 1}


@pytest.mark.slow
def test_gunicorn_workers_write_their_counts_while_running(
    redis_conn: redis.Redis, redis_url: str, tmp_path
) -> None:
    """The Procfile's web command: the workers' writer threads write the held counts."""
    port = free_port()
    env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url}
    web = start_web(port, env, (tmp_path / "web.log"))
    expected = {"queued": 20, "bad_signature": 2}
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(f"{url}/healthz"), 30, "gunicorn to answer /healthz")
        with requests.Session() as session:
            codes = [
                session.post(f"{url}/webhooks/instruqt", data=body, headers=headers).status_code
                for body, headers in [signed(track_event(), msg_id=f"m{i}") for i in range(20)]
                + [signed(track_event(), secret=OTHER_SECRET)] * 2
            ]
        assert codes == [202] * 20 + [401] * 2
        wait_for(lambda: counts(redis_conn) == expected, 20, "the counts to reach Redis")
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(timeout=30)
    assert counts(redis_conn) == expected


def test_a_process_writes_its_pending_counts_when_it_exits(
    redis_conn: redis.Redis, redis_url: str
) -> None:
    script = (
        "import sys, redis\n"
        "from instruqt_crm.journal.counters import Tally\n"
        "tally = Tally(redis.Redis.from_url(sys.argv[1]), interval=3600)\n"
        "for _ in range(5): tally.incr('webhook_requests', 'queued')\n"
    )
    subprocess.run([sys.executable, "-c", script, redis_url], check=True, cwd=ROOT, timeout=60)
    assert counts(redis_conn) == {"queued": 5}  # 1 at once, 4 at exit


def test_the_background_writer_writes_held_counts(redis_conn: redis.Redis) -> None:
    tally = Tally(redis_conn, interval=3600, background=True)
    tally.incr("webhook_requests", "queued")
    tally.incr("webhook_requests", "queued")
    assert counts(redis_conn) == {"queued": 1}
    wait_for(lambda: counts(redis_conn) == {"queued": 2}, 20, "the writer thread")


def test_observe_adds_to_cumulative_buckets_and_the_sum(redis_conn: redis.Redis) -> None:
    counters.observe(redis_conn, "flush_latency", [0.2, 0.7, 4.0])
    counters.observe(redis_conn, "flush_latency", [4000.0])
    stored = {
        text(k): float(v) for k, v in redis_conn.hgetall(keys.metric("flush_latency")).items()
    }
    assert stored.pop("sum") == pytest.approx(4004.9)
    assert stored == {"0.5": 1, "1": 2, "2": 2, "5": 3, "10": 3, "30": 3, "60": 3, "300": 3,
                      "900": 3, "3600": 3, "+Inf": 4}  # fmt: skip


def gauges(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
    }


def one(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str):
    """The value of one sample, or None when it is not exposed."""
    return found.get((name, tuple(sorted(labels.items()))))


def test_the_gauges_alerts_watch(redis_conn: redis.Redis, redis_url: str, tmp_path) -> None:
    """Open failures by category, the inbox's lag and the time since the last good flush."""
    empty = gauges(metrics.render(redis_conn))
    assert {one(empty, "instruqt_crm_failures_open", category=c.value) for c in Category} == {0}
    assert one(empty, "instruqt_crm_inbox_lag_seconds") == 0
    assert one(empty, "instruqt_crm_seconds_since_last_flush") == math.inf  # none yet

    for number in range(2):
        failures.record(redis_conn, Kind.EVENT, Category.MAPPING, "boom", f"m{number}", "{}")
    failures.record(redis_conn, Kind.CONTACT, Category.VALIDATION, "bad", "a@b.co", "{}")
    body = {**track_event(user_id="u1"), "custom_parameters": {"email": "ann@example.com"}}
    an_hour_ago = int((time.time() - 3600) * 1000)  # accepted an hour ago, not handled since
    redis_conn.xadd(keys.INBOX, {"id": "msg_1", "body": json.dumps(body)}, id=f"{an_hour_ago}-0")

    found = gauges(metrics.render(redis_conn))
    assert one(found, "instruqt_crm_failures_open", category="mapping") == 2
    assert one(found, "instruqt_crm_failures_open", category="validation") == 1
    assert one(found, "instruqt_crm_failures_open", category="auth") == 0
    assert 3600 <= one(found, "instruqt_crm_inbox_lag_seconds") < 3600 + 600
    assert one(found, "instruqt_crm_seconds_since_last_flush") == math.inf

    inbox.wake(redis_conn)
    with installed(engine_runtime(redis_url, tmp_path)):
        drain(redis_conn)  # merged and sent (dry run): a successful flush
    handled = gauges(metrics.render(redis_conn))
    assert one(handled, "instruqt_crm_inbox_lag_seconds") == 0
    assert 0 <= one(handled, "instruqt_crm_seconds_since_last_flush") < 600
    assert one(handled, "instruqt_crm_parked_learners") == 0  # learners waiting for an email
    failures.purge(redis_conn, Category.MAPPING)
    after = gauges(metrics.render(redis_conn))
    assert one(after, "instruqt_crm_failures_open", category="mapping") == 0  # never stale


def test_the_crm_request_budget_left(redis_conn: redis.Redis, redis_url: str, tmp_path) -> None:
    """For the CRM the mapping file picks, when it has credentials; none in a dry run."""
    hubspot = Settings.from_env({"REDIS_URL": redis_url, "HUBSPOT_ACCESS_TOKEN": "pat-1"})
    found = gauges(metrics.render(redis_conn, hubspot))
    assert one(found, "instruqt_crm_crm_budget_remaining", adapter="hubspot") == 90
    assert one(found, "instruqt_crm_crm_budget_limit", adapter="hubspot") == 90

    budget = hubspot_budget(redis_conn, hubspot.hubspot_requests_per_10s)
    budget.acquire(3)
    shown = one(gauges(metrics.render(redis_conn, hubspot)), "instruqt_crm_crm_budget_remaining",
                adapter="hubspot")  # fmt: skip
    assert 87 <= shown <= budget.remaining()  # the requests leave the window as time passes
    budget.pause_for(600, "HubSpot's daily API limit is spent", "DAILY")
    paused = gauges(metrics.render(redis_conn, hubspot))
    assert one(paused, "instruqt_crm_crm_budget_remaining", adapter="hubspot") == 0

    dry_run = Settings.from_env({"REDIS_URL": redis_url})
    names = {name for name, _ in gauges(metrics.render(redis_conn, dry_run))}
    assert "instruqt_crm_crm_budget_remaining" not in names
    broken = tmp_path / "broken.yaml"
    broken.write_text("crm: [")
    unloadable = Settings.from_env({"HUBSPOT_ACCESS_TOKEN": "pat-1", "MAPPING_PATH": str(broken)})
    names = {name for name, _ in gauges(metrics.render(redis_conn, unloadable))}
    assert "instruqt_crm_crm_budget_remaining" not in names and "instruqt_crm_inbox_depth" in names


TOKEN = "metrics-token-0123456789"


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "bearer token required (METRICS_TOKEN is set)"),
        ("Bearer ", "bearer token required (METRICS_TOKEN is set)"),
        ("Basic b3BzOnMzY3JldA==", "bearer token required (METRICS_TOKEN is set)"),
        (f"Bearer {TOKEN}x", "wrong bearer token"),
        (f"Bearer {TOKEN[:-1]}", "wrong bearer token"),
    ],
)
def test_metrics_need_the_bearer_token_when_one_is_set(
    redis_conn: redis.Redis, redis_url: str, authorization: str | None, reason: str
) -> None:
    env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url, "METRICS_TOKEN": TOKEN}
    client = create_app(Settings.from_env(env), conn=redis_conn).test_client()
    headers = {"Authorization": authorization} if authorization is not None else {}
    refused = client.get("/metrics", headers=headers)
    assert refused.status_code == 401
    assert refused.json == {"status": "unauthorized", "reason": reason}
    assert refused.headers["WWW-Authenticate"].startswith('Bearer realm="instruqt-crm metrics"')
    assert ('error="invalid_token"' in refused.headers["WWW-Authenticate"]) == (
        reason == "wrong bearer token"
    )
    assert TOKEN not in refused.get_data(as_text=True)
    for scheme in ("Bearer", "bearer"):
        shown = client.get("/metrics", headers={"Authorization": f"{scheme} {TOKEN}"})
        assert shown.status_code == 200
        assert "instruqt_crm_inbox_depth 0.0" in shown.get_data(as_text=True)


def test_metrics_are_open_without_a_token(redis_conn: redis.Redis, redis_url: str) -> None:
    env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url}
    client = create_app(Settings.from_env(env), conn=redis_conn).test_client()
    assert client.get("/metrics").status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Bearer anything"}).status_code == 200
