"""Salesforce learners whose ledger state expired (STATE_IDLE_DAYS) come back to the values
they had.

Their first flush reads the mapped fields of the Contact or Lead the write will update with
the lookup the write needs anyway (one SOQL query per object and batch, through
simple-salesforce against the fake org), merges them in, and writes by the Id it found. The
expected records of the history test come from ``samples.history``'s independent oracle.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from instruqt_crm.config import Settings
from instruqt_crm.crm.base import ContactChange
from instruqt_crm.crm.salesforce import SalesforceAdapter, salesforce_budget
from instruqt_crm.crm.salesforce_auth import Connection, Credentials
from instruqt_crm.crm.salesforce_reads import read_value
from instruqt_crm.crm.salesforce_routing import MAX_SOQL, field_name, format_value
from instruqt_crm.crm.salesforce_setup import package
from instruqt_crm.engine import ledger
from instruqt_crm.engine.flush import flush
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.mapping import Mapping, PropertyChange, load_mapping
from instruqt_crm.ratelimit import RequestBudget
from samples.history import expected_records, history
from tests.engine_helpers import drain, enqueue_all, installed
from tests.fakes.salesforce import URL, FakeSalesforce
from tests.test_salesforce_full_path import salesforce_env
from tests.test_state_expiry import forget_every_learner, halves

MAPPING = load_mapping(Path("mappings/salesforce.yaml"))
READ_FIELD = "Instruqt_Last_Track__c"  # selected only when a lookup reads values
EVENTS = history(60, seed=17)


def connected(fake: FakeSalesforce, budget: RequestBudget | None = None, mapping=MAPPING):
    """A new adapter on the fake org (each flush job builds its own)."""
    creds = Credentials(instance_url=URL, access_token=SecretStr(fake.issue_token()))
    return SalesforceAdapter(Connection(creds), mapping, budget, sleep=lambda _: None)


def reads(fake: FakeSalesforce, since: int = 0) -> list[str]:
    """The queries since the ``since``-th that read the mapped fields."""
    return [soql for soql in fake.queries[since:] if READ_FIELD in soql.split(" FROM ")[0]]


def emails_in(soql: str) -> set[str]:
    """The emails a lookup query asks for."""
    listed = re.search(r"Email IN \(([^)]*)\)", soql)
    return set(re.findall(r"'([^']*)'", listed.group(1))) if listed else set()


def at(day: int) -> datetime:
    return datetime(2026, 11, day, tzinfo=UTC)


def last_track(slug: str, day: int) -> PropertyChange:
    return PropertyChange("Instruqt_Last_Track__c", "latest", slug, at(day))


def merged(conn: redis.Redis, email: str, changes: list[PropertyChange], event: str) -> None:
    ledger.merge(conn, email, changes, event, email)


def stored(fake: FakeSalesforce, sobject: str, record_id: str, names: list[str]) -> dict:
    return {name: fake.records[sobject][record_id].get(name) for name in names}


JAN_5, FEB_1 = "2026-01-05T10:00:00.000Z", "2026-02-01T10:00:00.000Z"
NOV_3 = "2026-11-03T00:00:00.000Z"  # the new events' time, at(3)
POLICIES = [  # field, policy; the record's value (as the sync wrote it), the event's, the merge
    ("Instruqt_User_Id__c", "set_once", "u-old", "u-new", "u-old"),
    ("Instruqt_First_Activity_At__c", "min", JAN_5, NOV_3, JAN_5),
    ("Instruqt_Last_Activity_At__c", "max", FEB_1, NOV_3, NOV_3),
    ("Instruqt_Last_Track__c", "latest", "old-track", "new-track", "new-track"),
    ("Instruqt_Tracks_Started__c", "union", "a;c", "b", "a;b;c"),
    ("Instruqt_Tracks_Completed_Count__c", "count", 2, "new-track", 3),
    ("Instruqt_Last_Review_Score__c", "latest", 4, None, 4),  # no event: the record's stays
]
EARLIER = {name: held for name, _, held, _, _ in POLICIES}
LATER = [PropertyChange(name, p, new, at(3)) for name, p, _, new, _ in POLICIES if new is not None]
CONTINUED = {name: after for name, _, _, _, after in POLICIES}
SENT = {name for name, _, held, _, after in POLICIES if after != held}


def test_query_values_become_text_the_mapping_types_read() -> None:
    assert read_value("2026-11-08T22:58:42.000+0000", "datetime") == "2026-11-08T22:58:42.000Z"
    assert read_value("2026-11-08T23:58:42.5+0100", "datetime") == "2026-11-08T22:58:42.500Z"
    assert read_value(3.0, "number") == "3" and read_value(2.5, "number") == "2.5"
    assert read_value(True, "bool") == "true" and read_value(False, "bool") == "false"
    assert read_value("2026-11-08", "date") == "2026-11-08"
    assert read_value(None, "string") is None and read_value("", "string") is None
    assert read_value("+0000 is not a time", "datetime") == "+0000 is not a time"
    assert read_value("2026-11-08T22:58:42.000+0000", "string") == "2026-11-08T22:58:42.000+0000"


def test_every_policy_continues_from_what_the_record_holds(redis_conn: redis.Redis) -> None:
    """A learner new to the ledger whose Lead Salesforce already holds: first keeps the
    record's, min/max compare with it, latest takes the newer event, union adds to it, count
    adds distinct new values to the record's number; unchanged fields are not sent again. The
    read is the lookup: two queries (Lead, Contact), then one update by Id, all in the budget."""
    email = "back@example.com"
    with FakeSalesforce() as fake:
        fake.deploy(package(MAPPING))
        [earlier] = connected(fake).upsert([ContactChange(email, email, dict(EARLIER))])
        lead = str(earlier.record_id)
        merged(redis_conn, email, LATER, "m1")
        assert ledger.pending(redis_conn, email, MAPPING).needs_read
        budget = salesforce_budget(redis_conn, 120)
        left, calls, asked = budget.remaining(), len(fake.calls), len(fake.queries)

        report = flush(redis_conn, connected(fake, budget), MAPPING)

        assert report.contacts.synced == 1 and report.requests == 3
        later = fake.calls[calls:]
        assert [(c.method, c.path) for c in later] == [
            ("GET", "query/"),
            ("GET", "query/"),
            ("PATCH", "composite/sobjects"),  # an update by the Id the read found
        ]
        assert budget.remaining() == left - 3
        assert len(reads(fake, asked)) == 2
        assert stored(fake, "Lead", lead, list(CONTINUED)) == CONTINUED
        [sent] = later[-1].body["records"]
        assert set(sent) - {"attributes", "Id"} == SENT  # what the record holds is not resent
        assert len(fake.records["Lead"]) == 1
        assert not ledger.pending(redis_conn, email, MAPPING).needs_read


def test_a_learner_salesforce_does_not_hold_is_read_once_then_created(
    redis_conn: redis.Redis,
) -> None:
    """No record: the read answers None and the write creates one without a second lookup;
    the next flush (a new job, a new adapter) does not read the learner, it only looks it up."""
    email = "new@example.com"
    with FakeSalesforce() as fake:
        fake.deploy(package(MAPPING))
        fake.add("Lead", Email="someone-else@example.com", LastName="X", Company="Y")
        merged(redis_conn, email, [last_track("t", 2)], "m1")
        calls, asked = len(fake.calls), len(fake.queries)
        assert flush(redis_conn, connected(fake), MAPPING).requests == 3
        assert [c.method for c in fake.calls[calls:]] == ["GET", "GET", "POST"]
        assert [emails_in(soql) for soql in reads(fake, asked)] == [{email}, {email}]
        created = fake.by_email("Lead")[email]
        assert created["Instruqt_Last_Track__c"] == "t"

        merged(redis_conn, email, [last_track("u", 3)], "m2")
        calls, asked = len(fake.calls), len(fake.queries)
        assert flush(redis_conn, connected(fake), MAPPING).contacts.synced == 1
        assert reads(fake, asked) == []  # known now: looked up for its Id, not read
        assert [c.method for c in fake.calls[calls:]] == ["GET", "GET", "PATCH"]
        assert fake.records["Lead"][created["Id"]]["Instruqt_Last_Track__c"] == "u"
        assert len(fake.records["Lead"]) == 2


@pytest.mark.parametrize("mode", ["auto", "Lead"])
def test_a_converted_lead_is_read_from_the_contact_it_became(
    redis_conn: redis.Redis, mode: str
) -> None:
    """The learner's Lead was converted into a Contact with another email: the Contact's
    values are read (fetched by Id with the Contact query) and the Contact is updated."""
    email = "converted@example.com"
    mapping: Mapping = MAPPING.model_copy(update={"object": mode})
    with FakeSalesforce() as fake:
        fake.deploy(package(mapping))
        contact = fake.add(
            "Contact",
            Email="work-address@example.com",
            LastName="C",
            Instruqt_Tracks_Started__c="a;c",
            Instruqt_Last_Activity_At__c="2026-11-09T08:00:00.000Z",
        )
        fake.add_converted_lead(email, contact)
        merged(
            redis_conn,
            email,
            [
                PropertyChange("Instruqt_Tracks_Started__c", "union", "b", at(3)),
                PropertyChange(
                    "Instruqt_Last_Activity_At__c", "max", "2026-11-03T00:00:00.000Z", at(3)
                ),
            ],
            "m1",
        )
        asked = len(fake.queries)
        report = flush(redis_conn, connected(fake, mapping=mapping), mapping)
        assert report.contacts.synced == 1 and report.requests == 3
        [lead_query, contact_query] = fake.queries[asked:]
        assert " FROM Lead " in lead_query and f"Id IN ('{contact}')" in contact_query
        names = ["Instruqt_Tracks_Started__c", "Instruqt_Last_Activity_At__c"]
        assert stored(fake, "Contact", contact, names) == {
            "Instruqt_Tracks_Started__c": "a;b;c",
            "Instruqt_Last_Activity_At__c": "2026-11-09T08:00:00.000Z",  # the record's is later
        }


def test_a_full_batch_of_returning_learners_costs_one_query_per_object(
    redis_conn: redis.Redis,
) -> None:
    """200 returning learners (a full batch): two queries read them all, one request updates
    them all, and each one continues from its own record."""
    with FakeSalesforce() as fake:
        fake.deploy(package(MAPPING))
        emails = [f"l{n}@acme.io" for n in range(200)]
        leads = {
            email: fake.add(
                "Lead",
                Email=email,
                LastName="L",
                Company="A",
                Instruqt_User_Id__c=f"user-{n}",
                Instruqt_Tracks_Completed_Count__c=n % 7,
            )
            for n, email in enumerate(emails)
        }
        for n, email in enumerate(emails):
            count = PropertyChange("Instruqt_Tracks_Completed_Count__c", "count", "new", at(3))
            ledger.merge(redis_conn, email, [count], f"m{n}", email, f"user-{n}")
        calls = len(fake.calls)
        report = flush(redis_conn, connected(fake), MAPPING)
        assert report.contacts.synced == 200 and report.requests == 3
        assert [c.method for c in fake.calls[calls:]] == ["GET", "GET", "PATCH"]
        counts = {
            email: fake.records["Lead"][lead]["Instruqt_Tracks_Completed_Count__c"]
            for email, lead in leads.items()
        }
        assert counts == {email: n % 7 + 1 for n, email in enumerate(emails)}


def test_a_read_too_long_for_one_url_is_split_and_finds_every_record() -> None:
    with FakeSalesforce() as fake:
        fake.deploy(package(MAPPING))
        emails = [
            f"a-rather-long-address-of-learner-{n:03d}@training.example.com" for n in range(200)
        ]
        for n, email in enumerate(emails):
            fake.add("Lead", Email=email, LastName="L", Company="A", Instruqt_Last_Track__c=f"t{n}")
        asked = len(fake.queries)
        changes = [ContactChange(email, email, {}) for email in emails]
        current = connected(fake).current_values(changes, [READ_FIELD])
        queries = fake.queries[asked:]
        assert current.requests == len(queries) == 4  # each object's query in two halves
        assert all(len(soql) <= MAX_SOQL for soql in queries)
        assert current.found == {email: {READ_FIELD: f"t{n}"} for n, email in enumerate(emails)}


@pytest.mark.parametrize("forget", [True, False], ids=["state expired", "state kept"])
def test_the_records_end_as_if_the_state_had_never_expired(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, forget: bool
) -> None:
    """Every learner's events in two halves through the worker; between them the ledger
    forgets every learner (or not): Salesforce ends with the oracle's records either way."""
    early, late = halves(EVENTS)
    with FakeSalesforce() as fake:
        runtime = Runtime.from_settings(Settings.from_env(salesforce_env(redis_url, tmp_path)))
        fake.deploy(package(runtime.mapping))
        with installed(runtime):
            enqueue_all(redis_conn, [(f"early{n}", body) for n, body in enumerate(early)])
            drain(redis_conn)
            returning = forget_every_learner(redis_conn) if forget else 0
            known = {*fake.by_email("Lead"), *fake.by_email("Contact")}
            asked, calls = len(fake.queries), len(fake.calls)
            enqueue_all(redis_conn, [(f"late{n}", body) for n, body in enumerate(late)])
            drain(redis_conn)
        records = {**fake.by_email("Lead"), **fake.by_email("Contact")}
        for email, record in expected_records(EVENTS).items():
            want = {field_name(k): format_value(v) for k, v in record.items() if k != "email"}
            assert {k: records[email].get(k) for k in want} == want, email
        read = reads(fake, asked)
        writes = [c for c in fake.calls[calls:] if c.path.startswith("composite/sobjects")]
        if forget:
            assert returning > 40 and read
            assert len(read) <= 2 * len(writes)  # at most one read per object and batch
        else:  # learners the ledger knows are never read, only those new in the late half
            asked_for = set().union(*(emails_in(soql) for soql in read))
            assert asked_for and asked_for.isdisjoint(known)
