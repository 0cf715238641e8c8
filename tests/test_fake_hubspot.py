"""The fake HubSpot server, driven by the real `hubspot-api-client` (v12)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hubspot import HubSpot
from hubspot.crm.contacts import (
    BatchInputSimplePublicObjectBatchInputUpsert,
    SimplePublicObjectBatchInputUpsert,
)
from hubspot.crm.contacts.exceptions import (
    ApiException,
    ForbiddenException,
    ServiceException,
    UnauthorizedException,
)
from hubspot.crm.properties import PropertyCreate, PropertyGroupCreate
from hubspot.crm.properties.exceptions import ApiException as PropertiesApiException
from hubspot.crm.properties.exceptions import NotFoundException as PropertyNotFound

from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.hubspot_limits import peak_in_window

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake() -> Iterator[FakeHubSpot]:
    with FakeHubSpot() as server:
        yield server


@pytest.fixture
def client(fake: FakeHubSpot) -> HubSpot:
    return HubSpot(access_token=fake.token, host=fake.url)


def upsert(
    client: HubSpot,
    *inputs: tuple[str, dict[str, Any]],
    id_property: str = "email",
    traced: bool = False,
):
    """Batch-upsert (id, properties) pairs through the SDK (``traced``: the n-th input with
    ``objectWriteTraceId`` ``tn``)."""
    batch = BatchInputSimplePublicObjectBatchInputUpsert(
        inputs=[
            SimplePublicObjectBatchInputUpsert(
                id=i,
                id_property=id_property,
                properties=p,
                object_write_trace_id=f"t{n}" if traced else None,
            )
            for n, (i, p) in enumerate(inputs)
        ]
    )
    return client.crm.contacts.batch_api.upsert(
        batch_input_simple_public_object_batch_input_upsert=batch
    )


def error_json(exc: Exception) -> dict[str, Any]:
    """The parsed JSON body of an SDK ApiException."""
    return json.loads(exc.body)  # type: ignore[attr-defined]


def create_property(
    client: HubSpot,
    name: str,
    ptype: str = "string",
    field_type: str = "text",
    group: str = "contactinformation",
    **extra: Any,
):
    """Create a contact property through the SDK."""
    body = PropertyCreate(
        name=name, label=name.title(), type=ptype, field_type=field_type, group_name=group, **extra
    )
    return client.crm.properties.core_api.create("contacts", property_create=body)


# ------------------------------------------------------------------ batch upsert


def test_upsert_creates_then_updates() -> None:
    """An update keeps the record (and its createdate) and stamps lastmodifieddate anew."""
    created_at = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    now = [created_at]
    with FakeHubSpot(wall_clock=lambda: now[0]) as fake:
        client = HubSpot(access_token=fake.token, host=fake.url)
        first = upsert(client, ("Ada@Example.com", {"firstname": "Ada", "company": "Analytical"}))
        assert first.status == "COMPLETE"
        created = first.results[0]
        assert created.new is True
        assert created.properties["email"] == "ada@example.com"
        assert created.properties["hs_object_id"] == created.id
        assert created.created_at == created.updated_at == created_at

        now[0] += timedelta(milliseconds=1)
        second = upsert(client, ("ada@example.com", {"lastname": "Lovelace", "company": ""}))
        updated = second.results[0]
        assert (updated.new, updated.id) == (False, created.id)
        assert (updated.created_at, updated.updated_at) == (created_at, now[0])
        stored = fake.contacts["ada@example.com"]
        assert stored["firstname"] == "Ada" and stored["lastname"] == "Lovelace"
        assert stored["lastmodifieddate"] == "2026-01-02T03:04:05.679Z"
        assert "company" not in stored  # "" clears
        assert len(fake.contacts) == 1


def test_values_are_validated_and_stored_as_hubspot_does(
    fake: FakeHubSpot, client: HubSpot
) -> None:
    create_property(client, "score", "number", "number")
    create_property(client, "seen_at", "datetime", "date")
    create_property(client, "born_on", "date", "date")
    upsert(
        client,
        (
            "a@x.com",
            {
                "score": 7,
                "seen_at": "2021-07-29T16:14:57.31297754Z",
                "born_on": "1815-12-10",
                "lifecyclestage": "lead",
                "hs_email_optout": "TRUE",
            },
        ),
    )
    upsert(client, ("b@x.com", {"seen_at": "1627575297312"}))
    a, b = fake.contacts["a@x.com"], fake.contacts["b@x.com"]
    assert a["score"] == "7"
    assert a["seen_at"] == "2021-07-29T16:14:57.312Z"
    assert a["born_on"] == "1815-12-10"
    assert a["hs_email_optout"] == "true"
    assert b["seen_at"] == "2021-07-29T16:14:57.312Z"

    bad = {
        "score": "seven",
        "seen_at": "yesterday",
        "born_on": "2024-01-01T12:00:00Z",
        "lifecyclestage": "friend",
        "createdate": "2024-01-01T00:00:00Z",
    }
    for name, value in bad.items():
        with pytest.raises(ApiException) as caught:
            upsert(client, ("c@x.com", {name: value}))
        assert caught.value.status == 400
        body = error_json(caught.value)
        assert body["category"] == "VALIDATION_ERROR"
        assert f'"name":"{name}"' in body["message"]
    assert "c@x.com" not in fake.contacts


def test_more_than_100_inputs_is_rejected(fake: FakeHubSpot, client: HubSpot) -> None:
    inputs = [(f"u{i}@x.com", {"firstname": "U"}) for i in range(101)]
    with pytest.raises(ApiException) as caught:
        upsert(client, *inputs)
    assert caught.value.status == 400
    assert error_json(caught.value)["category"] == "VALIDATION_ERROR"
    assert fake.contacts == {}
    assert len(upsert(client, *inputs[:100]).results) == 100


def test_unknown_property_fails_the_whole_batch_naming_it(
    fake: FakeHubSpot, client: HubSpot
) -> None:
    with pytest.raises(ApiException) as caught:
        upsert(client, ("a@x.com", {"firstname": "A"}), ("b@x.com", {"instruqt_nope": "1"}))
    body = error_json(caught.value)
    assert caught.value.status == 400
    assert body["category"] == "VALIDATION_ERROR"
    assert body["message"].startswith("Property values were not valid: ")
    assert 'Property \\"instruqt_nope\\" does not exist' in body["message"]
    assert "PROPERTY_DOESNT_EXIST" in body["message"]
    assert fake.contacts == {}


def test_invalid_email_fails_the_whole_batch(fake: FakeHubSpot, client: HubSpot) -> None:
    with pytest.raises(ApiException) as caught:
        upsert(client, ("good@x.com", {"firstname": "G"}), ("not-an-email", {"firstname": "B"}))
    body = error_json(caught.value)
    assert caught.value.status == 400
    assert "INVALID_EMAIL" in body["message"] and "not-an-email" in body["message"]
    assert fake.contacts == {}


def test_duplicate_ids_in_one_batch_are_rejected(fake: FakeHubSpot, client: HubSpot) -> None:
    with pytest.raises(ApiException) as caught:
        upsert(client, ("a@x.com", {"firstname": "A"}), ("A@X.com", {"lastname": "B"}))
    assert caught.value.status == 400
    assert "Duplicate IDs" in error_json(caught.value)["message"]


def test_unique_property_as_id_allows_partial_success(fake: FakeHubSpot, client: HubSpot) -> None:
    with pytest.raises(ApiException) as caught:
        upsert(client, ("u1", {"firstname": "A"}), id_property="firstname")
    assert caught.value.status == 400  # not a unique property

    create_property(client, "instruqt_user_id", has_unique_value=True)
    upsert(client, ("taken@x.com", {"firstname": "T"}))
    result = upsert(
        client,
        ("u1", {"email": "new@x.com"}),
        ("u2", {"email": "taken@x.com"}),
        ("u3", {"firstname": "Three"}),
        id_property="instruqt_user_id",
    )
    assert result.num_errors == 1
    assert result.errors[0].category == "CONFLICT"
    assert result.errors[0].context == {}  # the input had no trace id: nothing names it
    assert "Existing ID" in result.errors[0].message
    assert sorted(r.properties["instruqt_user_id"] for r in result.results) == ["u1", "u3"]
    assert fake.contacts["new@x.com"]["instruqt_user_id"] == "u1"
    assert "instruqt_user_id" not in fake.contacts["taken@x.com"]


def test_a_207_names_failed_inputs_by_trace_id_and_never_by_email(
    fake: FakeHubSpot, client: HubSpot
) -> None:
    create_property(client, "instruqt_user_id", has_unique_value=True)
    upsert(client, ("taken@x.com", {}))
    inputs = [(f"u{n}", {"email": f"n{n}@x.com"}) for n in range(6)]
    inputs[2] = ("u2", {"email": "taken@x.com"})
    result = upsert(client, *inputs, id_property="instruqt_user_id", traced=True)
    [error] = result.errors
    assert error.context == {"objectWriteTraceId": ["t2"]}
    assert "taken@x.com" not in json.dumps(error.context)
    traces = {r.object_write_trace_id: r.properties["instruqt_user_id"] for r in result.results}
    assert traces == {f"t{n}": f"u{n}" for n in (0, 1, 3, 4, 5)}
    assert [r.properties["instruqt_user_id"] for r in result.results] != [
        "u0",
        "u1",
        "u3",
        "u4",
        "u5",
    ]


def test_switches_for_rare_answers(fake: FakeHubSpot, client: HubSpot) -> None:
    """An error naming no input; an input in neither list (and not written); results
    without trace ids."""
    create_property(client, "instruqt_user_id", has_unique_value=True)
    upsert(client, ("taken@x.com", {}))
    fake.errors_without_ids(1)
    fake.lose_inputs("U3@X.com", times=1)
    fake.echo_trace_ids = False
    result = upsert(
        client,
        ("u1", {"email": "taken@x.com"}),
        ("u2", {"email": "two@x.com"}),
        id_property="instruqt_user_id",
        traced=True,
    )
    assert [e.context for e in result.errors] == [{}]
    assert [r.object_write_trace_id for r in result.results] == [None]
    lost = upsert(client, ("u3@x.com", {}), ("u4@x.com", {}), traced=True)
    assert [r.properties["email"] for r in lost.results] == ["u4@x.com"]
    assert fake.requests[-1].status == 200
    assert "u3@x.com" not in fake.contacts
    again = upsert(client, ("u3@x.com", {}), traced=True)  # only the next `times` upserts
    assert [r.properties["email"] for r in again.results] == ["u3@x.com"]


def test_reads_single_batch_and_pages(fake: FakeHubSpot, client: HubSpot) -> None:
    upsert(client, *[(f"r{i}@x.com", {"firstname": f"R{i}"}) for i in range(3)])
    one = client.crm.contacts.basic_api.get_by_id(
        "r1@x.com", id_property="email", properties=["firstname", "lastname"]
    )
    assert one.properties["firstname"] == "R1" and one.properties["lastname"] is None
    page = client.crm.contacts.basic_api.get_page(limit=2)
    assert len(page.results) == 2 and page.paging.next.after
    rest = client.crm.contacts.basic_api.get_page(limit=2, after=page.paging.next.after)
    assert len(rest.results) == 1 and rest.paging is None


# ------------------------------------------------------------------ auth and scopes


def test_bad_token_is_401(fake: FakeHubSpot) -> None:
    wrong = HubSpot(access_token="wrong", host=fake.url)
    with pytest.raises(UnauthorizedException) as caught:
        upsert(wrong, ("a@x.com", {"firstname": "A"}))
    assert caught.value.status == 401
    assert error_json(caught.value)["category"] == "INVALID_AUTHENTICATION"
    assert fake.contacts == {}
    status, body, _ = raw_request(fake.url, "/crm/v3/properties/contacts", token=None)
    assert status == 401 and body["message"].startswith("Authentication credentials not found")


def test_missing_scope_is_403(fake: FakeHubSpot) -> None:
    fake.add_token("read-only", scopes=["crm.objects.contacts.read"])
    reader = HubSpot(access_token="read-only", host=fake.url)
    with pytest.raises(ForbiddenException) as caught:
        upsert(reader, ("a@x.com", {"firstname": "A"}))
    body = error_json(caught.value)
    assert body["category"] == "MISSING_SCOPES"
    assert body["errors"][0]["context"]["requiredGranularScopes"] == ["crm.objects.contacts.write"]


# ------------------------------------------------------------------ limits and faults


def test_rolling_window_limit_answers_429_then_recovers() -> None:
    now = [0.0]
    with FakeHubSpot(requests_per_window=3, window_seconds=0.5, clock=lambda: now[0]) as fake:
        client = HubSpot(access_token=fake.token, host=fake.url)
        remaining = []
        for i in range(3):
            info = client.crm.contacts.batch_api.upsert_with_http_info(
                BatchInputSimplePublicObjectBatchInputUpsert(
                    inputs=[
                        SimplePublicObjectBatchInputUpsert(
                            id=f"r{i}@x.com", id_property="email", properties={}
                        )
                    ]
                )
            )
            remaining.append(info[2]["X-HubSpot-RateLimit-Remaining"])
        assert remaining == ["2", "1", "0"]
        with pytest.raises(ApiException) as caught:
            upsert(client, ("r9@x.com", {}))
        exc = caught.value
        assert exc.status == 429
        body = error_json(exc)
        assert body["errorType"] == "RATE_LIMIT"
        assert body["policyName"] == "TEN_SECONDLY_ROLLING"
        assert body["message"] == "You have reached your ten_secondly_rolling limit."
        assert exc.headers["X-HubSpot-RateLimit-Max"] == "3"
        assert exc.headers["X-HubSpot-RateLimit-Remaining"] == "0"
        assert exc.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "500"
        assert fake.count_429 == 1 and "r9@x.com" not in fake.contacts

        now[0] = 0.5  # a window later: the three admitted requests have aged out
        assert upsert(client, ("r9@x.com", {})).results[0].new is True
        summary = fake.summary()
        assert summary["count_429"] == 1 and summary["by_status"] == {"200": 4, "429": 1}
        assert summary["max_admitted_in_window"] == 3 and summary["max_in_window"] == 4


def test_daily_limit_answers_429_daily() -> None:
    with FakeHubSpot(daily_limit=2, daily_headers=True) as fake:
        client = HubSpot(access_token=fake.token, host=fake.url)
        info = client.crm.properties.core_api.get_all_with_http_info("contacts")
        assert info[2]["X-HubSpot-RateLimit-Daily"] == "2"
        assert info[2]["X-HubSpot-RateLimit-Daily-Remaining"] == "1"
        client.crm.properties.core_api.get_all("contacts")
        with pytest.raises(PropertiesApiException) as caught:
            client.crm.properties.core_api.get_all("contacts")
        assert caught.value.status == 429
        assert error_json(caught.value)["policyName"] == "DAILY"


def test_no_daily_headers_unless_asked(fake: FakeHubSpot, client: HubSpot) -> None:
    """HubSpot documents the -Daily headers for API keys only; a private app's fake omits them."""
    headers = client.crm.properties.core_api.get_all_with_http_info("contacts")[2]
    assert "X-HubSpot-RateLimit-Max" in headers and "X-HubSpot-RateLimit-Daily" not in headers


def usage(fake: FakeHubSpot) -> dict[str, Any]:
    """The fake's answer to the daily usage endpoint (read with urllib, as any client would)."""
    request = urllib.request.Request(
        f"{fake.url}/account-info/v3/api-usage/daily/private-apps",
        headers={"Authorization": f"Bearer {fake.token}"},
    )
    with urllib.request.urlopen(request) as answer:
        return json.loads(answer.read())


def test_the_daily_limit_resets_at_the_accounts_midnight_not_utcs() -> None:
    """The usage endpoint and the DAILY 429 share one counter, which starts again at midnight
    in the account's time zone; resetsAt says when."""
    now = [datetime(2026, 12, 7, 22, 30, tzinfo=UTC).timestamp()]  # 17:30 in Chicago
    with FakeHubSpot(
        daily_limit=3,
        time_zone="America/Chicago",
        clock=lambda: now[0],
        wall_clock=lambda: datetime.fromtimestamp(now[0], UTC),
    ) as fake:
        client = HubSpot(access_token=fake.token, host=fake.url)
        for _ in range(3):
            client.crm.properties.core_api.get_all("contacts")
        with pytest.raises(PropertiesApiException):
            client.crm.properties.core_api.get_all("contacts")
        [item] = usage(fake)["results"]  # the usage endpoint still answers
        fields = "name usageLimit currentUsage collectedAt fetchStatus resetsAt"
        assert set(item) == set(fields.split())
        assert (item["usageLimit"], item["currentUsage"]) == (3, 4)
        assert item["resetsAt"] == "2026-12-08T06:00:00Z"  # Chicago's midnight (UTC-6)
        now[0] = datetime(2026, 12, 8, 0, 30, tzinfo=UTC).timestamp()  # past UTC's midnight
        with pytest.raises(PropertiesApiException):
            client.crm.properties.core_api.get_all("contacts")
        now[0] = datetime(2026, 12, 8, 6, 0, tzinfo=UTC).timestamp()
        client.crm.properties.core_api.get_all("contacts")
        [item] = usage(fake)["results"]
        assert item["currentUsage"] == 2 and item["resetsAt"] == "2026-12-09T06:00:00Z"


def test_injected_errors_come_after_auth_and_run_out(fake: FakeHubSpot, client: HubSpot) -> None:
    fake.inject_errors(503, count=2)
    with pytest.raises(UnauthorizedException):
        upsert(HubSpot(access_token="wrong", host=fake.url), ("a@x.com", {}))
    for _ in range(2):
        with pytest.raises(ServiceException) as caught:
            upsert(client, ("a@x.com", {}))
        assert caught.value.status == 503
        assert error_json(caught.value)["status"] == "error"
        assert "X-HubSpot-RateLimit-Remaining" in caught.value.headers
    fake.inject_errors(423)
    with pytest.raises(ApiException) as locked:
        upsert(client, ("a@x.com", {}))
    assert locked.value.status == 423
    fake.inject_errors(502, body="<html>Bad Gateway</html>")
    with pytest.raises(ServiceException) as gateway:
        upsert(client, ("a@x.com", {}))
    assert gateway.value.body == "<html>Bad Gateway</html>"
    assert fake.contacts == {}
    assert upsert(client, ("a@x.com", {})).results[0].new is True


def test_error_rate(fake: FakeHubSpot, client: HubSpot) -> None:
    fake.set_error_rate(1.0, status=500, seed=1)
    with pytest.raises(ServiceException):
        upsert(client, ("a@x.com", {}))
    fake.set_error_rate(0.0)
    assert client.crm.properties.core_api.get_all("contacts").results


def test_latency_delays_every_answer() -> None:
    slept: list[float] = []
    with FakeHubSpot(sleep=slept.append) as fake:
        client = HubSpot(access_token=fake.token, host=fake.url)
        upsert(client, ("a@x.com", {}))
        assert slept == []  # no latency set: no delay
        fake.set_latency(0.2)
        upsert(client, ("a@x.com", {}))
        client.crm.properties.core_api.get_all("contacts")
    assert slept == [0.2, 0.2]


def test_concurrent_upserts_are_consistent(fake: FakeHubSpot) -> None:
    def work(n: int) -> None:
        client = HubSpot(access_token=fake.token, host=fake.url)
        for j in range(5):
            upsert(client, *[(f"c{k}@x.com", {"firstname": f"{n}-{j}"}) for k in range(10)])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    contacts = fake.contacts
    assert len(contacts) == 10
    assert len({c["hs_object_id"] for c in contacts.values()}) == 10
    assert fake.summary()["by_status"] == {"200": 30}


@pytest.mark.parametrize(("count_429s", "last_status"), [(False, 200), (True, 429)])
def test_whether_429s_count_in_the_window(count_429s: bool, last_status: int) -> None:
    now = [0.0]
    fake = FakeHubSpot(
        requests_per_window=2,
        window_seconds=10,
        clock=lambda: now[0],
        count_429_in_window=count_429s,
    )

    def status_at(moment: float) -> int:
        now[0] = moment
        (status, _, _), _ = fake.handle(
            "GET", "/crm/v3/properties/contacts", "Bearer test-token", b""
        )
        return status

    assert [status_at(t) for t in (0.0, 0.0, 5.0, 6.0)] == [200, 200, 429, 429]
    assert status_at(10.5) == last_status  # the two 200s have aged out; the 429s may not


def test_peak_in_window() -> None:
    assert peak_in_window([], 1.0) == 0
    assert peak_in_window([0.0, 0.5, 0.99, 1.0, 1.5], 1.0) == 3
    assert peak_in_window([3.0, 0.0, 1.0, 2.0], 1.0) == 1


# ------------------------------------------------------------------ properties and groups


def test_properties_and_groups(fake: FakeHubSpot, client: HubSpot) -> None:
    names = {p.name for p in client.crm.properties.core_api.get_all("contacts").results}
    assert {"email", "firstname", "lastname", "company", "hs_object_id"} <= names

    group = client.crm.properties.groups_api.create(
        "contacts", property_group_create=PropertyGroupCreate(name="instruqt", label="Instruqt")
    )
    assert group.name == "instruqt"
    with pytest.raises(PropertiesApiException) as dup_group:
        client.crm.properties.groups_api.create(
            "contacts", property_group_create=PropertyGroupCreate(name="instruqt", label="X")
        )
    assert dup_group.value.status == 409

    made = create_property(client, "instruqt_last_track", group="instruqt")
    assert (made.name, made.group_name, made.type) == ("instruqt_last_track", "instruqt", "string")
    assert client.crm.properties.core_api.get_by_name("contacts", "instruqt_last_track").label
    with pytest.raises(PropertiesApiException) as dup:
        create_property(client, "instruqt_last_track", group="instruqt")
    assert dup.value.status == 409
    assert "already exists" in error_json(dup.value)["message"]

    with pytest.raises(PropertiesApiException) as no_group:
        create_property(client, "x_prop", group="nope")
    assert no_group.value.status == 400 and "nope" in error_json(no_group.value)["message"]
    with pytest.raises(PropertiesApiException) as mismatch:
        create_property(client, "y_prop", "number", "text")
    assert mismatch.value.status == 400
    with pytest.raises(PropertyNotFound):
        client.crm.properties.core_api.get_by_name("contacts", "missing_prop")

    upsert(client, ("a@x.com", {"instruqt_last_track": "intro"}))
    assert fake.contacts["a@x.com"]["instruqt_last_track"] == "intro"
    fake.reset()
    assert "instruqt_last_track" not in fake.properties and "instruqt" not in fake.groups


# ------------------------------------------------------------------ subprocess mode


def raw_request(
    base: str, path: str, method: str = "GET", body: Any = None, token: str | None = "test-token"
) -> tuple[int, Any, dict[str, str]]:
    """One plain urllib request: (status, parsed JSON, headers)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def test_runs_as_a_process_with_control_endpoints() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.hubspot",
            "--port",
            "0",
            "--rate",
            "2",
            "--window",
            "10",
            "--token",
            "T",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        upsert_body = {
            "inputs": [{"idProperty": "email", "id": "p@x.com", "properties": {"firstname": "P"}}]
        }
        path = "/crm/v3/objects/contacts/batch/upsert"
        assert raw_request(url, path, "POST", upsert_body, token="T")[0] == 200
        assert raw_request(url, "/_fake/errors", "POST", {"status": 500, "count": 1})[0] == 200
        assert raw_request(url, path, "POST", upsert_body, token="T")[0] == 500
        status, body, _ = raw_request(url, path, "POST", upsert_body, token="T")
        assert status == 429 and body["policyName"] == "TEN_SECONDLY_ROLLING"

        summary = raw_request(url, "/_fake/requests")[1]
        assert summary["total"] == 3 and summary["count_429"] == 1
        assert summary["by_status"] == {"200": 1, "429": 1, "500": 1}
        assert summary["max_in_window"] == 3 and summary["max_admitted_in_window"] == 2
        assert raw_request(url, "/_fake/contacts")[1]["contacts"]["p@x.com"]["firstname"] == "P"

        assert raw_request(url, "/_fake/rate_limit", "POST", {"requests_per_window": 50})[0] == 200
        assert raw_request(url, "/_fake/latency", "POST", {"seconds": 0.01})[0] == 200
        assert raw_request(url, "/_fake/reset", "POST", {})[0] == 200
        assert raw_request(url, "/_fake/requests")[1]["total"] == 0
        assert raw_request(url, "/_fake/contacts")[1]["contacts"] == {}
    finally:
        process.terminate()
        assert process.wait(timeout=5) == 0
