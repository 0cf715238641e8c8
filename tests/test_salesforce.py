"""Salesforce adapter: routing, converted Leads, per-record errors, lock retries, limits."""

from __future__ import annotations

import pytest
import redis
from pydantic import SecretStr

from instruqt_crm.crm.base import ContactChange
from instruqt_crm.crm.salesforce import SalesforceAdapter
from instruqt_crm.crm.salesforce_auth import Connection, Credentials
from instruqt_crm.crm.salesforce_plays import PLAY_KEY, PLAY_OBJECT, REQUIRED_FIELDS
from instruqt_crm.crm.salesforce_routing import Target, field_name, format_value, soql_quote
from instruqt_crm.crm.salesforce_setup import missing_fields, package
from instruqt_crm.errors import (
    BatchRejected,
    NotReady,
    PermanentError,
    RateLimited,
    RetryableError,
)
from instruqt_crm.mapping import Mapping, load_mapping
from instruqt_crm.ratelimit import RequestBudget
from tests.fakes.salesforce import URL, FakeSalesforce
from tests.fakes.salesforce_org import INTEGRATION

MAPPING = load_mapping("mappings/salesforce.yaml")
FIELDS = set(MAPPING.properties)
NO_PLAYS = MAPPING.model_copy(
    update={"salesforce": MAPPING.salesforce.model_copy(update={"plays": None})}
)


def adapter(
    fake: FakeSalesforce, mapping: Mapping = MAPPING, assign_to: str | None = INTEGRATION, **kwargs
) -> SalesforceAdapter:
    """An adapter on the fake org, with the package deployed (its permission set assigned to
    ``assign_to``)."""
    fake.deploy(package(mapping), assign_to)
    creds = Credentials(instance_url=URL, access_token=SecretStr(fake.issue_token()))
    return SalesforceAdapter(Connection(creds), mapping, sleep=lambda _: None, **kwargs)


def change(n: int, **props) -> ContactChange:
    properties = {"Instruqt_User_Id__c": f"user-{n}", "Instruqt_Last_Track__c": "k8s", **props}
    return ContactChange(f"u{n}@acme.io", f"u{n}@acme.io", properties, f"user-{n}")


def as_object(name: str) -> Mapping:
    return MAPPING.model_copy(update={"object": name})


def test_field_names() -> None:
    assert field_name("instruqt_tracks_completed") == "Instruqt_Tracks_Completed__c"
    assert field_name("instruqt_user_id") == "Instruqt_User_Id__c"
    assert field_name("Instruqt_Last_Track__c") == "Instruqt_Last_Track__c"
    assert field_name("Title") == "Title"
    assert format_value(3.0) == 3 and format_value(None) is None and format_value(2.5) == 2.5
    assert soql_quote("o'neil\\x@a.io") == "'o\\'neil\\\\x@a.io'"


def test_auto_updates_a_matching_contact_and_creates_a_lead_otherwise() -> None:
    with FakeSalesforce() as fake:
        contact = fake.add("Contact", Email="U1@acme.io", LastName="Known")
        outcomes = adapter(fake).upsert([change(1), change(2)])
        assert [o.status for o in outcomes] == ["synced", "synced"]
        assert outcomes[0].record_id == contact
        assert fake.records["Contact"][contact]["Instruqt_Last_Track__c"] == "k8s"
        lead = fake.by_email("Lead")["u2@acme.io"]
        assert lead["LastName"] == "[not provided]" and lead["Company"] == "[not provided]"
        assert lead["Instruqt_User_Id__c"] == "user-2"
        assert len(fake.data_calls("GET", "query")) == 2  # one per object, not per contact
        assert len(fake.data_calls("PATCH", "composite/sobjects/Lead/Instruqt_User_Id__c")) == 1


def test_a_new_record_gets_the_name_instruqt_gave_an_existing_one_keeps_its_own() -> None:
    with FakeSalesforce() as fake:
        known = fake.add("Lead", Email="u2@acme.io", LastName="Entered", Company="Acme")
        named = [
            ContactChange(c.key, c.email, c.properties, c.user_id, "Ada", "Lovelace")
            for c in (change(1), change(2))
        ]
        assert [o.status for o in adapter(fake).upsert(named)] == ["synced", "synced"]
        created = fake.by_email("Lead")["u1@acme.io"]
        assert (created["FirstName"], created["LastName"]) == ("Ada", "Lovelace")
        kept = fake.records["Lead"][known]
        assert kept["LastName"] == "Entered" and kept.get("FirstName") is None


def test_existing_lead_is_updated_without_touching_its_name() -> None:
    with FakeSalesforce() as fake:
        lead = fake.add("Lead", Email="u1@acme.io", LastName="Real", Company="Acme")
        outcome = adapter(fake).upsert([change(1)])[0]
        assert outcome.status == "synced" and outcome.record_id == lead
        assert fake.records["Lead"][lead]["LastName"] == "Real"
        assert fake.records["Lead"][lead]["Instruqt_Last_Track__c"] == "k8s"
        assert fake.data_calls("PATCH")[0].path == "composite/sobjects"


def test_a_lead_found_by_user_id_after_an_email_change_is_updated() -> None:
    with FakeSalesforce() as fake:
        lead = fake.add(
            "Lead", Email="old@acme.io", LastName="X", Company="Y", Instruqt_User_Id__c="user-1"
        )
        assert adapter(fake).upsert([change(1)])[0].record_id == lead
        assert len(fake.records["Lead"]) == 1


def test_converted_lead_is_followed_to_its_contact() -> None:
    with FakeSalesforce() as fake:
        contact = fake.add("Contact", Email="someone.else@acme.io", LastName="C")
        fake.add_converted_lead("u1@acme.io", contact)
        outcome = adapter(fake).upsert([change(1)])[0]
        assert outcome.status == "synced" and outcome.record_id == contact
        assert fake.records["Contact"][contact]["Instruqt_Last_Track__c"] == "k8s"


def test_contact_mode_creates_contacts_and_lead_mode_never_queries_contacts() -> None:
    with FakeSalesforce() as fake:
        adapter(fake, as_object("Contact")).upsert([change(1)])
        created = fake.by_email("Contact")["u1@acme.io"]
        assert created["LastName"] == "[not provided]" and "Company" not in created
        assert fake.records["Lead"] == {}
    with FakeSalesforce() as fake:
        adapter(fake, as_object("Lead")).upsert([change(1)])
        assert [c.path for c in fake.data_calls("GET")] == ["query/"]
        assert "u1@acme.io" in fake.by_email("Lead")


def test_one_bad_record_does_not_fail_its_batch_mates() -> None:
    with FakeSalesforce() as fake:
        fake.record_errors["u2@acme.io"] = ["DUPLICATES_DETECTED"]
        outcomes = adapter(fake).upsert([change(1), change(2), change(3)])
        assert [o.status for o in outcomes] == ["synced", "rejected", "synced"]
        assert outcomes[1].reason.startswith("Lead (new): DUPLICATES_DETECTED: DUPLICATES_DETECTED")
        assert set(fake.by_email("Lead")) == {"u1@acme.io", "u3@acme.io"}


def test_locked_rows_are_retried_then_left_for_a_later_flush() -> None:
    with FakeSalesforce() as fake:
        fake.record_errors["u1@acme.io"] = ["UNABLE_TO_LOCK_ROW"]
        outcome = adapter(fake).upsert([change(1)])[0]
        assert outcome.status == "synced"
        fake.record_errors["u2@acme.io"] = ["UNABLE_TO_LOCK_ROW"] * 3
        outcome = adapter(fake).upsert([change(2)])[0]
        assert outcome.status == "retry" and "UNABLE_TO_LOCK_ROW" in outcome.reason


def test_missing_lead_fields_are_permanent_with_salesforces_message() -> None:
    mapping = MAPPING.model_copy(
        update={"salesforce": MAPPING.salesforce.model_copy(update={"lead_defaults": {}})}
    )
    with FakeSalesforce() as fake:
        outcome = adapter(fake, mapping).upsert([change(1)])[0]
        assert outcome.status == "rejected" and "REQUIRED_FIELD_MISSING" in outcome.reason


def test_unknown_field_rejects_the_request_so_the_engine_splits_it() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        with pytest.raises(BatchRejected, match="INVALID_FIELD"):
            sf.upsert([change(1, Instruqt_Nope__c="x")])


def test_503_is_retried_with_backoff() -> None:
    with FakeSalesforce() as fake:
        fake.unavailable = 2
        assert adapter(fake).upsert([change(1)])[0].status == "synced"
        fake.unavailable = 10
        with pytest.raises(RetryableError):
            adapter(fake, attempts=3).upsert([change(1)])


def test_request_limit_parks_every_worker(redis_conn: redis.Redis, caplog) -> None:
    budget = RequestBudget(redis_conn, "salesforce-test", 100, 60.0)
    with FakeSalesforce() as fake:
        fake.limit_exceeded = True
        with pytest.raises(RateLimited) as caught:
            adapter(fake, budget=budget).upsert([change(1)])
        assert caught.value.wait >= 3600
        assert len(fake.calls) == 1  # not retried inside the call
    assert budget.paused_until() is not None
    assert "QUOTA EXHAUSTED" in caplog.text


def test_api_usage_header_is_read_into_the_budget(redis_conn: redis.Redis) -> None:
    budget = RequestBudget(redis_conn, "salesforce-test", 100, 60.0)
    with FakeSalesforce() as fake:
        fake.api_used, fake.api_total = 1000 - 40, 1000  # 50 kept in reserve: none left
        sf = adapter(fake, budget=budget)
        with pytest.raises(RateLimited):  # the first lookup's header pauses the next request
            sf.upsert([change(1)])
        assert sf.api_usage == (961, 1000)
        assert len(fake.calls) == 1
    assert budget.paused_until() is not None
    assert budget.remaining() == 0


def test_describe_maps_fields_back_and_lists_missing_ones() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        assert set(sf.describe()) >= FIELDS
        fake.custom_fields.discard("Instruqt_Last_Track__c")
        assert missing_fields(sf) == ["Instruqt_Last_Track__c"]
        snake = MAPPING.model_copy(
            update={
                "properties": {"instruqt_last_track": MAPPING.properties["Instruqt_Last_Track__c"]}
            }
        )
        assert missing_fields(SalesforceAdapter(sf.connection, snake)) == [
            "instruqt_last_track (Instruqt_Last_Track__c)"
        ]
        fake.custom_fields.add("Instruqt_Last_Track__c")
        assert "instruqt_last_track" in SalesforceAdapter(sf.connection, snake).describe()


def test_describe_lists_missing_play_fields() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        assert missing_fields(sf) == []
        assert set(sf.describe()) >= FIELDS
        fake.custom_objects[PLAY_OBJECT].pop("Minutes_Spent__c")
        fake.custom_fields.discard("Instruqt_Last_Track__c")
        assert missing_fields(sf) == [
            "Instruqt_Last_Track__c",
            f"{PLAY_OBJECT}.Minutes_Spent__c",
        ]
        with pytest.raises(NotReady) as caught:
            sf.describe()  # the worker's start check compares learner fields only: say it here
        assert caught.value.reason == (
            "Salesforce: 2 mapped field(s) missing in the org: Instruqt_Last_Track__c, "
            "Instruqt_Play__c.Minutes_Spent__c. Create them with: instruqt-crm setup salesforce "
            "--deploy (or --out DIR, then deploy that folder)"
        )
        del fake.custom_objects[PLAY_OBJECT]  # not deployed at all: every play field is missing
        assert missing_fields(sf)[1:] == [f"{PLAY_OBJECT}.{name}" for name in REQUIRED_FIELDS]
        without = SalesforceAdapter(sf.connection, NO_PLAYS)
        assert missing_fields(without) == ["Instruqt_Last_Track__c"]
        assert without.play_adapter() is None


def play(participant: str, **fields) -> dict:
    return {"attributes": {"type": PLAY_OBJECT}, PLAY_KEY: participant, **fields}


def collection(sf: SalesforceAdapter, records: list[dict]) -> list[dict]:
    path = f"composite/sobjects/{PLAY_OBJECT}/{PLAY_KEY}"
    return sf.call("upsert plays", "PATCH", path, json={"allOrNone": False, "records": records})


def test_the_fake_org_checks_play_records_like_salesforce() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        contact = fake.add("Contact", Email="c@acme.io", LastName="C")
        lead = fake.add("Lead", Email="l@acme.io", LastName="L", Company="A")
        results = collection(
            sf,
            [
                play("p1", Contact__c=contact, Status__c="Started"),
                play("p2", Lead__c=contact),  # a Contact's Id in the Lead lookup
                play("p3", Contact__c="003000000000000999"),  # no such record
                play("p4", Status__c="Paused"),  # not in the restricted picklist
                play("p5", Lead__c=lead, Minutes_Spent__c=3),
            ],
        )
        codes = [r["errors"][0]["statusCode"] if r["errors"] else "ok" for r in results]
        assert codes == [
            "ok",
            "FIELD_INTEGRITY_EXCEPTION",
            "INVALID_CROSS_REFERENCE_KEY",
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
            "ok",
        ]
        again = collection(sf, [play("P1", Status__c="Completed")])  # upsert: same record
        assert again[0]["id"] == results[0]["id"] and not again[0]["created"]
        assert len(fake.records[PLAY_OBJECT]) == 2
        with pytest.raises(BatchRejected, match="INVALID_FIELD"):
            sf._send([Target("x", PLAY_OBJECT, None, {PLAY_KEY: "x", "Nope__c": 1}, PLAY_KEY)])
        with pytest.raises(PermanentError, match="JSON_PARSER_ERROR"):
            collection(sf, [play("p6", Minutes_Spent__c="ten")])
        with pytest.raises(PermanentError, match="EXCEEDED_ID_LIMIT"):
            collection(sf, [play(f"q{n}") for n in range(201)])
        with pytest.raises(PermanentError, match="not an External ID"):
            sf.call(
                "upsert",
                "PATCH",
                f"composite/sobjects/{PLAY_OBJECT}/Track__c",
                json={"allOrNone": False, "records": [play("p7", Track__c="t")]},
            )


def test_the_fake_org_enforces_unique_external_ids() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        first = fake.add("Lead", Email="a@acme.io", LastName="A", Company="X")
        fake.add("Lead", Email="b@acme.io", LastName="B", Company="X", Instruqt_User_Id__c="u9")
        body = {
            "allOrNone": False,
            "records": [{"attributes": {"type": "Lead"}, "Id": first, "Instruqt_User_Id__c": "U9"}],
        }
        [result] = sf.call("update", "PATCH", "composite/sobjects", json=body)
        assert result["errors"][0]["statusCode"] == "DUPLICATE_VALUE"
