"""``instruqt-crm release`` (the Procfile's release phase), through click's CliRunner, on a real
Redis, the fake HubSpot and the fake Salesforce."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result

from instruqt_crm import keys
from instruqt_crm.cli import main
from instruqt_crm.config import Settings
from instruqt_crm.crm import salesforce_setup
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.engine import mapping_record, queueing
from instruqt_crm.mapping import load_mapping
from samples.signing import SECRET
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.salesforce import URL, FakeSalesforce
from tests.redis_process import TlsRedisProcess
from tests.test_fake_hubspot import create_property

ROOT = Path(__file__).resolve().parent.parent
HUBSPOT_MAPPING = ROOT / "mappings" / "hubspot.yaml"
SALESFORCE_MAPPING = load_mapping(ROOT / "mappings" / "salesforce.yaml")
# the properties the shipped HubSpot mapping creates: all but HubSpot's built-in email
CREATED = [name for name in load_mapping(HUBSPOT_MAPPING).properties if name != "email"]
MAPPED = len(CREATED)
DOWN = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1


def run(*args: str) -> Result:
    """``instruqt-crm release`` in-process (the environment is the test's)."""
    return CliRunner().invoke(main, ["release", *args])


@pytest.fixture(autouse=True)
def env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A deployment's environment, no CRM credentials: only what app.json sets and Heroku's
    REDIS_URL (the test Redis); nothing from the developer's shell."""
    monkeypatch.chdir(ROOT)
    for field in Settings.model_fields.values():
        monkeypatch.delenv(str(field.validation_alias), raising=False)
    monkeypatch.setenv("INSTRUQT_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MAPPING_PATH", "mappings/hubspot.yaml")
    monkeypatch.setenv("DRY_RUN_PATH", str(tmp_path / "dry-run.jsonl"))
    yield


@pytest.fixture
def hubspot(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHubSpot]:
    """The fake HubSpot, its token and URL in the environment."""
    with FakeHubSpot() as fake:
        monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", fake.token)
        monkeypatch.setenv("HUBSPOT_API_BASE", fake.url)
        yield fake


@pytest.fixture
def salesforce(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSalesforce]:
    """The fake Salesforce org (a ready session in the environment), the Salesforce mapping."""
    with FakeSalesforce() as fake:
        monkeypatch.setenv("MAPPING_PATH", "mappings/salesforce.yaml")
        monkeypatch.setenv("SALESFORCE_INSTANCE_URL", URL)
        monkeypatch.setenv("SALESFORCE_ACCESS_TOKEN", fake.issue_token())
        yield fake


def lines(result: Result) -> list[str]:
    return result.output.splitlines()


def assert_clean(result: Result) -> None:
    """Ended by an exit code, never by an exception (no traceback)."""
    assert isinstance(result.exception, SystemExit | None), result.exception
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ the Procfile


def test_the_procfile_release_phase_runs_the_release_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (line,) = [x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("release:")]
    program, *args = shlex.split(line.removeprefix("release:"))
    assert (program, args) == ("instruqt-crm", ["release"])
    env = json.loads((ROOT / "app.json").read_text())["env"]
    for name, spec in env.items():  # the config vars the Heroku button sets
        if "value" in spec or "generator" in spec:
            monkeypatch.setenv(name, spec.get("value", "generated-secret"))
    assert "release phase creates" in env["HUBSPOT_ACCESS_TOKEN"]["description"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert lines(result)[-1] == "release: ok (mapping, settings, Redis, HubSpot, learner state)"


# ------------------------------------------------------------------ without CRM credentials


def test_learner_state_an_earlier_version_kept_is_converted(redis_conn: redis.Redis) -> None:
    redis_conn.hset(keys.contact("old@x.co"), mapping={"email": "old@x.co", "version": "1"})
    result = run()
    assert result.exit_code == 0, result.output
    assert "Learner state: ok (1 learner(s) converted to the packed form)" in lines(result)
    assert not redis_conn.exists(keys.contact("old@x.co"))
    assert redis_conn.exists(keys.learner("old@x.co"))


def test_dry_run_passes_and_says_the_crm_is_not_checked() -> None:
    mapping = load_mapping(HUBSPOT_MAPPING)
    result = run()
    assert result.exit_code == 0, result.output
    redis_line = lines(result)[2]  # with how full Redis is and its eviction policy
    assert redis_line.startswith(f"Redis: ok ({Settings.from_env().redis_url} answers; memory ")
    assert lines(result) == [
        f"mappings/hubspot.yaml: ok (hubspot contact, {len(mapping.properties)} properties, "
        f"{len(mapping.events)} rules)",
        "settings: ok",
        redis_line,
        "HubSpot: not checked, dry run (no HUBSPOT_ACCESS_TOKEN: the worker writes what it "
        f"would send to {Settings.from_env().dry_run_path})",
        "Learner state: ok (nothing to convert)",
        "release: ok (mapping, settings, Redis, HubSpot, learner state)",
    ]


def test_salesforce_mapping_without_credentials_is_a_dry_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAPPING_PATH", "mappings/salesforce.yaml")
    result = run()
    assert result.exit_code == 0, result.output
    assert "Salesforce: not checked, dry run (no SALESFORCE_* credentials" in result.output


# ------------------------------------------------------------------ Redis


def test_unreachable_redis_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", DOWN)
    result = run()
    assert result.exit_code == 1, result.output
    assert_clean(result)
    (line,) = [x for x in lines(result) if x.startswith("Redis")]
    assert line.startswith("Redis: cannot reach redis://127.0.0.1:1/0: ")
    assert "Connection refused" in line
    assert "hunter2" not in result.output
    assert lines(result)[-1] == "release: failed (Redis)"


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedisProcess]:
    """A TLS-only Redis with a self-signed certificate and a password, as Heroku Redis is."""
    server = TlsRedisProcess().start()
    yield server
    server.stop()


def test_heroku_redis_with_the_app_json_settings(
    tls_redis: TlsRedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", tls_redis.url)
    where = f"rediss://127.0.0.1:{tls_redis.port}"
    verified = run()  # REDIS_TLS_VERIFY's default: the self-signed certificate is refused
    assert verified.exit_code == 1, verified.output
    assert_clean(verified)
    (line,) = [x for x in lines(verified) if x.startswith("Redis")]
    assert line.startswith(f"Redis: cannot reach {where}: ")
    assert "certificate verify failed" in line and "REDIS_TLS_VERIFY=false" in line

    monkeypatch.setenv("REDIS_TLS_VERIFY", "false")  # as app.json sets it
    result = run()
    assert result.exit_code == 0, result.output
    assert f"Redis: ok ({where} answers; memory " in result.output

    monkeypatch.setenv("REDIS_URL", tls_redis.url.replace(tls_redis.password, "wrong"))
    refused = run()
    assert refused.exit_code == 1, refused.output
    assert_clean(refused)
    (line,) = [x for x in lines(refused) if x.startswith("Redis")]
    assert line.startswith(f"Redis: cannot reach {where}: ")
    for output in (verified.output, result.output, refused.output):
        assert tls_redis.password not in output and "wrong" not in output


def test_unset_redis_url_is_a_setting_error_not_an_embedded_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the release started an embedded Redis")

    monkeypatch.setattr(queueing, "EmbeddedRedis", refuse)
    monkeypatch.delenv("REDIS_URL")
    result = run()
    assert result.exit_code == 2, result.output
    assert_clean(result)
    assert "Redis: REDIS_URL is not set: a deployment needs REDIS_URL" in result.output


def test_a_redis_url_redis_cannot_parse_is_a_setting_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:port")
    result = run()
    assert result.exit_code == 2, result.output
    assert_clean(result)
    assert "Redis: REDIS_URL is not usable (redis://127.0.0.1:port)" in result.output
    assert "hunter2" not in result.output


# ------------------------------------------------------------------ settings and mapping


@pytest.mark.parametrize(
    ("variable", "value"),
    [("FLUSH_LEASE_SECONDS", "1"), ("HUBSPOT_REQUESTS_PER_10S", "many"), ("REDIS_URL", "http://x")],
)
def test_a_malformed_setting_exits_2_naming_it(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    result = run()
    assert result.exit_code == 2, result.output
    assert_clean(result)
    (line,) = [x for x in lines(result) if x.startswith("settings:")]
    assert line.startswith(f"settings: {variable}: expected ")
    assert "Redis: not checked" in result.output
    assert lines(result)[-1] == "release: failed (settings)"


def test_the_web_process_needs_the_webhook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSTRUQT_WEBHOOK_SECRET")
    result = run()
    assert result.exit_code == 2, result.output
    assert "settings: INSTRUQT_WEBHOOK_SECRET: missing" in result.output


def test_an_invalid_mapping_fails_with_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(HUBSPOT_MAPPING.read_text().replace("merge: set_once", "merge: sett_once", 1))
    monkeypatch.setenv("MAPPING_PATH", str(bad))
    result = run()
    assert result.exit_code == 1, result.output
    assert_clean(result)
    assert f"{bad}:" in result.output and "did you mean 'set_once'" in result.output
    assert "Redis: ok" in result.output  # the other steps still ran
    assert "CRM: not checked" in result.output
    assert lines(result)[-1] == "release: failed (mapping)"


def test_a_merge_policy_change_is_a_warning_saying_what_happens_to_stored_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = queueing.connect(Settings.from_env())
    with conn.pipeline() as pipe:  # what a worker of the deployed mapping recorded
        mapping_record.note_merged(pipe, load_mapping(HUBSPOT_MAPPING), ["instruqt_tracks_started"])
        pipe.execute()
    text = HUBSPOT_MAPPING.read_text()
    union = 'every track started."\n    merge: union'
    assert union in text
    changed = tmp_path / "latest.yaml"
    changed.write_text(text.replace(union, 'every track started."\n    merge: latest'))
    monkeypatch.setenv("MAPPING_PATH", str(changed))
    result = run()
    assert result.exit_code == 0, result.output
    [warning] = [line for line in lines(result) if line.startswith("stored values:")]
    assert warning.startswith(
        "stored values: instruqt_tracks_started: its merge changes from 'union' to 'latest': "
        "values stored under 'union' are dropped, not converted."
    )
    assert warning.endswith("(warning)")


def test_a_missing_mapping_file_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAPPING_PATH", "mappings/nope.yaml")
    assert run().exit_code == 2


# ------------------------------------------------------------------ HubSpot


def test_hubspot_missing_properties_are_created_once(hubspot: FakeHubSpot) -> None:
    first = run()
    assert first.exit_code == 0, first.output
    created = [x for x in lines(first) if x.startswith("HubSpot:")]
    assert created == [
        f"HubSpot: created the instruqt group and {MAPPED} properties: {', '.join(CREATED)}"
    ]
    assert hubspot.properties["instruqt_last_track"]["groupName"] == "instruqt"
    assert hubspot.properties["instruqt_last_review_score"]["type"] == "number"
    assert hubspot.token not in first.output

    second = run()
    assert second.exit_code == 0, second.output
    mapped = len(load_mapping(HUBSPOT_MAPPING).properties)
    assert f"HubSpot: every mapped property exists ({mapped}), nothing created" in second.output
    assert lines(second)[-1] == "release: ok (mapping, settings, Redis, HubSpot, learner state)"
    methods = ["GET"] * 2 + ["POST"] * (1 + MAPPED) + ["GET"] * 2  # group, properties
    assert [r.method for r in hubspot.requests] == methods
    assert CliRunner().invoke(main, ["check"]).exit_code == 0


def test_hubspot_existing_properties_are_left_alone(hubspot: FakeHubSpot) -> None:
    adapter = HubSpotAdapter(hubspot.token, hubspot.url)
    create_property(adapter.client, "instruqt_last_track", group="contactinformation")
    result = run()
    assert result.exit_code == 0, result.output
    assert f"and {MAPPED - 1} properties: " in result.output
    assert "instruqt_last_track" not in result.output
    assert hubspot.properties["instruqt_last_track"]["groupName"] == "contactinformation"


def test_hubspot_type_mismatch_fails_the_release(hubspot: FakeHubSpot) -> None:
    adapter = HubSpotAdapter(hubspot.token, hubspot.url)
    create_property(adapter.client, "instruqt_last_review_score")  # a string; mapped: number
    result = run()
    assert result.exit_code == 1, result.output
    assert_clean(result)
    assert "type mismatch: instruqt_last_review_score: is string" in result.output
    assert "Fix these in HubSpot (or rename the property in the mapping)." in result.output
    assert lines(result)[-1] == "release: failed (HubSpot)"
    assert hubspot.properties["instruqt_last_review_score"]["type"] == "string"  # unchanged
    assert "instruqt_last_track" not in hubspot.properties  # a failing release creates nothing


def test_hubspot_upsert_key_that_is_not_unique_fails_the_release(
    hubspot: FakeHubSpot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text(HUBSPOT_MAPPING.read_text() + "\nhubspot:\n  upsert_by: match_key\n")
    monkeypatch.setenv("MAPPING_PATH", str(keyed))
    adapter = HubSpotAdapter(hubspot.token, hubspot.url)
    create_property(adapter.client, "instruqt_user_id")  # made before, without uniqueness
    result = run()
    assert result.exit_code == 1, result.output
    assert "type mismatch: instruqt_user_id: is not unique" in result.output
    assert "instruqt-crm setup hubspot again, or upsert by email" in result.output


def test_hubspot_properties_are_not_created_by_a_failing_release(
    hubspot: FakeHubSpot, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = set(hubspot.properties)
    monkeypatch.setenv("REDIS_URL", DOWN)
    result = run()
    assert result.exit_code == 1, result.output
    assert f"HubSpot: the account lacks {MAPPED} mapped properties: " in result.output
    assert "Not created, as the release fails" in result.output
    assert lines(result)[-1] == "release: failed (Redis, HubSpot)"
    assert set(hubspot.properties) == known
    assert "instruqt" not in hubspot.groups


def test_hubspot_bad_token_fails_in_one_line(
    hubspot: FakeHubSpot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", "wrong-token")
    result = run()
    assert result.exit_code == 1, result.output
    assert_clean(result)
    (line,) = [x for x in lines(result) if x.startswith("HubSpot")]
    assert line.startswith("HubSpot: cannot read the contact properties: ") and "401" in line
    assert "wrong-token" not in result.output


# ------------------------------------------------------------------ Salesforce


def test_salesforce_missing_fields_fail_naming_them_and_the_deploy_command(
    salesforce: FakeSalesforce,
) -> None:
    salesforce.custom_fields |= set(SALESFORCE_MAPPING.properties) - {"Instruqt_Last_Track__c"}
    result = run()
    assert result.exit_code == 1, result.output
    assert_clean(result)
    assert "Salesforce: " in result.output and "Instruqt_Last_Track__c" in result.output
    assert "instruqt-crm setup salesforce --deploy" in result.output
    assert lines(result)[-1] == "release: failed (Salesforce)"


def test_salesforce_with_every_field_passes(salesforce: FakeSalesforce) -> None:
    salesforce.deploy(salesforce_setup.package(SALESFORCE_MAPPING))
    result = run()
    assert result.exit_code == 0, result.output
    assert "Salesforce: every mapped field exists" in result.output
    assert lines(result)[-1] == "release: ok (mapping, settings, Redis, Salesforce, learner state)"
