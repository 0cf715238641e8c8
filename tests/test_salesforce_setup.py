"""Salesforce metadata: the generated sfdx project matches the mapping, is idempotent, deploys."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import SecretStr
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceGeneralError

from instruqt_crm.cli import main
from instruqt_crm.crm import salesforce_setup
from instruqt_crm.crm.salesforce_auth import Connection, Credentials
from instruqt_crm.crm.salesforce_plays import PLAY_OBJECT, REQUIRED_FIELDS, STATUSES
from instruqt_crm.errors import PermanentError
from instruqt_crm.mapping import load_mapping
from samples.signing import SECRET
from tests.fakes.salesforce import URL, FakeSalesforce

MAPPING = load_mapping("mappings/salesforce.yaml")
NO_PLAYS = MAPPING.model_copy(
    update={"salesforce": MAPPING.salesforce.model_copy(update={"plays": None})}
)
NS = {"m": salesforce_setup.NS}
FIELDS = "force-app/main/default/objects/{}/fields/{}.field-meta.xml"
PLAY_OBJECT_FILE = f"force-app/main/default/objects/{PLAY_OBJECT}/{PLAY_OBJECT}.object-meta.xml"
PERMISSIONS = (
    "force-app/main/default/permissionsets/Instruqt_CRM_Integration.permissionset-meta.xml"
)


def parse(content: bytes) -> ET.Element:
    return ET.fromstring(content)


def test_package_has_every_mapped_field_on_both_objects() -> None:
    files = salesforce_setup.package(MAPPING)
    for sobject in ("Contact", "Lead"):
        for name in MAPPING.properties:
            root = parse(files[FIELDS.format(sobject, name)])
            assert root.findtext("m:fullName", namespaces=NS) == name
            assert root.findtext("m:label", namespaces=NS) == MAPPING.properties[name].label
    assert json.loads(files["sfdx-project.json"])["packageDirectories"][0]["path"] == "force-app"
    assert len(files) == 2 * len(MAPPING.properties) + 1 + len(REQUIRED_FIELDS) + 2
    assert len(salesforce_setup.package(NO_PLAYS)) == 2 * len(MAPPING.properties) + 2


def test_field_types_follow_the_mapping() -> None:
    files = salesforce_setup.package(MAPPING)

    def kind(name: str) -> dict[str, str]:
        root = parse(files[FIELDS.format("Lead", name)])
        return {child.tag.split("}")[1]: child.text or "" for child in root}

    user_id = kind("Instruqt_User_Id__c")
    assert (user_id["type"], user_id["externalId"], user_id["unique"]) == ("Text", "true", "true")
    assert kind("Instruqt_Last_Track__c")["type"] == "Text"
    assert kind("Instruqt_Last_Track__c")["length"] == "255"
    assert kind("Instruqt_Tracks_Completed__c")["type"] == "LongTextArea"
    count = kind("Instruqt_Tracks_Completed_Count__c")
    assert (count["type"], count["precision"], count["scale"]) == ("Number", "18", "0")
    assert kind("Instruqt_Last_Activity_At__c")["type"] == "DateTime"


def test_golden_field_file() -> None:
    files = salesforce_setup.package(MAPPING)
    assert files[FIELDS.format("Contact", "Instruqt_Last_Track__c")].decode() == (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<CustomField xmlns="http://soap.sforce.com/2006/04/metadata">\n'
        "    <fullName>Instruqt_Last_Track__c</fullName>\n"
        "    <description>Slug (or id) of the track of the most recent track event.</description>\n"
        "    <externalId>false</externalId>\n"
        "    <label>Instruqt: last track</label>\n"
        "    <length>255</length>\n"
        "    <required>false</required>\n"
        "    <type>Text</type>\n"
        "    <unique>false</unique>\n"
        "</CustomField>\n"
    )


def granted_fields(files: dict[str, bytes]) -> set[str | None]:
    return {
        p.findtext("m:field", namespaces=NS)
        for p in parse(files[PERMISSIONS]).findall("m:fieldPermissions", NS)
        if p.findtext("m:editable", namespaces=NS) == "true"
        and p.findtext("m:readable", namespaces=NS) == "true"
    }


def object_permissions(files: dict[str, bytes]) -> dict[str, dict[str, str]]:
    return {
        str(p.findtext("m:object", namespaces=NS)): {c.tag.split("}")[1]: c.text or "" for c in p}
        for p in parse(files[PERMISSIONS]).findall("m:objectPermissions", NS)
    }


def granted(files: dict[str, bytes], sobject: str) -> set[str]:
    """The object permissions the permission set grants on ``sobject``."""
    return {flag for flag, value in object_permissions(files)[sobject].items() if value == "true"}


def test_permission_set_grants_what_the_sync_user_needs() -> None:
    files = salesforce_setup.package(MAPPING)
    learners = {f"{o}.{n}" for o in ("Contact", "Lead") for n in MAPPING.properties}
    plays = {f"{PLAY_OBJECT}.{n}" for n in REQUIRED_FIELDS}
    assert granted_fields(files) == learners | plays
    every_record = {"allowRead", "allowEdit", "viewAllRecords", "modifyAllRecords", "allowDelete"}
    assert granted(files, "Lead") == every_record | {"allowCreate"}  # auto creates Leads
    assert granted(files, "Contact") == every_record  # Modify All needs Delete; never used
    assert granted(files, "Account") == {"allowRead"}  # Contact access depends on it
    assert granted(files, PLAY_OBJECT) == {"allowCreate", "allowEdit", "allowRead"}
    users = parse(files[PERMISSIONS]).findall("m:userPermissions", NS)
    assert [
        (u.findtext("m:name", namespaces=NS), u.findtext("m:enabled", namespaces=NS)) for u in users
    ] == [("ViewSetup", "true")]
    contacts = salesforce_setup.package(MAPPING.model_copy(update={"object": "Contact"}))
    assert granted(contacts, "Contact") == every_record | {"allowCreate"}
    assert granted(contacts, "Lead") == every_record
    without = salesforce_setup.package(NO_PLAYS)
    assert granted_fields(without) == learners
    assert set(object_permissions(without)) == {"Account", "Contact", "Lead"}


def test_play_object_and_its_fields() -> None:
    files = salesforce_setup.package(MAPPING)
    root = parse(files[PLAY_OBJECT_FILE])
    assert root.findtext("m:label", namespaces=NS) == "Instruqt Play"
    assert root.findtext("m:nameField/m:type", namespaces=NS) == "AutoNumber"
    assert root.findtext("m:deploymentStatus", namespaces=NS) == "Deployed"

    def field(name: str) -> ET.Element:
        return parse(files[FIELDS.format(PLAY_OBJECT, name)])

    def text(name: str, tag: str) -> str | None:
        return field(name).findtext(f"m:{tag}", namespaces=NS)

    assert {n: text(n, "type") for n in REQUIRED_FIELDS} == {
        "Participant_Id__c": "Text",
        "Track__c": "Text",
        "Status__c": "Picklist",
        "Started_At__c": "DateTime",
        "Completed_At__c": "DateTime",
        "Challenges_Completed__c": "Number",
        "Minutes_Spent__c": "Number",
        "Contact__c": "Lookup",
        "Lead__c": "Lookup",
    }
    assert (text("Participant_Id__c", "externalId"), text("Participant_Id__c", "unique")) == (
        "true",
        "true",
    )
    assert (text("Track__c", "externalId"), text("Track__c", "unique")) == ("false", "false")
    values = field("Status__c").findall("m:valueSet/m:valueSetDefinition/m:value/m:fullName", NS)
    assert tuple(v.text for v in values) == STATUSES
    assert text("Status__c", "valueSet/m:restricted") == "true"
    for lookup, parent in (("Contact__c", "Contact"), ("Lead__c", "Lead")):
        assert text(lookup, "referenceTo") == parent
        assert text(lookup, "deleteConstraint") == "SetNull"
        assert text(lookup, "relationshipName") == "Instruqt_Plays"
    assert not any(PLAY_OBJECT in path for path in salesforce_setup.package(NO_PLAYS))


def test_writing_is_idempotent(tmp_path: Path) -> None:
    files = salesforce_setup.package(MAPPING)
    first = salesforce_setup.write(files, tmp_path)
    assert set(first.values()) == {"new"}
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert set(salesforce_setup.write(salesforce_setup.package(MAPPING), tmp_path).values()) == {
        "unchanged"
    }
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot


def test_mdapi_zip_is_a_deployable_package() -> None:
    archive = zipfile.ZipFile(io.BytesIO(salesforce_setup.mdapi_zip(MAPPING)))
    names = set(archive.namelist())
    assert {"package.xml", "objects/Contact.object", "objects/Lead.object"} <= names
    manifest = parse(archive.read("package.xml"))
    members = {m.text for m in manifest.iter(f"{{{salesforce_setup.NS}}}members")}
    assert "Lead.Instruqt_User_Id__c" in members and "Instruqt_CRM_Integration" in members
    lead = parse(archive.read("objects/Lead.object"))
    assert len(lead.findall("m:fields", NS)) == len(MAPPING.properties)
    play = parse(archive.read(f"objects/{PLAY_OBJECT}.object"))
    assert play.findtext("m:label", namespaces=NS) == "Instruqt Play"
    assert {f.findtext("m:fullName", namespaces=NS) for f in play.findall("m:fields", NS)} == set(
        REQUIRED_FIELDS
    )
    types = {
        t.findtext("m:name", namespaces=NS): {m.text for m in t.findall("m:members", NS)}
        for t in manifest.findall("m:types", NS)
    }
    assert types["CustomObject"] == {PLAY_OBJECT}
    assert {f"{PLAY_OBJECT}.{n}" for n in REQUIRED_FIELDS} <= types["CustomField"]
    plain = zipfile.ZipFile(io.BytesIO(salesforce_setup.mdapi_zip(NO_PLAYS)))
    assert f"objects/{PLAY_OBJECT}.object" not in plain.namelist()
    assert b"CustomObject</name>" not in plain.read("package.xml")


def _connection(fake: FakeSalesforce) -> Connection:
    return Connection(Credentials(instance_url=URL, access_token=SecretStr(fake.issue_token())))


def test_deploy_polls_until_done(monkeypatch: pytest.MonkeyPatch) -> None:
    states = iter(["InProgress", "Succeeded"])
    monkeypatch.setattr(
        Salesforce, "deploy", lambda self, z, sandbox: {"asyncId": "0Af1", "state": "Queued"}
    )
    monkeypatch.setattr(Salesforce, "checkDeployStatus", lambda self, i: {"state": next(states)})
    with FakeSalesforce() as fake:
        result = salesforce_setup.deploy(_connection(fake), MAPPING, sleep=lambda _: None)
    assert result["state"] == "Succeeded"


def test_deploy_without_metadata_permission_says_which_permission(monkeypatch) -> None:
    def refuse(self, z, sandbox):
        raise SalesforceGeneralError(
            URL, 500, "deploy", b"<faultcode>sf:INSUFFICIENT_ACCESS</faultcode>"
        )

    monkeypatch.setattr(Salesforce, "deploy", refuse)
    with FakeSalesforce() as fake, pytest.raises(PermanentError) as caught:
        salesforce_setup.deploy(_connection(fake), MAPPING)
    assert "Modify Metadata Through Metadata API Functions" in caught.value.reason


def test_failed_deploy_lists_the_problems(monkeypatch) -> None:
    monkeypatch.setattr(Salesforce, "deploy", lambda self, z, sandbox: {"asyncId": "0Af1"})
    detail = {"errors": [{"file": "objects/Lead.object", "message": "bad field"}]}
    monkeypatch.setattr(
        Salesforce,
        "checkDeployStatus",
        lambda self, i: {"state": "Failed", "deployment_detail": detail},
    )
    with FakeSalesforce() as fake, pytest.raises(PermanentError, match="bad field"):
        salesforce_setup.deploy(_connection(fake), MAPPING, sleep=lambda _: None)


def test_cli_setup_salesforce_dry_run_then_write(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SALESFORCE_ACCESS_TOKEN", raising=False)
    runner = CliRunner()
    args = ["setup", "salesforce", "--mapping", "mappings/salesforce.yaml", "--out", str(tmp_path)]
    dry = runner.invoke(main, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would write (new)" in dry.output and not any(tmp_path.iterdir())
    assert runner.invoke(main, args).exit_code == 0
    again = runner.invoke(main, args)
    total = len(salesforce_setup.package(MAPPING))
    assert total == 32
    assert f"0 file(s) wrote, {total} unchanged" in again.output


def test_cli_check_lists_missing_salesforce_fields(monkeypatch) -> None:
    with FakeSalesforce() as fake:
        fake.custom_fields |= set(MAPPING.properties) - {"Instruqt_Last_Track__c"}
        monkeypatch.setenv("SALESFORCE_INSTANCE_URL", URL)
        monkeypatch.setenv("SALESFORCE_ACCESS_TOKEN", fake.issue_token())
        monkeypatch.setenv("INSTRUQT_WEBHOOK_SECRET", SECRET)
        result = CliRunner().invoke(main, ["check", "mappings/salesforce.yaml"])
    assert result.exit_code == 1, result.output
    assert "Instruqt_Last_Track__c" in result.output
    assert "setup salesforce" in result.output


def test_cli_check_and_dry_run_list_missing_play_fields(tmp_path: Path, monkeypatch) -> None:
    with FakeSalesforce() as fake:
        fake.deploy(salesforce_setup.package(MAPPING))
        fake.custom_objects[PLAY_OBJECT].pop("Track__c")
        monkeypatch.setenv("SALESFORCE_INSTANCE_URL", URL)
        monkeypatch.setenv("SALESFORCE_ACCESS_TOKEN", fake.issue_token())
        monkeypatch.setenv("INSTRUQT_WEBHOOK_SECRET", SECRET)
        check = CliRunner().invoke(main, ["check", "mappings/salesforce.yaml"])
        args = ["setup", "salesforce", "--mapping", "mappings/salesforce.yaml"]
        dry = CliRunner().invoke(main, [*args, "--out", str(tmp_path), "--dry-run"])
    assert check.exit_code == 1, check.output
    assert "1 mapped field(s) missing in the org: Instruqt_Play__c.Track__c" in check.output
    assert dry.exit_code == 0, dry.output
    assert "deploy would create (1): Instruqt_Play__c.Track__c" in dry.output
