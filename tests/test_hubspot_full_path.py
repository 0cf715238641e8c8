"""Receiver → worker → fake HubSpot with the default mapping, for a shuffled, duplicated history."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from instruqt_crm.config import Settings
from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.mapping import load_mapping
from instruqt_crm.receiver.app import create_app
from samples.history import crm_records, deliveries, expected_in_crm, expected_records, history
from samples.signing import post_signed
from tests.engine_helpers import drain, engine_env, installed
from tests.fakes.hubspot import FakeHubSpot
from tests.test_fake_hubspot import create_property

ROOT = Path(__file__).resolve().parent.parent


def hubspot_env(redis_url: str, tmp_path: Path, fake: FakeHubSpot) -> dict[str, str]:
    return engine_env(
        redis_url, tmp_path, HUBSPOT_ACCESS_TOKEN=fake.token, HUBSPOT_API_BASE=fake.url
    )


def sync_through_the_stack(
    redis_conn: redis.Redis,
    env: dict[str, str],
    events: list[dict],
    seed: int,
) -> None:
    """Provision the fake for the mapping, post the events shuffled and duplicated to the
    receiver, and run workers until everything is synced."""
    runtime = Runtime.from_settings(Settings.from_env(env))
    adapter = HubSpotAdapter(env["HUBSPOT_ACCESS_TOKEN"], env["HUBSPOT_API_BASE"])
    hubspot_setup.apply(adapter, runtime.mapping, hubspot_setup.plan(adapter, runtime.mapping))
    client = create_app(runtime.settings, conn=redis_conn).test_client()
    codes = post_signed(client, deliveries(events, seed=seed))
    assert codes.count(202) == len(events)
    assert set(codes) == {200, 202}
    with installed(runtime):
        drain(redis_conn)


def start_worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run worker.py with ``env`` added to this environment, until it exits."""
    return subprocess.run(
        [sys.executable, "worker.py"],
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=60,
        capture_output=True,
        text=True,
    )


def test_full_path_produces_the_data_model(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    with FakeHubSpot() as fake:
        events = history(40, seed=3)
        sync_through_the_stack(redis_conn, hubspot_env(redis_url, tmp_path, fake), events, seed=5)
        assert crm_records(fake.contacts) == expected_in_crm(expected_records(events))
        upserts = [r for r in fake.requests if r.path.endswith("/batch/upsert")]
        assert len(upserts) <= len(events) / 10, "the CRM must see batches, not one call per event"
        assert fake.count_429 == 0


def test_worker_refuses_to_start_without_the_properties(redis_url: str, tmp_path: Path) -> None:
    with FakeHubSpot() as fake:
        done = start_worker(hubspot_env(redis_url, tmp_path, fake))
    assert done.returncode == 1
    assert "instruqt_last_track" in done.stderr
    assert "instruqt-crm setup hubspot" in done.stderr
    assert fake.token not in done.stderr


def keyed_mapping(tmp_path: Path) -> Path:
    """The default mapping, upserting contacts on identity.match_key (instruqt_user_id)."""
    path = tmp_path / "keyed.yaml"
    text = (ROOT / "mappings" / "hubspot.yaml").read_text()
    path.write_text(text + "\nhubspot:\n  upsert_by: match_key\n")
    return path


def test_full_path_upserting_on_the_user_id(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    with FakeHubSpot() as fake:
        env = hubspot_env(redis_url, tmp_path, fake)
        env["MAPPING_PATH"] = str(keyed_mapping(tmp_path))
        events = history(20, seed=4)
        sync_through_the_stack(redis_conn, env, events, seed=6)
        assert crm_records(fake.contacts) == expected_in_crm(expected_records(events))
        inputs = [
            item
            for r in fake.requests
            if r.path.endswith("/batch/upsert")
            for item in r.body["inputs"]
        ]
        assert {item["idProperty"] for item in inputs} == {"instruqt_user_id"}
        assert all(item["properties"]["instruqt_user_id"] == item["id"] for item in inputs)


def test_worker_refuses_to_upsert_on_a_property_that_is_not_unique(
    redis_url: str, tmp_path: Path
) -> None:
    with FakeHubSpot() as fake:
        adapter = HubSpotAdapter(fake.token, fake.url)
        create_property(adapter.client, "instruqt_user_id")  # made before, without uniqueness
        mapping = load_mapping(keyed_mapping(tmp_path))
        steps = hubspot_setup.plan(adapter, mapping)
        assert steps.mismatched == [hubspot_setup.upsert_key_problem(mapping, adapter.describe())]
        hubspot_setup.apply(adapter, mapping, steps)
        env = hubspot_env(redis_url, tmp_path, fake)
        done = start_worker({**env, "MAPPING_PATH": str(keyed_mapping(tmp_path))})
    assert done.returncode == 1
    assert "instruqt_user_id: is not unique, and the mapping upserts contacts on it" in done.stderr
