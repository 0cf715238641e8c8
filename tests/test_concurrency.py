"""Several real worker processes, and a worker SIGKILLed mid-flush: same records, none lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.dryrun import dry_run_records
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.engine import identity, inbox, ledger
from instruqt_crm.engine.queueing import QUEUE_NAME, queue
from instruqt_crm.mapping import load_mapping
from samples.history import crm_records, deliveries, expected_in_crm, expected_records, history
from tests.engine_helpers import engine_env, enqueue_all
from tests.fakes.hubspot import FakeHubSpot
from tests.processes import Workers, wait_for

pytestmark = pytest.mark.slow
MAPPING = load_mapping(Path("mappings/hubspot.yaml"))


def state(conn: redis.Redis) -> dict[str, int]:
    """What is still waiting (printed when a test times out)."""
    return {
        "inbox": inbox.depth(conn),
        "jobs": queue(QUEUE_NAME, conn).count,
        "started": queue(QUEUE_NAME, conn).started_job_registry.count,
        "scheduled": queue(QUEUE_NAME, conn).scheduled_job_registry.count,
        "dirty": ledger.dirty_count(conn),
        "parked": identity.parked_count(conn),
        "locked": int(conn.exists("instruqt_crm:flush:lock")),
        "pending": int(conn.exists("instruqt_crm:pending:instruqt_crm.engine.jobs.flush_contacts")),
    }


def settled(conn: redis.Redis) -> bool:
    """No event in the inbox, no queued job, nothing dirty or parked, no flush running."""
    return (
        inbox.depth(conn) == 0
        and queue(QUEUE_NAME, conn).count == 0
        and queue(QUEUE_NAME, conn).started_job_registry.count == 0
        and ledger.dirty_count(conn) == 0
        and identity.parked_count(conn) == 0
        and not conn.exists("instruqt_crm:flush:lock")
    )


def test_three_worker_processes_give_the_expected_records(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    events = history(60, seed=17)
    enqueue_all(redis_conn, deliveries(events, seed=19))
    env = engine_env(redis_url, tmp_path, FLUSH_WINDOW_SECONDS="0.2")
    with Workers(env, 3, tmp_path) as workers:
        wait_for(lambda: settled(redis_conn), 90, "three workers to drain the queues")
        assert "Traceback" not in workers.logs()
    assert dry_run_records(redis_conn) == expected_records(events)


def test_worker_killed_mid_flush_loses_nothing(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    events = history(40, seed=23)
    with FakeHubSpot(latency=0.3) as fake:
        hub = HubSpotAdapter(fake.token, fake.url)
        hubspot_setup.apply(hub, MAPPING, hubspot_setup.plan(hub, MAPPING))
        env = engine_env(
            redis_url,
            tmp_path,
            FLUSH_WINDOW_SECONDS="0.5",
            FLUSH_LEASE_SECONDS="3",
            HUBSPOT_ACCESS_TOKEN=fake.token,
            HUBSPOT_API_BASE=fake.url,
        )
        with Workers(env, 1, tmp_path) as workers:
            enqueue_all(redis_conn, deliveries(events, seed=29))
            upserts = lambda: sum(r.path.endswith("/batch/upsert") for r in fake.requests)  # noqa: E731
            wait_for(lambda: upserts() >= 1, 60, "the first batch upsert to be in flight")
            workers.kill(workers.processes[0])
            assert ledger.dirty_count(redis_conn) > 0, "the kill should leave unsent contacts"
            workers.start_one()
            try:
                wait_for(lambda: settled(redis_conn), 60, "the restarted worker to finish")
            except AssertionError:
                print(state(redis_conn), workers.logs()[-4000:])
                raise
        assert crm_records(fake.contacts) == expected_in_crm(expected_records(events))
