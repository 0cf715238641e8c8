"""Receiver → worker → fake Salesforce with the default salesforce mapping (auto routing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.crm.salesforce import SalesforceAdapter
from instruqt_crm.crm.salesforce_plays import PLAY_KEY, PLAY_OBJECT
from instruqt_crm.crm.salesforce_routing import field_name, format_value
from instruqt_crm.crm.salesforce_setup import package
from instruqt_crm.engine.queueing import QUEUE_NAME, queue
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.engine.worker import StartupError, preflight
from instruqt_crm.receiver.app import create_app
from samples.history import deliveries, expected_records, history
from samples.signing import post_signed
from tests.engine_helpers import drain, engine_env, installed
from tests.fakes.salesforce import URL, FakeSalesforce


def salesforce_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return engine_env(
        redis_url,
        tmp_path,
        MAPPING_PATH="mappings/salesforce.yaml",
        SALESFORCE_LOGIN_URL=URL,
        SALESFORCE_CLIENT_ID="3MVG.fake",
        SALESFORCE_CLIENT_SECRET="s3cret",
    )


@pytest.fixture
def runtime(redis_url: str, tmp_path: Path):
    settings = Settings.from_env(salesforce_env(redis_url, tmp_path))
    with installed(Runtime.from_settings(settings)) as run:
        yield run


def test_full_path_writes_contacts_and_leads(runtime, redis_conn: redis.Redis) -> None:
    events = history(30, seed=4)
    expected = expected_records(events)
    emails = sorted(expected)
    with FakeSalesforce() as fake:
        fake.deploy(package(runtime.mapping))
        contacts = {
            email: fake.add("Contact", Email=email, LastName="Known") for email in emails[:5]
        }
        assert isinstance(runtime.adapter(redis_conn), SalesforceAdapter)
        preflight(runtime, redis_conn)

        client = create_app(runtime.settings, conn=redis_conn).test_client()
        codes = post_signed(client, deliveries(events, seed=5))
        assert codes.count(202) == len(events)
        drain(redis_conn)

        stored = {**fake.by_email("Lead"), **fake.by_email("Contact")}
        for email, record in expected.items():
            want = {field_name(k): format_value(v) for k, v in record.items() if k != "email"}
            got = {k: v for k, v in stored[email].items() if k in want}
            assert got == want, email
        assert {fake.by_email("Contact")[e]["Id"] for e in emails[:5]} == set(contacts.values())
        assert len(fake.records["Contact"]) == 5
        assert len(fake.records["Lead"]) == len(emails) - 5
        writes = fake.data_calls(contains="composite/sobjects")
        assert len(writes) <= len(events) / 10, "the CRM must see batches, not one call per event"
        assert len(fake.tokens_issued) == 1, "the token is cached across flush jobs"
        participants = {
            e["participant_id"]
            for e in events
            if e.get("participant_id") and not e.get("is_developer_play")
        }
        assert set(fake.by_field(PLAY_OBJECT, PLAY_KEY)) == participants


def test_full_path_writes_play_records(runtime, redis_conn: redis.Redis) -> None:
    from tests.test_plays import expected_plays, play_history  # late: it imports this module

    events = play_history(20, seed=6)
    with FakeSalesforce() as fake:
        fake.deploy(package(runtime.mapping))
        known = sorted({f"learner{n:05d}@example.com" for n in range(0, 20, 4)})
        contacts = {email: fake.add("Contact", Email=email, LastName="Known") for email in known}
        preflight(runtime, redis_conn)
        client = create_app(runtime.settings, conn=redis_conn).test_client()
        assert post_signed(client, deliveries(events, seed=9)).count(202) == len(events)
        drain(redis_conn)

        leads = {email: r["Id"] for email, r in fake.by_email("Lead").items()}
        owner = {
            e["participant_id"]: e["custom_parameters"]["email"]
            for e in events
            if "participant_id" in e
        }
        stored = fake.by_field(PLAY_OBJECT, PLAY_KEY)
        expected = expected_plays(events)
        assert set(stored) == set(expected)
        for participant, record in expected.items():
            want = {field_name(k): v for k, v in record.items()}
            got = stored[participant]
            assert {k: got.get(k) for k in want} == want, participant
            email = owner[participant]
            assert (got["Contact__c"], got["Lead__c"]) == (
                (contacts[email], None) if email in contacts else (None, leads[email])
            ), participant
        assert {r["Status__c"] for r in stored.values()} == {"Started", "Stopped", "Completed"}
        writes = fake.data_calls("PATCH", f"composite/sobjects/{PLAY_OBJECT}")
        assert len(writes) <= len(events) / 10, "plays are sent in batches too"


def test_worker_refuses_to_start_without_the_fields(runtime, redis_conn: redis.Redis) -> None:
    with FakeSalesforce() as fake:
        fake.deploy(package(runtime.mapping))
        fake.custom_fields.discard("Instruqt_Last_Track__c")
        with pytest.raises(StartupError, match="Instruqt_Last_Track__c"):
            preflight(runtime, redis_conn)


def test_worker_refuses_to_start_without_the_play_fields(runtime, redis_conn) -> None:
    with FakeSalesforce() as fake:
        fake.deploy(package(runtime.mapping))
        fake.custom_objects[PLAY_OBJECT].pop("Status__c")
        fake.custom_objects[PLAY_OBJECT].pop("Lead__c")
        with pytest.raises(StartupError) as caught:
            preflight(runtime, redis_conn)
        message = str(caught.value)
        assert "Instruqt_Play__c.Status__c, Instruqt_Play__c.Lead__c" in message
        assert "instruqt-crm setup salesforce" in message
        del fake.custom_objects[PLAY_OBJECT]  # never deployed
        with pytest.raises(StartupError, match=r"Instruqt_Play__c\.Participant_Id__c"):
            preflight(runtime, redis_conn)


def test_worker_start_sends_plays_left_dirty(runtime, redis_conn: redis.Redis) -> None:
    """Plays a stopped worker left unsent get a flush at the next start, without new events."""
    with FakeSalesforce() as fake:
        fake.deploy(package(runtime.mapping))
        redis_conn.zadd(keys.DIRTY_PLAYS, {"p-left": 1.0})
        preflight(runtime, redis_conn)
        jobs = queue(QUEUE_NAME, redis_conn).jobs
        assert [job.func_name for job in jobs] == ["instruqt_crm.engine.jobs.flush_contacts"]
