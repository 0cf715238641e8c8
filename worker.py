"""Worker entry (Procfile ``worker``): preload the package, run an RQ worker with its scheduler."""

import sys

import instruqt_crm.engine.jobs  # noqa: F401  preloaded so each forked job starts fast
from instruqt_crm.engine.worker import run_worker

if __name__ == "__main__":
    sys.exit(run_worker())
