"""Receiver → worker → fake Salesforce with the default salesforce mapping (auto routing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from instruqt_crm.config import Settings
from instruqt_crm.crm.salesforce import SalesforceAdapter, field_name, format_value
from instruqt_crm.runtime import current_runtime
from instruqt_crm.web import create_app
from instruqt_crm.workers import StartupError, preflight
from tests.engine_helpers import drain, engine_env
from tests.fakes.salesforce import URL, FakeSalesforce
from tests.history import deliveries, expected_records, history
from tests.signing import post_signed


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
def runtime(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name, value in salesforce_env(redis_url, tmp_path).items():
        monkeypatch.setenv(name, value)
    current_runtime.cache_clear()
    yield current_runtime()
    current_runtime.cache_clear()


def test_full_path_writes_contacts_and_leads(runtime, redis_conn: redis.Redis) -> None:
    events = history(30, seed=4)
    expected = expected_records(events)
    emails = sorted(expected)
    with FakeSalesforce() as fake:
        fake.custom_fields |= set(runtime.mapping.properties)
        contacts = {
            email: fake.add("Contact", Email=email, LastName="Known") for email in emails[:5]
        }
        assert isinstance(runtime.adapter(redis_conn), SalesforceAdapter)
        preflight(runtime, redis_conn)

        client = create_app(Settings.from_env(), conn=redis_conn).test_client()
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


def test_worker_refuses_to_start_without_the_fields(runtime, redis_conn: redis.Redis) -> None:
    with FakeSalesforce() as fake:
        fake.custom_fields |= set(runtime.mapping.properties) - {"Instruqt_Last_Track__c"}
        with pytest.raises(StartupError, match="Instruqt_Last_Track__c"):
            preflight(runtime, redis_conn)
