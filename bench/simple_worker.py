"""``worker.py`` with RQ's SimpleWorker (no fork per job), for comparison runs only.

    python -m bench.simple_worker

Same queues, serializer, preflight and scheduler as ``instruqt_crm.engine.worker.run_worker``;
the only difference is ``simple=True``.
"""

from __future__ import annotations

import sys

import instruqt_crm.engine.jobs  # noqa: F401  preloaded, as worker.py does
from instruqt_crm.engine.worker import run_worker

if __name__ == "__main__":
    sys.exit(run_worker(simple=True))
