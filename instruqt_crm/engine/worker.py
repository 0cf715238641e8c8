"""The RQ worker process: our queues, the JSON serializer, the scheduler, Heroku-style shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import redis
from rq.exceptions import DeserializationError, InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.queue import Queue
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker, HerokuWorker, SimpleWorker, Worker

from instruqt_crm import redis_scripts
from instruqt_crm.config import Settings, SettingsError
from instruqt_crm.crm.base import missing_properties
from instruqt_crm.crm.hubspot_setup import upsert_key_problem
from instruqt_crm.errors import NotReady, SyncError
from instruqt_crm.keys import text
from instruqt_crm.logs import configure, rq_level
from instruqt_crm.mapping import MappingError

from . import identity, inbox, ledger, mapping_record, memory, plays
from .dequeue import AppQueue, TakesThroughIntermediateLists
from .flush import release_backfilled, schedule_flush, wake_stalled
from .queueing import (
    ALLOWED_JOBS,
    QUEUE_NAMES,
    RETRY_PARKED_JOB,
    connect,
    queue,
    queues,
    schedule_once,
    unreachable,
)
from .runtime import Runtime, current, install

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The worker must not start; the message says why and what to do."""


class RefusedJob(Exception):
    """A job that is not one of ours: it fails without anything it names being imported."""


class AppJob(Job):
    """A job as our workers read it from Redis: only our job functions run.

    RQ imports and calls whatever dotted name a job holds, so anyone able to write to Redis
    could queue ``os.system``. Here the name is checked against ``ALLOWED_JOBS`` before
    anything is imported: any other function, a method of a stored object, callbacks or
    webhooks make the job fail with ``RefusedJob`` (into RQ's failed registry, not retried).
    Callbacks and webhooks are never loaded or sent for any job (ours register none), also
    when RQ's registry clean-up handles a job it thinks a dead worker left.
    """

    def refusal(self) -> str | None:
        """Why this job must not run; None for one of ours."""
        try:
            name, instance = self.func_name, self.instance
        except DeserializationError:
            return "its data is not a JSON job"
        if not isinstance(name, str) or name not in ALLOWED_JOBS:
            return "not one of our job functions"
        if instance is not None:
            return "our jobs are functions, not methods of a stored object"
        callbacks = (self._success_callback_name, self._failure_callback_name)
        if any(callbacks) or self._stopped_callback_name:
            return "our jobs have no callbacks"
        if self.webhooks:
            return "our jobs have no webhooks"
        return None

    def _shown_name(self) -> str:
        try:
            return repr(self.func_name)[:200]
        except DeserializationError:
            return "(unreadable)"

    @property
    def func(self) -> Any:
        """The job's function, imported only when it is one of ours."""
        reason = self.refusal()
        if reason is not None:
            name = self._shown_name()
            log.error("refused job %s naming %s: %s", self.id, name, reason)
            raise RefusedJob(
                f"refused job naming {name}: {reason} "
                f"(a worker runs only {', '.join(sorted(ALLOWED_JOBS))})"
            )
        return super().func

    @property
    def should_retry(self) -> bool:
        """A refused job is not retried: it would be refused again."""
        return self.refusal() is None and bool(super().should_retry)

    @property
    def success_callback(self) -> None:
        """Never a callback named in Redis (our jobs have none)."""
        return None

    @property
    def failure_callback(self) -> None:
        """Never a callback named in Redis (our jobs have none)."""
        return None

    @property
    def stopped_callback(self) -> None:
        """Never a callback named in Redis (our jobs have none)."""
        return None

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        """Nothing is sent: our jobs register no webhooks, and a URL in Redis is not ours."""


def worker_queues(conn: redis.Redis) -> list[Queue]:
    """The app's queues as a worker reads them (the jobs queue first): JSON, jobs read as
    ``AppJob``, taken through their intermediate lists (``dequeue``)."""
    return [
        AppQueue(name, connection=conn, serializer=JSONSerializer, job_class=AppJob)
        for name in QUEUE_NAMES
    ]


MEMORY_WATCH = memory.MemoryWatch()  # this worker's reading of how full Redis is


class _Maintained:
    """Adds the app's own checks to RQ's periodic maintenance (every ``maintenance_interval``)."""

    connection: redis.Redis

    def run_maintenance_tasks(self) -> None:
        """Free a dead scheduler's lock (RQ then restarts one), RQ's clean-up, safety nets."""
        conn = self.connection
        try:
            release_stale_scheduler_locks(conn)
        except redis.RedisError as exc:
            log.warning("scheduler lock check skipped: %s", exc)
        super().run_maintenance_tasks()  # type: ignore[misc]
        try:
            inbox.wake(conn)  # events without a drain job
            wake_stalled(conn, current().settings.flush_window_seconds)  # a flush lost
            release_backfilled(conn)  # a backfill whose reader stopped
        except redis.RedisError as exc:  # the worker loop reconnects; try again next time
            log.warning("inbox and flush checks skipped: %s", exc)
        MEMORY_WATCH.check(conn)  # logs when Redis is 70 % full or more


class AppWorker(_Maintained, TakesThroughIntermediateLists, HerokuWorker):
    """The production worker: a fork per job, Heroku-style shutdown, inbox safety net."""


class SimpleAppWorker(_Maintained, TakesThroughIntermediateLists, SimpleWorker):
    """The same in-process (tests, comparisons)."""


def build_worker(conn: redis.Redis, simple: bool = False, name: str | None = None) -> BaseWorker:
    """A worker on the app's queues; HerokuWorker forks per job, SimpleWorker runs in-process.
    Either runs only our job functions (``AppJob``)."""
    worker_class = SimpleAppWorker if simple else AppWorker
    return worker_class(
        worker_queues(conn),
        connection=conn,
        serializer=JSONSerializer,
        job_class=AppJob,
        queue_class=AppQueue,
        name=name,
        maintenance_interval=15,  # safety nets and killed workers' jobs found sooner
        worker_ttl=30,  # idle workers wake every ~15 s, so maintenance runs when idle too
    )


# A live scheduler refreshes its lock to interval + 60 s every interval (1 s): a lock with
# less than 45 s left has not been refreshed for 15 s, so its owner is gone, wherever it ran.
_FREE_UNREFRESHED_LOCK = """
local left = redis.call('PTTL', KEYS[1])
if left >= 0 and left < tonumber(ARGV[1]) then return redis.call('DEL', KEYS[1]) end
return 0
"""
STALE_LOCK_MS = 45_000


def release_stale_scheduler_locks(conn: redis.Redis) -> list[str]:
    """Free scheduler locks whose owner is dead: on this host with no process, or silent 15 s."""
    freed = []
    for name in QUEUE_NAMES:
        lock_key = RQScheduler.get_locking_key(name)
        owner = conn.get(lock_key)
        if owner is None:
            continue
        info = {text(k): text(v) for k, v in conn.hgetall(f"rq:scheduler:{text(owner)}").items()}
        dead_here = info.get("hostname") == socket.gethostname() and not _alive(
            int(info.get("pid", 0))
        )
        if (dead_here and conn.delete(lock_key)) or redis_scripts.run(
            conn, _FREE_UNREFRESHED_LOCK, [lock_key], [STALE_LOCK_MS]
        ):
            freed.append(name)
    if freed:
        log.warning("freed scheduler locks left by a dead scheduler: %s", ", ".join(freed))
    return freed


def requeue_orphans(conn: redis.Redis) -> list[str]:
    """Put back jobs that a dead worker on this host was running (e.g. after SIGKILL)."""
    requeued = []
    for jobs in queues(conn):
        requeued += _requeue_taken_not_started(conn, jobs)
        registry = jobs.started_job_registry
        for job_id in registry.get_job_ids(cleanup=False):
            try:
                job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
                if not job.worker_name or not worker_gone(conn, job.worker_name):
                    continue
                executions = [execution.composite_key for execution in job.get_executions()]
                if executions and conn.zrem(registry.key, *executions):  # we took it: put it back
                    queue(job.origin, conn).enqueue_job(job)
                    requeued.append(job_id)
            except (NoSuchJobError, InvalidJobOperation):
                continue  # finished, or put back by another starting worker
    if requeued:
        log.warning("requeued %d job(s) of dead workers: %s", len(requeued), ", ".join(requeued))
    return requeued


def _requeue_taken_not_started(conn: redis.Redis, jobs: Queue) -> list[str]:
    """Jobs a worker took off the queue (BLMOVE) but never started: it died in between."""
    started = set(jobs.started_job_registry.get_job_ids(cleanup=False))
    requeued = []
    for raw in conn.lrange(jobs.intermediate_queue_key, 0, -1):
        job_id = text(raw)
        if job_id in started or not conn.lrem(jobs.intermediate_queue_key, 1, job_id):
            continue
        try:
            jobs.enqueue_job(Job.fetch(job_id, connection=conn, serializer=JSONSerializer))
        except NoSuchJobError:
            continue
        requeued.append(job_id)
    return requeued


def worker_gone(conn: redis.Redis, worker_name: str) -> bool:
    """Whether a worker is gone: stopped, unregistered, or on this host with no process."""
    owner = Worker.find_by_key(f"{Worker.redis_worker_namespace_prefix}{worker_name}", conn)
    if owner is None or owner.death_date is not None:
        return True
    return owner.hostname == socket.gethostname() and not _alive(owner.pid or 0)


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie does not count)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def preflight(runtime: Runtime, conn: redis.Redis) -> None:
    """Refuse to start when Redis's eviction policy could drop queued events or state, or the
    CRM lacks mapped properties (or cannot upsert on the mapping's key); resume pending work
    otherwise."""
    refusal = memory.read(conn).refusal()
    if refusal:
        raise StartupError(refusal)
    mapping = runtime.mapping
    try:
        known = runtime.adapter(conn).describe()  # one call
    except NotReady as exc:  # the account's own check: its reason names each problem and fix
        raise StartupError(exc.reason) from exc
    except SyncError as exc:
        raise StartupError(f"cannot read the CRM's fields: {exc.reason}") from exc
    missing = missing_properties(known, mapping.properties)
    if missing:
        raise StartupError(
            f"the {mapping.crm} account lacks {len(missing)} mapped propert"
            f"{'y' if len(missing) == 1 else 'ies'}: {', '.join(missing)}. "
            f"Create them with: instruqt-crm setup {mapping.crm}"
        )
    if mapping.crm == "hubspot" and (problem := upsert_key_problem(mapping, known)):
        raise StartupError(f"the hubspot account cannot take the mapping: {problem}")
    release_stale_scheduler_locks(conn)
    requeue_orphans(conn)
    if ledger.dirty_count(conn) or plays.dirty_count(conn):  # left by a stopped worker
        schedule_flush(conn, 0, force=True)
    inbox.wake(conn)  # events accepted while no worker ran, or held by a killed one
    if identity.parked_count(conn):
        schedule_once(conn, RETRY_PARKED_JOB, 1, 60)


def run_worker(burst: bool = False, simple: bool = False) -> int:
    """Run a worker until stopped (SIGTERM: the current job finishes or is retried later);
    ``simple``: RQ's SimpleWorker, no fork per job (comparisons only)."""
    try:
        runtime = Runtime.from_settings(Settings.from_env())
    except (SettingsError, MappingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    install(runtime)  # every job this worker (and its forks) runs is handed this one
    configure(runtime.settings)
    conn = connect(runtime.settings)
    try:
        conn.ping()
        preflight(runtime, conn)
    except redis.RedisError as exc:
        log.error("worker not started: Redis: %s", unreachable(exc))
        return 1
    except StartupError as exc:
        log.error("worker not started: %s", exc)
        return 1
    worker = build_worker(conn, simple)
    mapping = runtime.mapping
    log.info("worker %s runs mapping %s (%s)", worker.name, mapping.source, mapping.digest)
    mapping_record.record_running(conn, worker.name, mapping, lambda n: worker_gone(conn, n))
    log.info("worker %s listening on %s", worker.name, ", ".join(worker.queue_names()))
    rq_logs = rq_level(runtime.settings.log_level)  # RQ's housekeeping only from WARNING
    worker.work(burst=burst, with_scheduler=True, logging_level=rq_logs)
    return 0


if __name__ == "__main__":
    sys.exit(run_worker())
