"""The fake Salesforce org refuses what Salesforce refuses: collection writes with the wrong
method, ``allOrNone``, duplicate rules, Private sharing, hidden fields, setup objects."""

from __future__ import annotations

import pytest

from instruqt_crm.crm.salesforce import SalesforceAdapter
from instruqt_crm.crm.salesforce_results import DUPLICATE_RULE_HEADER
from instruqt_crm.errors import PermanentError
from tests.fakes.salesforce import FakeSalesforce
from tests.fakes.salesforce_org import ADMIN, INTEGRATION, SALES_REP
from tests.fakes.salesforce_writes import DuplicateRule
from tests.test_salesforce import adapter

ROLLED_BACK = "ALL_OR_NONE_OPERATION_ROLLED_BACK"
LEADS = "/services/data/v62.0/sobjects/Lead"


def lead(**fields) -> dict:
    return {"attributes": {"type": "Lead"}, **fields}


def write(sf: SalesforceAdapter, method: str, path: str, records: list, **options) -> list[dict]:
    body = {"allOrNone": options.pop("all_or_none", False), "records": records}
    return sf.call("write", method, path, json=body, **options)


def codes(results: list[dict]) -> list[str]:
    return [r["errors"][0]["statusCode"] if r["errors"] else "ok" for r in results]


def test_a_collection_write_with_the_wrong_method_is_refused() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        known = fake.add("Lead", Email="k@acme.io", LastName="K", Company="A")
        created = write(sf, "POST", "composite/sobjects", [lead(Id=known, LastName="X")])
        assert created[0]["errors"][0] == {
            "statusCode": "INVALID_FIELD_FOR_INSERT_UPDATE",
            "message": "cannot specify Id in an insert call",
            "fields": ["Id"],
        }
        updated = write(sf, "PATCH", "composite/sobjects", [lead(LastName="Y", Company="B")])
        assert updated[0]["errors"][0]["statusCode"] == "MISSING_ARGUMENT"
        assert updated[0]["errors"][0]["message"] == "Id not specified in an update call"
        assert fake.records["Lead"][known]["LastName"] == "K" and len(fake.records["Lead"]) == 1
        with pytest.raises(PermanentError, match="405 METHOD_NOT_ALLOWED"):
            write(sf, "POST", "composite/sobjects/Lead/Instruqt_User_Id__c", [lead()])
        right = write(sf, "POST", "composite/sobjects", [lead(LastName="Z", Company="C")])
        assert right[0]["success"] and right[0]["id"] in fake.records["Lead"]


def test_all_or_none_rolls_every_record_back_when_one_fails() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        known = fake.add("Lead", Email="k@acme.io", LastName="K", Company="A")
        updates = [lead(Id=known, LastName="Changed"), lead(LastName="No Id")]
        results = write(sf, "PATCH", "composite/sobjects", updates, all_or_none=True)
        assert codes(results) == [ROLLED_BACK, "MISSING_ARGUMENT"]
        assert all(r["success"] is False and r["id"] is None for r in results)
        assert fake.records["Lead"][known]["LastName"] == "K"  # nothing was changed
        creates = [lead(LastName="A", Company="X"), lead(LastName="B")]
        results = write(sf, "POST", "composite/sobjects", creates, all_or_none=True)
        assert codes(results) == [ROLLED_BACK, "REQUIRED_FIELD_MISSING"]
        assert len(fake.records["Lead"]) == 1  # the first create was rolled back
        results = write(sf, "POST", "composite/sobjects", creates)  # allOrNone false
        assert codes(results) == ["ok", "REQUIRED_FIELD_MISSING"]
        assert len(fake.records["Lead"]) == 2


def test_a_duplicate_rule_refuses_unless_the_header_allows_an_alerting_rule() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        first = fake.add("Lead", Email="a@acme.io", LastName="Lovelace", Company="A")
        fake.duplicate_rules["Lead"] = DuplicateRule("Lead_Name", ("LastName",))
        new = [lead(LastName="lovelace", Company="B")]
        [refused] = write(sf, "POST", "composite/sobjects", new)
        error = refused["errors"][0]
        assert error["statusCode"] == "DUPLICATES_DETECTED"
        found = error["duplicateResult"]
        assert (found["duplicateRule"], found["allowSave"]) == ("Lead_Name", True)
        matched = found["matchResults"][0]["matchRecords"]
        assert [m["record"]["Id"] for m in matched] == [first]
        allow = {"headers": {DUPLICATE_RULE_HEADER: "allowSave=true; runAsCurrentUser=false"}}
        [saved] = write(sf, "POST", "composite/sobjects", new, **allow)
        assert saved["success"] and len(fake.records["Lead"]) == 2
        fake.duplicate_rules["Lead"] = DuplicateRule("Lead_Block", ("LastName",), block=True)
        [blocked] = write(sf, "POST", "composite/sobjects", new, **allow)
        assert blocked["errors"][0]["duplicateResult"]["allowSave"] is False
        assert len(fake.records["Lead"]) == 2


def test_private_sharing_hides_other_owners_records_without_view_all() -> None:
    with FakeSalesforce() as fake:
        fake.access.sharing["Lead"] = "Private"
        sf = adapter(fake, assign_to=None)
        theirs = fake.add("Lead", Email="r@acme.io", LastName="R", Company="A", OwnerId=SALES_REP)
        mine = fake.add("Lead", Email="m@acme.io", LastName="M", Company="A")

        def found() -> set[str]:
            soql = "SELECT Id, Email FROM Lead WHERE Email IN ('r@acme.io', 'm@acme.io')"
            return {r["Id"] for r in sf.call("q", "GET", "query/", params={"q": soql})["records"]}

        assert found() == {mine}
        [refused] = write(sf, "PATCH", "composite/sobjects", [lead(Id=theirs, LastName="S")])
        assert refused["errors"][0]["statusCode"] == "INSUFFICIENT_ACCESS_OR_READONLY"
        [set_id] = fake.access.permission_sets  # View All, Modify All on Lead
        fake.access.assign(ADMIN, {"AssigneeId": INTEGRATION, "PermissionSetId": set_id})
        assert found() == {mine, theirs}
        [updated] = write(sf, "PATCH", "composite/sobjects", [lead(Id=theirs, LastName="S")])
        assert updated["success"] and fake.records["Lead"][theirs]["LastName"] == "S"


def test_deployed_fields_stay_hidden_until_the_permission_set_is_assigned() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake, assign_to=None)
        assert "Instruqt_User_Id__c" not in (sf.fields_of("Lead") or {})
        with pytest.raises(PermanentError, match="INVALID_FIELD"):
            sf.call("q", "GET", "query/", params={"q": "SELECT Instruqt_User_Id__c FROM Lead"})
        definitions = "SELECT QualifiedApiName FROM FieldDefinition WHERE EntityDefinition." + (
            "QualifiedApiName = 'Lead' AND QualifiedApiName IN ('Instruqt_User_Id__c')"
        )
        with pytest.raises(PermanentError, match="INVALID_TYPE"):  # needs View Setup
            sf.call("d", "GET", "tooling/query/", params={"q": definitions})
        fake.access.users[INTEGRATION].profile.view_setup = True
        rows = sf.call("d", "GET", "tooling/query/", params={"q": definitions})["records"]
        assert [r["QualifiedApiName"] for r in rows] == ["Instruqt_User_Id__c"]
        [set_id] = fake.access.permission_sets
        fake.access.assign(ADMIN, {"AssigneeId": INTEGRATION, "PermissionSetId": set_id})
        assert "Instruqt_User_Id__c" in (sf.fields_of("Lead") or {})


def test_setup_objects_answer_from_the_users_permission_sets() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake, assign_to=None)
        permissions = (
            "SELECT SobjectType, PermissionsViewAllRecords FROM ObjectPermissions WHERE ParentId "
            "IN (SELECT PermissionSetId FROM PermissionSetAssignment WHERE AssigneeId = "
            f"'{INTEGRATION}') AND SobjectType IN ('Lead')"
        )
        with pytest.raises(PermanentError, match="sObject type 'ObjectPermissions' is not"):
            sf.call("p", "GET", "query/", params={"q": permissions})
        [set_id] = fake.access.permission_sets
        grant = {"AssigneeId": INTEGRATION, "PermissionSetId": set_id}
        status, answer = fake.access.assign(INTEGRATION, grant)  # no Assign Permission Sets
        assert (status, answer[0]["errorCode"]) == (
            400,
            "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY",
        )
        fake.access.assign(ADMIN, grant)
        rows = sf.call("p", "GET", "query/", params={"q": permissions})["records"]
        assert sorted(r["PermissionsViewAllRecords"] for r in rows) == [False, True]  # profile, set
        assert fake.access.assign(ADMIN, grant)[1][0]["errorCode"] == "DUPLICATE_VALUE"


def test_a_query_answers_the_selected_fields_in_the_rest_apis_json_forms() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake)
        older = fake.add(
            "Lead",
            Email="a@acme.io",
            LastName="A",
            Company="X",
            Instruqt_Last_Activity_At__c="2026-11-08T23:58:42.5+01:00",
            Instruqt_Tracks_Completed_Count__c=3,
            Instruqt_Last_Track__c="",
        )
        newer = fake.add("Lead", Email="b@acme.io", LastName="B", Company="X")

        def query(soql: str) -> list[dict]:
            return sf.call("q", "GET", "query/", params={"q": soql})["records"]

        rows = query(
            "SELECT Id, instruqt_last_activity_at__c, Instruqt_Tracks_Completed_Count__c, "
            "Instruqt_Last_Track__c, IsConverted FROM Lead WHERE Email IN ('b@acme.io') "
            "OR Id IN ('" + older + "') ORDER BY CreatedDate ASC"
        )
        assert rows == [
            {
                "attributes": {"type": "Lead", "url": f"{LEADS}/{older}"},
                "Id": older,
                "Instruqt_Last_Activity_At__c": "2026-11-08T22:58:42.500+0000",
                "Instruqt_Tracks_Completed_Count__c": 3.0,
                "Instruqt_Last_Track__c": None,
                "IsConverted": False,
            },
            {
                "attributes": {"type": "Lead", "url": f"{LEADS}/{newer}"},
                "Id": newer,
                "Instruqt_Last_Activity_At__c": None,
                "Instruqt_Tracks_Completed_Count__c": None,
                "Instruqt_Last_Track__c": None,
                "IsConverted": False,
            },
        ]
        with pytest.raises(PermanentError, match="duplicate field selected: email"):
            query("SELECT Id, Email, email FROM Lead WHERE Email IN ('a@acme.io')")
