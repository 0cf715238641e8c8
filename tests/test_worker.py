"""The worker: runs queued events with the JSON serializer, and stops cleanly on SIGTERM."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import redis
from rq.job import Job
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from instruqt_crm import keys
from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.engine import mapping_record, runtime
from instruqt_crm.engine.inbox import enqueue_event
from instruqt_crm.engine.queueing import FLUSH_JOB, QUEUE_NAME, queue
from instruqt_crm.engine.worker import build_worker, release_stale_scheduler_locks
from instruqt_crm.mapping import load_mapping
from samples.signing import SECRET, track_event
from tests.engine_helpers import drain, engine_env, engine_runtime, installed
from tests.fakes.hubspot import FakeHubSpot
from tests.processes import start_worker

ROOT = Path(__file__).resolve().parent.parent


def test_simple_worker_drains_events(engine, redis_conn: redis.Redis) -> None:
    for number in range(3):
        body = track_event(user_id=f"u{number}", params={"email": f"u{number}@example.com"})
        enqueue_event(redis_conn, f"msg_{number}", body, 3600)
    enqueue_event(redis_conn, "msg_review", {"type": "review.created", "user_id": "u9"}, 3600)
    build_worker(redis_conn, simple=True).work(burst=True)
    assert queue(QUEUE_NAME, redis_conn).count == 0
    assert redis_conn.hget(keys.STATS, "events:merged:track.challenge_attempted") == b"3"
    assert redis_conn.hget(keys.STATS, "events:parked:review.created") == b"1"


def test_worker_process_runs_jobs_and_stops_on_sigterm(
    redis_url: str, redis_conn: redis.Redis, tmp_path
) -> None:
    process = start_worker(engine_env(redis_url, tmp_path))
    try:
        enqueue_event(redis_conn, "msg_live", track_event(params={"email": "a@b.co"}), 3600)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not redis_conn.hget(keys.STATS, "events:merged"):
            time.sleep(0.1)
        assert redis_conn.hget(keys.STATS, "events:merged") == b"1"
        [(name, entry)] = mapping_record.running(redis_conn).items()
        digest = load_mapping("mappings/hubspot.yaml").digest
        assert (entry["digest"], entry["path"]) == (digest, "mappings/hubspot.yaml")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read().decode() if process.stdout else ""
    assert SECRET not in output
    assert f"worker {name} runs mapping mappings/hubspot.yaml ({digest})" in output


def test_maintenance_frees_a_scheduler_lock_nobody_refreshes(redis_conn: redis.Redis) -> None:
    """A scheduler that died with Redis leaves its lock (persisted); maintenance frees it."""
    lock = RQScheduler.get_locking_key(QUEUE_NAME)
    redis_conn.set(lock, "dead-scheduler", px=40_000)  # not refreshed for 21 s: gone
    assert release_stale_scheduler_locks(redis_conn) == [QUEUE_NAME]
    assert not redis_conn.exists(lock)
    redis_conn.set(lock, "live-scheduler", px=60_500)  # refreshed half a second ago
    assert release_stale_scheduler_locks(redis_conn) == []
    assert redis_conn.get(lock) == b"live-scheduler"


def test_maintenance_queues_a_flush_for_contacts_left_waiting(
    redis_url: str, redis_conn: redis.Redis, tmp_path
) -> None:
    installed_run = engine_runtime(redis_url, tmp_path, FLUSH_WINDOW_SECONDS="1")
    runtime.install(installed_run)
    worker = build_worker(redis_conn, simple=True)
    redis_conn.zadd(keys.DIRTY_CONTACTS, {"fresh@example.com": time.time()})
    worker.run_maintenance_tasks()
    assert queue(QUEUE_NAME, redis_conn).count == 0  # not late: left to its own flush
    redis_conn.zadd(keys.DIRTY_CONTACTS, {"stuck@example.com": time.time() - 40})
    worker.run_maintenance_tasks()
    assert [job.func_name for job in queue(QUEUE_NAME, redis_conn).jobs] == [FLUSH_JOB]
    worker.run_maintenance_tasks()
    assert queue(QUEUE_NAME, redis_conn).count == 1  # pending: not queued twice
    runtime.install(None)


def test_jobs_end_with_descriptions_saying_what_they_did(
    redis_url: str, redis_conn: redis.Redis, tmp_path
) -> None:
    with FakeHubSpot() as fake:
        run = engine_runtime(
            redis_url, tmp_path, HUBSPOT_ACCESS_TOKEN=fake.token, HUBSPOT_API_BASE=fake.url
        )
        adapter = HubSpotAdapter(fake.token, fake.url)
        hubspot_setup.apply(adapter, run.mapping, hubspot_setup.plan(adapter, run.mapping))
        for number in range(2):
            body = track_event(user_id=f"u{number}", params={"email": f"u{number}@example.com"})
            enqueue_event(redis_conn, f"msg_{number}", body, 3600)
        enqueue_event(redis_conn, "msg_bad", track_event(user_id=["not", "an", "id"]), 3600)
        waiting = queue(QUEUE_NAME, redis_conn).jobs
        assert [job.description for job in waiting] == ["process_inbox: handle accepted events"]
        with installed(run):
            drain(redis_conn)
    finished = queue(QUEUE_NAME, redis_conn).finished_job_registry.get_job_ids()
    described = {
        Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).description
        for job_id in finished
    }
    assert "process_inbox: 3 events, 1 failed" in described
    [flushed] = described - {"process_inbox: 3 events, 1 failed"}
    assert re.fullmatch(r"flush: 2 contacts → HubSpot \(\d+ requests?\)", flushed), flushed
