"""How our workers take jobs: from several queues, each through its intermediate list.

RQ takes a job atomically into a queue's intermediate list (BLMOVE) only when a worker
listens on a single queue; with several it pops the job (BLPOP), and a worker killed right
after loses it. Our workers listen on the jobs queue and on the failed queue (where failures
requeued through RQ wait), so ``AppQueue`` reads every queue with LMOVE: the failed queue
first (requeues are rare and quick), then the jobs queue, waiting on the jobs queue alone
(BLMOVE) for at most ``FAILED_POLL_SECONDS`` before looking at the failed queue again.
``TakesThroughIntermediateLists`` makes a worker drop a job from that list when it starts
(RQ does so itself only on a single queue), as ``worker.requeue_orphans`` expects.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.queue import Queue

from instruqt_crm.keys import text

FAILED_POLL_SECONDS = 5  # an idle worker looks for requeued failures this often


class AppQueue(Queue):
    """A queue whose worker takes jobs through the intermediate lists, from one or more queues."""

    @classmethod
    def dequeue_any(
        cls,
        queues: Iterable[Queue],
        timeout: int | None,
        connection: redis.Redis,
        job_class: type[Job] | None = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[Job, Queue] | None:
        """The next job of ``queues`` (the jobs queue listed first) and its queue: None when
        all are empty and ``timeout`` is None; RQ's DequeueTimeout when none came in time."""
        ordered = list(queues)
        while True:
            taken = None
            for each in reversed(ordered):
                taken = cls.lmove(connection, each.key, None)
                if taken is not None:
                    break
            if taken is None:
                if timeout is None:
                    return None
                taken = cls.lmove(connection, ordered[0].key, min(timeout, FAILED_POLL_SECONDS))
            queue_key, job_id = text(taken[0]), text(taken[1])
            found = cls.from_queue_key(
                queue_key,
                connection=connection,
                job_class=job_class,
                serializer=serializer,
                death_penalty_class=death_penalty_class,
            )
            try:
                return found.job_class.fetch(job_id, connection, serializer), found
            except NoSuchJobError:  # deleted meanwhile: nothing to run
                connection.lrem(found.intermediate_queue_key, 1, job_id)


class TakesThroughIntermediateLists:
    """A worker mixin: take jobs with ``AppQueue``, and drop each from its queue's
    intermediate list when it starts."""

    queue_class = AppQueue

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """RQ's bookkeeping before a job runs, always leaving the intermediate list."""
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)  # type: ignore[misc]
