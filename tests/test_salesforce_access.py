"""Salesforce orgs as customers run them: a duplicate rule on Lead, Private sharing with records
other users own, a sync user without the permission set; the checks that say what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from simple_salesforce import Salesforce

from instruqt_crm.cli import main
from instruqt_crm.config import Settings
from instruqt_crm.crm.base import ContactChange
from instruqt_crm.crm.salesforce_setup import package
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.engine.worker import StartupError, preflight
from instruqt_crm.errors import Category
from samples.signing import SECRET
from tests.engine_helpers import installed
from tests.fakes.salesforce import URL, FakeSalesforce
from tests.fakes.salesforce_org import ADMIN, INTEGRATION, SALES_REP
from tests.fakes.salesforce_writes import DuplicateRule
from tests.test_salesforce import MAPPING, adapter, change
from tests.test_salesforce_full_path import salesforce_env

USER = f"the user integration@acme.com ({INTEGRATION})"
LACKS = (
    f"Salesforce: {USER} lacks View All, Modify All on Contact; View All, Modify All on Lead: "
    "without View All and Modify All it cannot find or update the Contacts and Leads other "
    "users own (Private sharing) and would create duplicates; assign the permission set "
    "Instruqt_CRM_Integration to the sync user: instruqt-crm setup salesforce --assign-to "
    "USERNAME (or in Setup: Users, the user, Permission Set Assignments)"
)


def named(n: int, last: str) -> ContactChange:
    learner = change(n)
    return ContactChange(
        learner.key, learner.email, learner.properties, learner.user_id, "Ada", last
    )


def test_writes_succeed_through_an_alerting_duplicate_rule_with_the_header() -> None:
    with FakeSalesforce() as fake:
        first = fake.add("Lead", Email="ada@old.io", LastName="Lovelace", Company="Acme")
        fake.duplicate_rules["Lead"] = DuplicateRule("Standard_Lead_Duplicate_Rule", ("LastName",))
        [saved] = adapter(fake).upsert([named(1, "Lovelace")])
        assert saved.status == "synced" and len(fake.records["Lead"]) == 2
        strict = adapter(fake, allow_duplicate_save=False)  # SALESFORCE_ALLOW_DUPLICATE_SAVE=false
        [refused] = strict.upsert([named(2, "Lovelace")])
        assert (refused.status, refused.category) == ("rejected", Category.CONFLICT)
        assert refused.reason == (
            "Lead (new): DUPLICATES_DETECTED: Use one of these records?: duplicate rule "
            f"Standard_Lead_Duplicate_Rule matched Lead {first}, Lead {saved.record_id}: the rule "
            "alerts: set SALESFORCE_ALLOW_DUPLICATE_SAVE=true to save past it, or merge the "
            "duplicates in Salesforce, then requeue the failure"
        )
        fake.duplicate_rules["Lead"] = DuplicateRule("No_Twins", ("LastName",), block=True)
        [blocked] = adapter(fake).upsert([named(3, "Lovelace")])
        assert blocked.status == "rejected" and "duplicate rule No_Twins matched" in blocked.reason
        assert "the rule blocks the save: merge the duplicates in Salesforce" in blocked.reason
        assert len(fake.records["Lead"]) == 2
        [other] = adapter(fake).upsert([named(4, "Hopper")])
        assert other.status == "synced"


def test_private_sharing_needs_view_all_and_modify_all_on_leads_and_contacts() -> None:
    with FakeSalesforce() as fake:
        fake.access.sharing.update(Lead="Private", Contact="Private")
        sf = adapter(fake)
        [permission_set] = fake.access.permission_sets.values()
        generated = {o: set(p) for o, p in permission_set.objects.items()}
        for sobject in ("Contact", "Lead"):  # as this project's permission set granted before
            permission_set.objects[sobject] -= {"ViewAllRecords", "ModifyAllRecords"}
        theirs = fake.add(
            "Lead",
            Email="u1@acme.io",
            LastName="Entered by a rep",
            Company="Acme",
            OwnerId=SALES_REP,
            Instruqt_User_Id__c="user-1",
        )
        [lost] = sf.upsert([change(1)])  # the rep's Lead is invisible: the learner looks new
        assert lost.status == "rejected" and "DUPLICATE_VALUE" in lost.reason
        assert sf.problems() == [LACKS]
        permission_set.objects.update(generated)
        assert sf.problems() == []
        [found] = sf.upsert([change(1)])
        assert (found.status, found.record_id) == ("synced", theirs)
        assert fake.records["Lead"][theirs]["Instruqt_Last_Track__c"] == "k8s"
        assert len(fake.records["Lead"]) == 1


def use(monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    """The CLI's Salesforce credentials: a ready session with this token."""
    monkeypatch.setenv("SALESFORCE_INSTANCE_URL", URL)
    monkeypatch.setenv("SALESFORCE_ACCESS_TOKEN", token)
    monkeypatch.setenv("INSTRUQT_WEBHOOK_SECRET", SECRET)


def crm_lines(output: str) -> list[str]:
    """What `check` said of Salesforce (after the mapping line)."""
    return [line for line in output.splitlines()[1:] if line.startswith("Salesforce:")]


def test_check_names_the_access_the_user_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeSalesforce() as fake:
        fake.deploy(package(MAPPING))
        [permission_set] = fake.access.permission_sets.values()
        permission_set.objects["Lead"] -= {"ViewAllRecords", "ModifyAllRecords"}
        permission_set.objects["Contact"] -= {"ViewAllRecords", "ModifyAllRecords"}
        use(monkeypatch, fake.issue_token())
        lacking = CliRunner().invoke(main, ["check", "mappings/salesforce.yaml"])
        assert lacking.exit_code == 1, lacking.output
        assert crm_lines(lacking.output) == [LACKS]
        fake.deploy(package(MAPPING))  # the generated permission set, deployed again
        ready = CliRunner().invoke(main, ["check", "mappings/salesforce.yaml"])
    assert ready.exit_code == 0, ready.output
    assert crm_lines(ready.output) == [
        "Salesforce: every mapped field exists (10)",
        f"Salesforce: {USER} may find and update every Contact and Lead (View All, Modify All)",
    ]


def test_a_user_without_view_setup_is_told_what_cannot_be_checked() -> None:
    with FakeSalesforce() as fake:
        sf = adapter(fake, assign_to=None)
        [fields, access] = sf.problems()
    assert fields.startswith("Salesforce: 19 mapped field(s) missing in the org or not visible")
    assert "(cannot read FieldDefinition: Salesforce find Contact field definitions: 400 " in fields
    assert "Create them with instruqt-crm setup salesforce --deploy" in fields
    assert "assign the permission set Instruqt_CRM_Integration" in fields
    assert access.startswith(f"Salesforce: cannot read the object permissions of {USER} (")
    assert "INVALID_TYPE" in access and "grants View Setup and Configuration" in access


def test_dry_run_says_which_fields_deploying_creates_and_which_only_need_the_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeSalesforce() as fake:
        fake.access.users[INTEGRATION].profile.view_setup = True
        fake.deploy(package(MAPPING), assign_to=None)
        fake.custom_fields.discard("Instruqt_Last_Track__c")
        use(monkeypatch, fake.issue_token())
        args = ["setup", "salesforce", "--mapping", "mappings/salesforce.yaml"]
        dry = CliRunner().invoke(main, [*args, "--out", str(tmp_path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    created, hidden = dry.output.splitlines()[-2:]
    assert created == "deploy would create (1): Instruqt_Last_Track__c"
    assert hidden.startswith("exist, hidden from the user until the permission set is assigned")
    assert "(18): Instruqt_Challenges_Completed_Count__c, " in hidden


@pytest.fixture
def runtime(redis_url: str, tmp_path: Path):
    settings = Settings.from_env(salesforce_env(redis_url, tmp_path))
    with installed(Runtime.from_settings(settings)) as run:
        yield run


def start_message(runtime: Runtime, conn: redis.Redis) -> str:
    """Why the worker refuses to start."""
    with pytest.raises(StartupError) as caught:
        preflight(runtime, conn)
    return str(caught.value)


def test_the_start_up_message_tells_missing_fields_from_invisible_ones(
    runtime: Runtime, redis_conn: redis.Redis
) -> None:
    with FakeSalesforce() as fake:
        fake.access.users[INTEGRATION].profile.view_setup = True  # it may read FieldDefinition
        fake.deploy(package(runtime.mapping), assign_to=None)
        fake.custom_fields.discard("Instruqt_Last_Track__c")  # an admin deleted this one
        lines = start_message(runtime, redis_conn).split(" | ")
        assert lines[0] == (
            "Salesforce: 1 mapped field(s) missing in the org: Instruqt_Last_Track__c. Create "
            "them with: instruqt-crm setup salesforce --deploy (or --out DIR, then deploy that "
            "folder)"
        )
        assert lines[1].startswith(
            "Salesforce: 18 mapped field(s) exist but the user cannot see them (field-level "
            "security): Instruqt_Challenges_Completed_Count__c, "
        )
        assert "Instruqt_Last_Track__c" not in lines[1] and "Instruqt_Play__c.Track__c" in lines[1]
        assert lines[1].endswith(
            "Assign the permission set Instruqt_CRM_Integration to the sync user: instruqt-crm "
            "setup salesforce --assign-to USERNAME (or in Setup: Users, the user, Permission "
            "Set Assignments)"
        )
        assert lines[2].startswith("Salesforce: the user 005000000000001AAA lacks View All, Mod")
        fake.deploy(package(runtime.mapping))  # deployed again, and assigned
        preflight(runtime, redis_conn)


def test_setup_deploys_then_assigns_the_permission_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["setup", "salesforce", "--mapping", "mappings/salesforce.yaml", "--out", str(tmp_path)]
    with FakeSalesforce() as fake:

        def deploy(self, archive, sandbox):
            fake.deploy(package(MAPPING), assign_to=None)
            return {"asyncId": "0Af1", "state": "Queued"}

        monkeypatch.setattr(Salesforce, "deploy", deploy)
        monkeypatch.setattr(Salesforce, "checkDeployStatus", lambda self, i: {"state": "Succeeded"})
        use(monkeypatch, fake.issue_token())  # the sync user's own credentials
        refused = CliRunner().invoke(main, [*args, "--deploy"])
        assert refused.exit_code == 1 and "deployed: Succeeded" in refused.output
        assert "Assigning needs View Setup and Configuration and Assign Permission Sets" in (
            refused.output
        )
        use(monkeypatch, fake.issue_token(ADMIN))
        deployed = CliRunner().invoke(
            main, [*args, "--deploy", "--assign-to", "integration@acme.com"]
        )
        again = CliRunner().invoke(main, [*args, "--assign-to", "integration@acme.com"])
        rep = CliRunner().invoke(main, [*args, "--assign-to", "rep@acme.com"])
        nobody = CliRunner().invoke(main, [*args, "--assign-to", "nobody@acme.com"])
        own = CliRunner().invoke(main, [*args, "--deploy"])  # the admin's own user
        use(monkeypatch, fake.issue_token())
        check = CliRunner().invoke(main, ["check", "mappings/salesforce.yaml"])
    assigned = "Salesforce: permission set Instruqt_CRM_Integration"
    assert deployed.exit_code == 0, deployed.output
    assert deployed.output.splitlines()[-2:] == [
        "deployed: Succeeded",
        f"{assigned} assigned to {USER}",
    ]
    assert again.output.splitlines()[-1] == f"{assigned} was already assigned to {USER}"
    assert rep.output.splitlines()[-1] == (
        f"{assigned} assigned to the user rep@acme.com (005000000000002AAA)"
    )
    assert nobody.exit_code == 1 and "no user has the username 'nobody@acme.com'" in nobody.output
    assert own.output.splitlines()[-1] == (
        f"{assigned} assigned to the user admin@acme.com ({ADMIN})"
    )
    assert [c for c in fake.calls if c.path == "oauth2/userinfo"], "the session's user, asked"
    assert check.exit_code == 0, check.output
