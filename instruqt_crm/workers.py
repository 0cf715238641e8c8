"""The RQ worker process: our queues, the JSON serializer, the scheduler, Heroku-style shutdown."""

from __future__ import annotations

import logging

import redis
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker, HerokuWorker, SimpleWorker

from .config import Settings
from .logs import configure_logging
from .queueing import connect, queues

log = logging.getLogger(__name__)


def build_worker(conn: redis.Redis, simple: bool = False, name: str | None = None) -> BaseWorker:
    """A worker on the app's queues; HerokuWorker forks per job, SimpleWorker runs in-process."""
    worker_class = SimpleWorker if simple else HerokuWorker
    return worker_class(queues(conn), connection=conn, serializer=JSONSerializer, name=name)


def run_worker(settings: Settings | None = None, burst: bool = False) -> bool:
    """Run a worker until stopped (SIGTERM: the current job finishes or is retried later)."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    conn = connect(settings.redis_url)
    worker = build_worker(conn)
    log.info("worker %s listening on %s", worker.name, ", ".join(worker.queue_names()))
    return worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level)


if __name__ == "__main__":
    run_worker()
