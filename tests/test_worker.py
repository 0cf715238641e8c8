"""The worker: runs queued events with the JSON serializer, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from instruqt_crm.jobs import RECEIVED_KEY
from instruqt_crm.queueing import EVENTS_QUEUE, enqueue_event, queue
from instruqt_crm.workers import build_worker
from tests.signing import SECRET, track_event

ROOT = Path(__file__).resolve().parent.parent


def test_simple_worker_drains_events(redis_conn: redis.Redis) -> None:
    for number in range(3):
        enqueue_event(redis_conn, f"msg_{number}", track_event(user_id=f"u{number}"), 3600)
    enqueue_event(redis_conn, "msg_review", {"type": "review.created", "user_id": "u0"}, 3600)
    build_worker(redis_conn, simple=True).work(burst=True)
    assert queue(EVENTS_QUEUE, redis_conn).count == 0
    assert redis_conn.hgetall(RECEIVED_KEY) == {
        b"track.challenge_attempted": b"3",
        b"review.created": b"1",
    }


def test_worker_process_runs_jobs_and_stops_on_sigterm(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "INSTRUQT_WEBHOOK_SECRET": SECRET}
    process = subprocess.Popen(
        [sys.executable, "worker.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        enqueue_event(redis_conn, "msg_live", track_event(), 3600)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not redis_conn.hget(
            RECEIVED_KEY, "track.challenge_attempted"
        ):
            time.sleep(0.1)
        assert redis_conn.hget(RECEIVED_KEY, "track.challenge_attempted") == b"1"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read().decode() if process.stdout else ""
    assert SECRET not in output
