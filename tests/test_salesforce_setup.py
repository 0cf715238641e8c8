"""Salesforce metadata: the generated sfdx project matches the mapping, is idempotent, deploys."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceGeneralError

from instruqt_crm.cli import main
from instruqt_crm.config import Secret
from instruqt_crm.crm import salesforce_setup
from instruqt_crm.crm.salesforce_auth import Connection, Credentials
from instruqt_crm.errors import PermanentError
from instruqt_crm.mapping import load_mapping
from tests.fakes.salesforce import URL, FakeSalesforce
from tests.signing import SECRET

MAPPING = load_mapping("mappings/salesforce.yaml")
NS = {"m": salesforce_setup.NS}
FIELDS = "force-app/main/default/objects/{}/fields/{}.field-meta.xml"


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
    assert len(files) == 2 * len(MAPPING.properties) + 2


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
        "    <description>Slug (or id) of the track of the most recent track event.</description>\n"
        "    <externalId>false</externalId>\n"
        "    <fullName>Instruqt_Last_Track__c</fullName>\n"
        "    <label>Instruqt: last track</label>\n"
        "    <length>255</length>\n"
        "    <required>false</required>\n"
        "    <type>Text</type>\n"
        "    <unique>false</unique>\n"
        "</CustomField>\n"
    )


def test_permission_set_grants_every_field() -> None:
    files = salesforce_setup.package(MAPPING)
    path = "force-app/main/default/permissionsets/Instruqt_CRM_Integration.permissionset-meta.xml"
    root = parse(files[path])
    granted = {
        p.findtext("m:field", namespaces=NS)
        for p in root.findall("m:fieldPermissions", NS)
        if p.findtext("m:editable", namespaces=NS) == "true"
    }
    assert granted == {f"{o}.{n}" for o in ("Contact", "Lead") for n in MAPPING.properties}
    lead = [
        p
        for p in root.findall("m:objectPermissions", NS)
        if p.findtext("m:object", namespaces=NS) == "Lead"
    ]
    assert lead[0].findtext("m:allowCreate", namespaces=NS) == "true"


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


def _connection(fake: FakeSalesforce) -> Connection:
    return Connection(Credentials(instance_url=URL, access_token=Secret(fake.issue_token())))


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
    assert "0 file(s) wrote, 22 unchanged" in again.output


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
