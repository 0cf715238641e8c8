"""status.collect: the figures shared by ``instruqt-crm status`` and the status page."""

from __future__ import annotations

import json
from pathlib import Path

import redis
from pydantic import SecretStr

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.engine import mapping_record
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.engine.worker import build_worker
from instruqt_crm.journal import failures
from instruqt_crm.journal.failures import Kind
from instruqt_crm.mapping import load_mapping
from instruqt_crm.ops import status
from instruqt_crm.ratelimit import RequestBudget

ROOT = Path(__file__).resolve().parent.parent


def settings(**extra: object) -> Settings:
    base: dict = {"webhook_secrets": (), "mapping_path": ROOT / "mappings" / "hubspot.yaml"}
    return Settings.from_env({}, **{**base, **extra})


def test_empty_redis(redis_conn: redis.Redis) -> None:
    figures = status.collect(redis_conn, settings())
    assert figures["queues"]["jobs"] == {"queued": 0, "scheduled": 0, "started": 0, "failed": 0}
    assert figures["contacts"] == {"dirty": 0, "held": 0}
    assert figures["identity"] == {"waiting_learners": 0, "waiting_events": 0}
    assert figures["failures"] == {"open": {}, "recorded": {}}
    assert figures["last_flush"] == {"at": None, "age_seconds": None}
    assert figures["crm"]["adapter"] == "dry-run"
    assert figures["mapping"]["error"] is None
    json.dumps(figures)  # JSON-ready
    assert any(line.startswith("Last flush    never") for line in status.render(figures))


def test_counters_failures_flush_and_budget(redis_conn: redis.Redis) -> None:
    redis_conn.hset(
        keys.STATS,
        mapping={
            "events:merged": 3,
            "events:merged:track.started": 2,
            "events:merged:review.created": 1,
            "identity:params": 3,
        },
    )
    failures.record(redis_conn, Kind.EVENT, "mapping", "bad", "m1", "{}")
    purged = failures.record(redis_conn, Kind.EVENT, "mapping", "bad", "m2", "{}")
    failures.remove(redis_conn, purged.id)
    redis_conn.set(keys.LAST_FLUSH, "1000.0")
    RequestBudget(redis_conn, "hubspot", 50, 10).acquire(3)
    runtime = Runtime(
        settings(hubspot_access_token=SecretStr("t"), hubspot_requests_per_10s=50),
        load_mapping(ROOT / "mappings" / "hubspot.yaml"),
    )
    figures = status.collect(redis_conn, runtime)
    assert figures["counters"] == {
        "events": {"merged": 3},
        "events_by_type": {"track.started": {"merged": 2}, "review.created": {"merged": 1}},
        "identity": {"params": 3},
        "skipped": {},
    }
    assert figures["failures"] == {"open": {"mapping": 1}, "recorded": {"mapping": 2}}
    assert figures["last_flush"]["at"] == 1000.0
    assert figures["crm"]["adapter"] == "hubspot"
    assert figures["crm"]["budget"]["remaining"] == 47
    assert figures["crm"]["budget"]["limit"] == 50


def test_unloadable_mapping_is_reported_not_raised(redis_conn: redis.Redis, tmp_path: Path) -> None:
    figures = status.collect(redis_conn, settings(mapping_path=tmp_path / "missing.yaml"))
    assert figures["mapping"]["crm"] is None
    assert "cannot read the mapping" in figures["mapping"]["error"]
    assert figures["crm"] == {"crm": None, "adapter": "dry-run"}
    assert "not loadable" in status.render(figures)[0]


def test_a_salesforce_mapping_with_credentials_shows_the_salesforce_adapter(
    redis_conn: redis.Redis,
) -> None:
    """The adapter shown is the one the workers run (crm.adapters decides for both)."""
    run = Runtime.from_settings(
        settings(
            mapping_path=ROOT / "mappings" / "salesforce.yaml",
            salesforce_instance_url="https://example.my.salesforce.com",
            salesforce_access_token="00D!token",
            salesforce_requests_per_minute=60,
        )
    )
    figures = status.collect(redis_conn, run)
    assert figures["crm"]["adapter"] == run.adapter(redis_conn).name == "salesforce"
    assert figures["crm"]["budget"]["limit"] == 60
    assert figures["crm"]["budget"]["window_seconds"] == 60
    assert "60 of 60 requests left per 60 s" in "\n".join(status.render(figures))
    assert status.collect(redis_conn, run.settings)["crm"]["adapter"] == "salesforce"


def test_the_mapping_the_workers_run_is_compared_with_the_file(redis_conn: redis.Redis) -> None:
    worker = build_worker(redis_conn, simple=True, name="w1")
    worker.register_birth()
    on_file = load_mapping(ROOT / "mappings" / "hubspot.yaml")
    other = on_file.model_copy(update={"skip_developer_plays": False})
    mapping_record.record_running(redis_conn, "stopped", other, gone=lambda name: False)
    mapping_record.record_running(redis_conn, "w1", on_file, gone=lambda name: False)
    figures = status.collect(redis_conn, settings())
    assert figures["mapping"]["digest"] == on_file.digest != other.digest
    assert figures["mapping"]["running"] == {on_file.digest: ["w1"]}  # a stopped one: not shown
    assert f"Workers run   {on_file.digest} (the file's) on 1 worker(s)" in status.render(figures)

    mapping_record.record_running(redis_conn, "w1", other, gone=lambda name: name == "stopped")
    assert set(mapping_record.running(redis_conn)) == {"w1"}  # the stopped one is forgotten
    lines = status.render(status.collect(redis_conn, settings()))
    assert f"Workers run   {other.digest} (NOT the file's: restart them) on 1 worker(s)" in lines
    worker.register_death()
