"""Whoever can write to Redis cannot run code in our processes: workers run only our job
functions, and the dashboard never unpickles what a job hash holds."""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import rq
from flask.testing import FlaskClient
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.engine.inbox import enqueue_event
from instruqt_crm.engine.queueing import ALLOWED_JOBS, QUEUE_NAME, RETRY_PARKED_JOB, queue
from instruqt_crm.engine.worker import build_worker
from instruqt_crm.receiver.app import create_app
from samples.signing import SECRET, track_event
from tests.engine_helpers import engine_env
from tests.processes import start_worker

ROOT = Path(__file__).resolve().parent.parent
LOGIN = {"RQ_DASHBOARD_USERNAME": "ops", "RQ_DASHBOARD_PASSWORD": "correct-horse-battery"}


def foreign_queue(conn: redis.Redis) -> rq.Queue:
    """Our queue, as anyone with Redis access can reach it through plain RQ."""
    return rq.Queue(QUEUE_NAME, connection=conn, serializer=JSONSerializer)


# ------------------------------------------------------------------ workers


def test_the_allowlist_is_our_four_jobs() -> None:
    assert {name.rsplit(".", 1)[1] for name in ALLOWED_JOBS} == {
        "process_inbox",
        "flush_contacts",
        "retry_parked",
        "requeue_failure",  # each failure's job: RQ's "Requeue" runs it
    }


def test_a_job_naming_another_function_fails_without_running(
    redis_conn: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "ran"
    job = foreign_queue(redis_conn).enqueue("os.system", f"touch {marker}", retry=rq.Retry(max=3))
    with caplog.at_level(logging.ERROR, logger="instruqt_crm.engine.worker"):
        build_worker(redis_conn, simple=True).work(burst=True)
    assert not marker.exists()
    jobs = queue(QUEUE_NAME, redis_conn)
    assert jobs.failed_job_registry.get_job_ids() == [job.id]  # failed, not retried
    assert jobs.count == 0 and jobs.scheduled_job_registry.count == 0
    stored = Job.fetch(job.id, connection=redis_conn, serializer=JSONSerializer)
    assert stored.get_status() == JobStatus.FAILED
    result = stored.latest_result()
    assert result is not None
    assert "RefusedJob: refused job naming 'os.system': not one of our job functions" in (
        result.exc_string or ""
    )
    (record,) = [r for r in caplog.records if r.message.startswith("refused job")]
    assert job.id in record.message and "'os.system'" in record.message


@pytest.fixture
def booby_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """An importable module whose import alone creates a file: (module name, that file)."""
    name = f"booby_{uuid.uuid4().hex}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef run(*args, **kwargs):\n    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


def test_nothing_a_refused_job_names_is_imported(redis_conn: redis.Redis, booby_module) -> None:
    name, marker = booby_module
    jobs = foreign_queue(redis_conn)
    by_name = jobs.enqueue(f"{name}.run")
    callback = rq.Callback(f"{name}.run")
    with_callbacks = jobs.enqueue(
        RETRY_PARKED_JOB, on_success=callback, on_failure=callback, on_stopped=callback
    )
    build_worker(redis_conn, simple=True).work(burst=True)
    assert not marker.exists() and name not in sys.modules
    failed = queue(QUEUE_NAME, redis_conn).failed_job_registry.get_job_ids()
    assert sorted(failed) == sorted([by_name.id, with_callbacks.id])
    stored = Job.fetch(with_callbacks.id, connection=redis_conn, serializer=JSONSerializer)
    assert "our jobs have no callbacks" in (stored.latest_result().exc_string or "")


def test_registry_clean_up_calls_no_callback_named_in_redis(
    redis_conn: redis.Redis, booby_module
) -> None:
    """RQ's maintenance fails jobs a dead worker left "started", calling their failure
    callback: one written into Redis is never imported."""
    name, marker = booby_module
    job = foreign_queue(redis_conn).enqueue(RETRY_PARKED_JOB, on_failure=rq.Callback(f"{name}.run"))
    redis_conn.lrem(queue(QUEUE_NAME, redis_conn).key, 0, job.id)
    job.set_status(JobStatus.STARTED)
    started = StartedJobRegistry(QUEUE_NAME, connection=redis_conn)
    redis_conn.zadd(started.key, {f"{job.id}:dead-execution": time.time() - 60})
    build_worker(redis_conn, simple=True).clean_registries()
    assert not marker.exists() and name not in sys.modules
    assert queue(QUEUE_NAME, redis_conn).failed_job_registry.get_job_ids() == [job.id]


def test_the_worker_process_refuses_foreign_jobs_and_keeps_working(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """The production worker (a fork per job) as the Procfile runs it."""
    marker = tmp_path / "ran"
    foreign = foreign_queue(redis_conn).enqueue("os.system", f"touch {marker}")
    process = start_worker(engine_env(redis_url, tmp_path))
    try:
        enqueue_event(redis_conn, "msg_live", track_event(params={"email": "a@b.co"}), 3600)
        failed = queue(QUEUE_NAME, redis_conn).failed_job_registry
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            redis_conn.hget(keys.STATS, "events:merged") and foreign.id in failed.get_job_ids()
        ):
            time.sleep(0.1)
        assert foreign.id in failed.get_job_ids()
        assert redis_conn.hget(keys.STATS, "events:merged") == b"1"  # our jobs still run
    finally:
        process.send_signal(signal.SIGTERM)  # how it stops is test_worker.py's business
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output = process.stdout.read().decode() if process.stdout else ""
    assert not marker.exists()
    assert f"refused job {foreign.id} naming 'os.system'" in output
    assert SECRET not in output


# ------------------------------------------------------------------ the dashboard


class Trap:
    """Unpickled, it creates a directory: proof that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def trapped_job(conn: redis.Redis, marker: Path) -> str:
    """A failed job whose meta and result are pickles that create ``marker`` when loaded,
    and a registered worker that seems to be running it."""
    jobs = queue(QUEUE_NAME, conn)
    job = jobs.enqueue(RETRY_PARKED_JOB)
    worker = SimpleWorker([jobs], connection=conn, serializer=JSONSerializer)
    worker.register_birth()
    worker.prepare_execution(job)
    jobs.remove(job.id)
    job.set_status(JobStatus.FAILED)
    jobs.failed_job_registry.add(job, ttl=3600, exc_string="boom")
    payload = pickle.dumps(Trap(marker))
    conn.hset(job.key, mapping={"meta": payload, "result": payload})
    return job.id


def dashboard(redis_conn: redis.Redis, redis_url: str) -> FlaskClient:
    settings = Settings.from_env(
        {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url, **LOGIN}
    )
    client = create_app(settings, conn=redis_conn).test_client()
    login = f"{LOGIN['RQ_DASHBOARD_USERNAME']}:{LOGIN['RQ_DASHBOARD_PASSWORD']}"
    client.environ_base["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(login.encode()).decode()
    client.environ_base["HTTP_ORIGIN"] = "http://localhost"
    return client


def test_the_trap_is_live(redis_conn: redis.Redis, tmp_path: Path) -> None:
    """RQ's default serializer (pickle) springs it: the tests below would see it."""
    marker = tmp_path / "unpickled"
    job_id = trapped_job(redis_conn, marker)
    Job.fetch(job_id, connection=redis_conn)
    assert marker.exists()


def test_opening_deleting_and_requeueing_a_job_unpickles_nothing(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    client = dashboard(redis_conn, redis_url)
    job_id = trapped_job(redis_conn, marker)
    page = client.get(f"/rq/0/view/job/{job_id}")
    assert page.status_code == 200 and job_id in page.get_data(as_text=True)
    assert not marker.exists()
    details = client.get(f"/rq/0/data/job/{job_id}.json").json
    assert details["id"] == job_id and details["status"] == "failed"
    assert details["metadata"] == json.dumps({"unserialized": "(not JSON: not read)"})
    workers = client.get("/rq/0/data/workers.json").json["workers"]
    assert [w["current_job"]["job_id"] for w in workers] == [job_id]
    assert not marker.exists()
    assert client.post(f"/rq/job/{job_id}/requeue").json["status"] == "OK"
    assert queue(QUEUE_NAME, redis_conn).job_ids == [job_id]  # back in the queue
    assert not marker.exists()
    assert client.post(f"/rq/job/{job_id}/delete").json["status"] == "OK"
    assert not Job.exists(job_id, redis_conn)
    assert not marker.exists()
    assert client.get(f"/rq/0/view/job/{job_id}").status_code == 404
    job_id = trapped_job(redis_conn, marker)
    assert client.post(f"/rq/requeue/{QUEUE_NAME}").json == {"status": "OK", "count": 1}
    assert client.post(f"/rq/queue/{QUEUE_NAME}/queued/empty").json["status"] == "OK"
    assert not Job.exists(job_id, redis_conn)
    job_id = trapped_job(redis_conn, marker)
    assert client.post(f"/rq/queue/{QUEUE_NAME}/failed/empty").json["status"] == "OK"
    assert not Job.exists(job_id, redis_conn)
    assert not marker.exists()


REGISTRY_NAMES = ["queued", "failed", "started", "deferred", "finished", "scheduled", "canceled"]


def test_no_dashboard_route_unpickles(redis_conn: redis.Redis, redis_url: str, tmp_path: Path):
    """Every route rq-dashboard has (a new version's too), every method and registry, with a
    trapped job and a worker running it in Redis."""
    marker = tmp_path / "unpickled"
    client = dashboard(redis_conn, redis_url)
    app = client.application
    rules = [
        rule
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("rq_dashboard.") and rule.endpoint != "rq_dashboard.static"
    ]
    assert len(rules) >= 15
    calls = 0
    for rule in rules:
        for registry_name in REGISTRY_NAMES if "registry_name" in rule.arguments else [None]:
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                redis_conn.flushdb()
                job_id = trapped_job(redis_conn, marker)
                queue(QUEUE_NAME, redis_conn).enqueue(RETRY_PARKED_JOB)  # compact needs one
                values = {
                    "instance_number": "0",
                    "job_id": job_id,
                    "queue_name": QUEUE_NAME,
                    "registry_name": registry_name,
                    "per_page": "8",
                    "order": "asc",
                    "page": "1",
                }
                path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m, v=values: v[m.group(1)], rule.rule)
                response = client.open(path, method=method)
                assert response.status_code < 500, (method, path)
                assert not marker.exists(), (method, path)
                calls += 1
    assert calls >= 25
