"""``worker.py`` with RQ's SimpleWorker (no fork per job), for comparison runs only.

    python -m bench.simple_worker

Same queues, serializer, preflight and scheduler as ``instruqt_crm.workers.run_worker``; the
only difference is ``build_worker(conn, simple=True)``.
"""

from __future__ import annotations

import sys

import instruqt_crm.jobs  # noqa: F401  preloaded, as worker.py does
from instruqt_crm.logs import configure_logging
from instruqt_crm.queueing import connect
from instruqt_crm.runtime import current_runtime
from instruqt_crm.workers import build_worker, preflight


def main() -> int:
    """Run a SimpleWorker until stopped."""
    runtime = current_runtime()
    configure_logging(runtime.settings.log_level)
    conn = connect(runtime.settings.redis_url)
    preflight(runtime, conn)
    worker = build_worker(conn, simple=True)
    worker.work(with_scheduler=True, logging_level=runtime.settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
