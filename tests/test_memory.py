"""Knowing before Redis is full: warnings at 70 % and 85 % of maxmemory (status, /status,
/metrics, the logs), 503 when full, and an eviction policy that could drop state refused at
start. Every test runs a private redis-server of its own with a small maxmemory."""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from instruqt_crm.cli import main
from instruqt_crm.config import Settings
from instruqt_crm.engine import memory
from instruqt_crm.ops import metrics, status
from instruqt_crm.receiver.app import create_app
from samples.signing import SECRET, signed, track_event
from tests.engine_helpers import engine_env
from tests.processes import ROOT, start_worker
from tests.redis_process import RedisProcess

LIMIT = 8 * 1024 * 1024
CHUNK = 64 * 1024
FIX = "heroku redis:maxmemory <DATABASE> --policy volatile-lru"


@pytest.fixture
def small_redis() -> Iterator[RedisProcess]:
    """A redis-server with an 8 MiB maxmemory and Heroku's policy, noeviction."""
    server = RedisProcess(options=["--maxmemory", str(LIMIT), "--maxmemory-policy", "noeviction"])
    yield server.start()
    server.stop()


def fill_to(conn: redis.Redis, share: float) -> float:
    """Write 64 KiB values until Redis uses ``share`` of its maxmemory; the share reached."""
    number = 0
    while (used := memory.read(conn).used) < share * LIMIT:
        number += 1
        conn.set(f"filler:{number}", b"\xff" * CHUNK)
    return used / LIMIT


def gauges(exposition: str) -> dict[str, float]:
    """The unlabelled gauges of a Prometheus text exposition, by name."""
    return {
        family.name: family.samples[0].value
        for family in text_string_to_metric_families(exposition)
        if family.type == "gauge" and len(family.samples) == 1 and not family.samples[0].labels
    }


def watched(conn: redis.Redis, caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """What a fresh MemoryWatch logs on one check: (level, message) pairs."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="instruqt_crm.engine.memory"):
        memory.MemoryWatch().check(conn)
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name.endswith(".memory")]


def test_warnings_fire_at_70_and_85_percent(
    small_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    conn = redis.Redis.from_url(small_redis.url)
    settings = Settings.from_env({"REDIS_URL": small_redis.url})
    quiet = memory.read(conn)
    assert (quiet.limit, quiet.policy, quiet.level, quiet.warning()) == (
        LIMIT,
        "noeviction",
        "ok",
        None,
    )
    assert watched(conn, caplog) == []
    assert not any("WARNING" in line for line in status.render(status.collect(conn, settings)))

    reached = fill_to(conn, 0.72)
    assert 0.70 <= reached < 0.85
    found = memory.read(conn)
    assert found.level == "warning"
    assert f"Redis memory {reached:.0%} full" in (found.warning() or "")
    assert "past 70%" in (found.warning() or "") and "refuses writes" in (found.warning() or "")
    [(level, line)] = watched(conn, caplog)
    assert level == logging.WARNING and line == found.warning()
    lines = status.render(status.collect(conn, settings))
    assert f"  WARNING: {found.warning()}" in lines
    assert any(line.startswith(f"Redis         memory {reached:.0%} of 8.4 MB") for line in lines)
    exposed = gauges(metrics.render(conn).decode())
    assert exposed["instruqt_crm_redis_max_memory_bytes"] == LIMIT
    assert 0.70 * LIMIT <= exposed["instruqt_crm_redis_used_memory_bytes"] < 0.85 * LIMIT

    assert 0.85 <= fill_to(conn, 0.86) < 1
    urgent = memory.read(conn)
    assert urgent.level == "urgent" and "past 85%" in (urgent.warning() or "")
    [(level, line)] = watched(conn, caplog)
    assert level == logging.ERROR and "act now" in line


def test_the_watch_warns_when_the_level_rises_then_only_every_repeat(
    small_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    conn = redis.Redis.from_url(small_redis.url)
    now = [0.0]
    watch = memory.MemoryWatch(every=60, repeat=900, clock=lambda: now[0])
    fill_to(conn, 0.72)
    with caplog.at_level(logging.INFO, logger="instruqt_crm.engine.memory"):
        for moment in (0, 30, 60, 120, 900, 960):
            now[0] = moment
            watch.check(conn)
        fill_to(conn, 0.86)
        now[0] = 1020
        watch.check(conn)
        conn.flushall()
        now[0] = 1080
        watch.check(conn)
    logged = [(r.created, r.levelname, r.getMessage()[:20]) for r in caplog.records]
    assert [level for _, level, _ in logged] == ["WARNING", "WARNING", "ERROR", "INFO"]
    assert logged[-1][2] == "Redis memory back un"


def test_the_receiver_warns_as_redis_fills_and_answers_503_when_full(
    small_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    conn = redis.Redis.from_url(small_redis.url)
    app = create_app(
        Settings.from_env({"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": small_redis.url})
    )
    client = app.test_client()
    fill_to(conn, 0.75)
    with caplog.at_level(logging.INFO):
        body, headers = signed(track_event("u1"), msg_id="msg_first")
        assert client.post("/webhooks/instruqt", data=body, headers=headers).status_code == 202
    assert any(
        r.levelno == logging.WARNING and r.getMessage().startswith("Redis memory 7")
        for r in caplog.records
    )

    conn.config_set("maxmemory", memory.read(conn).used - CHUNK)  # now it is full
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        conn.set("one-more", "x")  # noeviction: Redis refuses writes
    caplog.clear()
    body, headers = signed(track_event("u2"), msg_id="msg_when_full")
    response = client.post("/webhooks/instruqt", data=body, headers=headers)
    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "reason": "queue full, retry later"}
    assert any("msg_when_full not queued, Redis is full" in r.getMessage() for r in caplog.records)


def test_a_worker_refuses_an_allkeys_redis_naming_the_fix(tmp_path: Path) -> None:
    server = RedisProcess(options=["--maxmemory", str(LIMIT), "--maxmemory-policy", "allkeys-lru"])
    server.start()
    try:
        env = engine_env(server.url, tmp_path, LOG_FORMAT="text")
        worker = start_worker(env)
        try:
            output, _ = worker.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
        lines = output.decode().splitlines()
        assert worker.returncode == 1, lines
        [line] = [x for x in lines if "worker not started" in x]
        assert "eviction policy allkeys-lru" in line and "set volatile-lru" in line
        assert line.endswith(FIX)

        conn = redis.Redis.from_url(server.url)
        assert conn.dbsize() == 0  # refused before anything was written
        conn.config_set("maxmemory-policy", "volatile-lru")
        assert memory.read(conn).refusal() is None
    finally:
        server.stop()


def test_the_release_refuses_an_allkeys_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    server = RedisProcess(options=["--maxmemory-policy", "allkeys-lfu"]).start()
    try:
        monkeypatch.setenv("REDIS_URL", server.url)
        monkeypatch.setenv("INSTRUQT_WEBHOOK_SECRET", SECRET)
        for name in ("HUBSPOT_ACCESS_TOKEN", "INSTRUQT_API_KEY", "MAPPING_PATH"):
            monkeypatch.delenv(name, raising=False)
        result = CliRunner().invoke(main, ["release"])
        assert result.exit_code == 1, result.output
        [line] = [x for x in result.output.splitlines() if x.startswith("Redis")]
        assert "eviction policy allkeys-lfu" in line and line.endswith(FIX)
        assert result.output.splitlines()[-1] == "release: failed (Redis)"
    finally:
        server.stop()


def test_a_redis_that_refuses_config_is_read_from_info() -> None:
    server = RedisProcess(options=["--rename-command", "CONFIG", ""]).start()
    try:
        conn = redis.Redis.from_url(server.url)
        with pytest.raises(redis.ResponseError):
            conn.config_get("maxmemory-policy")
        assert memory._configured_policy(conn) is None  # asked only where INFO hides it
        found = memory.read(conn)
        assert (found.limit, found.policy, found.level) == (None, "noeviction", "unlimited")
        assert found.warning() is None and found.refusal() is None
        assert found.summary().endswith("used, no maxmemory, eviction policy noeviction")
    finally:
        server.stop()


def test_what_a_reading_says_when_redis_tells_little() -> None:
    hidden = memory.Memory(used=900_000, limit=1_000_000, policy=None)
    assert hidden.level == "urgent" and hidden.refusal() is None
    assert "refuses writes" in (hidden.warning() or "")
    assert hidden.summary() == "memory 90% of 1.0 MB (0.9 MB), eviction policy not told"
    evicting = memory.Memory(used=750_000, limit=1_000_000, policy="volatile-lru")
    assert "evicts caches, then refuses writes" in (evicting.warning() or "")
    assert memory.Memory(0, None, None, told=False).summary().endswith("(INFO refused)")


def test_the_alert_rules_use_the_gauges_metrics_exposes(small_redis: RedisProcess) -> None:
    rules = yaml.safe_load((ROOT / "docs" / "alerts.yml").read_text())["groups"][0]["rules"]
    memory_rules = {r["alert"]: r for r in rules if r["alert"].startswith("InstruqtCrmRedis")}
    assert set(memory_rules) == {"InstruqtCrmRedisMemoryHigh", "InstruqtCrmRedisMemoryUrgent"}
    exposed = gauges(metrics.render(redis.Redis.from_url(small_redis.url)).decode())
    for rule, share in zip(memory_rules.values(), ("0.70", "0.85"), strict=True):
        assert f">= {share}" in rule["expr"]
        assert set(re.findall(r"instruqt_crm_\w+", rule["expr"])) <= set(exposed)
