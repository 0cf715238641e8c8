"""Lua scripts after a Redis restart: a pipeline that redis-py sends again, after a restart
emptied Redis's script cache, still runs its scripts, so no write is lost without a word."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.client import Pipeline

from instruqt_crm import redis_scripts
from instruqt_crm.config import Settings
from instruqt_crm.engine.queueing import connect
from samples.history import history
from tests.engine_helpers import drain, engine_runtime, enqueue_all, installed, merged_ids
from tests.redis_process import RedisProcess

INCREMENT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
def restartable() -> Iterator[RedisProcess]:
    """A private Redis that keeps its data across a restart (append-only file)."""
    server = RedisProcess(persistent=True).start()
    yield server
    server.stop()


def client(server: RedisProcess) -> redis.Redis:
    """A client as the web and worker processes make it (its retries included)."""
    return connect(Settings.from_env({"REDIS_URL": server.url}))


def restart(server: RedisProcess) -> None:
    """Crash Redis (SIGKILL) and start it again: data kept, script cache empty. Redis 7 (as
    platforms run it) keeps no script in its append-only file; the test's Redis may be 6.2,
    which replays the scripts it loaded, so the cache is emptied as Redis 7 leaves it."""
    assert server.process is not None
    server.process.kill()
    server.process.wait(timeout=10)
    server.start()
    redis.Redis(port=server.port).script_flush()


@pytest.fixture
def restart_before_a_scripted_pipeline(
    restartable: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """Restart Redis once, just before the first non-transactional pipeline holding a script
    is sent: after the pipeline looked for its scripts, before redis-py sends it (and, its
    connection dead, sends it again). Gives the number of restarts made."""
    original = Pipeline._execute_pipeline
    restarts: list[int] = []

    def send(self: Pipeline, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        scripted = any(str(args[0]).upper() in ("EVAL", "EVALSHA") for args, _ in commands)
        if scripted and not restarts:
            restarts.append(1)
            restart(restartable)
        return original(self, connection, commands, raise_on_error)

    monkeypatch.setattr(Pipeline, "_execute_pipeline", send)
    return restarts


def test_a_script_runs_on_a_connection_after_redis_lost_it(restartable: RedisProcess) -> None:
    conn = client(restartable)
    assert redis_scripts.run(conn, INCREMENT, ["n"], [2]) == 2
    restart(restartable)
    assert redis_scripts.run(conn, INCREMENT, ["n"], [3]) == 5


def test_a_pipeline_sent_again_after_a_restart_runs_its_scripts(
    restartable: RedisProcess, restart_before_a_scripted_pipeline: list[int]
) -> None:
    conn = client(restartable)
    assert redis_scripts.run(conn, INCREMENT, ["n"], [1]) == 1  # Redis knows the script
    with conn.pipeline(transaction=False) as pipe:
        redis_scripts.run(pipe, INCREMENT, ["n"], [10])
        pipe.set("plain", "1")
        replies = pipe.execute()
    assert restart_before_a_scripted_pipeline == [1]
    assert replies == [11, True]
    assert conn.get("n") == b"11"


def test_a_batch_handled_across_a_restart_keeps_every_trail_entry(
    restartable: RedisProcess,
    restart_before_a_scripted_pipeline: list[int],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The batch's trail entries go in one pipeline with its counters: Redis restarting as it
    is sent must not drop them (``trace`` and the fault suite's accounting read them)."""
    conn = client(restartable)
    events = history(6, seed=11)
    pairs = [(f"msg_{n:04d}", event) for n, event in enumerate(events)]
    enqueue_all(conn, pairs)
    with installed(engine_runtime(restartable.url, tmp_path)), caplog.at_level(logging.WARNING):
        drain(conn)
    assert restart_before_a_scripted_pipeline == [1]
    assert not [r for r in caplog.records if "write failed" in r.getMessage()]
    merged = set().union(
        *(merged_ids(conn, email) for email in {f"learner{n:05d}@example.com" for n in range(6)})
    )
    developer = {msg_id for msg_id, event in pairs if event.get("is_developer_play")}
    assert merged == {msg_id for msg_id, _ in pairs} - developer
