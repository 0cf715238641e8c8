"""The Instruqt GraphQL client against a fake endpoint (responses)."""

from __future__ import annotations

import json
import logging

import pytest
import requests
import responses
from responses import matchers

from instruqt_crm.config import DEFAULT_INSTRUQT_GRAPHQL_URL as DEFAULT_URL
from instruqt_crm.errors import PermanentError, RateLimited, RetryableError
from instruqt_crm.instruqt_api import (
    USER_QUERY,
    InstruqtClient,
    Profile,
    parse_retry_after,
    profile_from,
)

KEY = "iq-secret-key-123"
TEAM = "acme"
URL = "https://instruqt.test/graphql"
USER = "gOGhYjyoPJhINJFOugIgiL4pdzu2"


def user_body(email: str | None = " Ada@Example.COM ", name: str | None = "Ada") -> dict:
    return {"data": {"user": {"id": USER, "profile": {"email": email, "display_name": name}}}}


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(sleeps) -> InstruqtClient:
    return InstruqtClient(KEY, TEAM, url=URL, timeout=3.0, attempts=4, sleep=sleeps.append)


@pytest.fixture
def api():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@responses.activate
def test_default_url_is_instruqts():
    responses.post(DEFAULT_URL, json=user_body())
    assert InstruqtClient(KEY, TEAM).lookup_email(USER) == "ada@example.com"


def test_success_returns_normalised_email(api, client):
    api.post(URL, json=user_body())
    assert client.lookup_email(USER) == "ada@example.com"


def test_profile_has_email_and_display_name(api, client):
    api.post(URL, json=user_body(name=" Ada Lovelace "))
    found = Profile(USER, "ada@example.com", "Ada Lovelace", "Ada", "Lovelace", "profile")
    assert client.lookup_profile(USER) == found


def test_request_carries_bearer_key_query_and_variables(api, client):
    api.post(
        URL,
        json=user_body(),
        match=[
            matchers.header_matcher({"Authorization": f"Bearer {KEY}"}),
            matchers.json_params_matcher(
                {"query": USER_QUERY, "variables": {"userID": USER, "teamSlug": TEAM}}
            ),
        ],
    )
    assert client.lookup_email(USER) == "ada@example.com"
    assert len(api.calls) == 1


def test_every_request_has_the_timeout(client):
    seen = {}

    class Recorder(requests.Session):
        def post(self, url, **kwargs):
            seen.update(kwargs)
            raise requests.exceptions.ConnectionError("offline")

    client.session = Recorder()
    client.attempts = 1
    with pytest.raises(RetryableError):
        client.lookup_email(USER)
    assert seen["timeout"] == 3.0


def test_null_user_is_none(api, client):
    api.post(URL, json={"data": {"user": None}})
    assert client.lookup_email(USER) is None
    assert client.lookup_profile(USER) is None


def test_user_without_email_is_none(api, client):
    api.post(URL, json=user_body(email=None, name="anon-42"))
    assert client.lookup_email(USER) is None
    assert client.lookup_profile(USER) == Profile(USER, None, "anon-42", None, "anon-42")


def test_user_with_blank_email_or_no_profile_is_none(api, client):
    api.post(URL, json=user_body(email="   "))
    api.post(URL, json={"data": {"user": {"id": USER, "profile": None}}})
    assert client.lookup_email(USER) is None
    assert client.lookup_email(USER) is None


def test_empty_user_id_makes_no_request(api, client):
    assert client.lookup_email("") is None
    assert client.lookup_email("  ") is None
    assert len(api.calls) == 0


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_is_permanent_and_never_leaks_the_key(api, client, sleeps, status, caplog):
    api.post(URL, status=status, json={"errors": [{"message": f"bad token {KEY}"}]})
    with caplog.at_level(logging.DEBUG), pytest.raises(PermanentError) as info:
        client.lookup_email(USER)
    assert info.value.category == "auth"
    assert "INSTRUQT_API_KEY" in info.value.reason
    assert KEY not in info.value.reason
    assert KEY not in caplog.text
    assert KEY not in repr(client)
    assert len(api.calls) == 1
    assert sleeps == []


def test_429_then_success_honours_retry_after(api, client, sleeps):
    api.post(URL, status=429, headers={"Retry-After": "3"})
    api.post(URL, json=user_body())
    assert client.lookup_email(USER) == "ada@example.com"
    assert sleeps == [3.0]


def test_429_without_retry_after_uses_a_default_hint(api, client, sleeps):
    api.post(URL, status=429)
    api.post(URL, json=user_body())
    assert client.lookup_email(USER) == "ada@example.com"
    assert len(sleeps) == 1 and sleeps[0] > 0


def test_429_with_a_long_retry_after_is_raised_at_once(api, client, sleeps):
    api.post(URL, status=429, headers={"Retry-After": "600"})
    with pytest.raises(RateLimited) as info:
        client.lookup_email(USER)
    assert info.value.wait == 600.0
    assert sleeps == []


def test_500_twice_then_success(api, client, sleeps):
    api.post(URL, status=500, body="oops")
    api.post(URL, status=502, body="<html>bad gateway</html>")
    api.post(URL, json=user_body())
    assert client.lookup_email(USER) == "ada@example.com"
    assert len(api.calls) == 3
    assert len(sleeps) == 2


def test_timeout_is_retried(api, client, sleeps):
    api.post(URL, body=requests.exceptions.ConnectTimeout("slow"))
    api.post(URL, body=requests.exceptions.ReadTimeout("slower"))
    api.post(URL, json=user_body())
    assert client.lookup_email(USER) == "ada@example.com"
    assert len(sleeps) == 2


def test_exhausting_retries_raises_retryable(api, client, sleeps):
    api.post(URL, body=requests.exceptions.ConnectionError("connection reset"))
    with pytest.raises(RetryableError) as info:
        client.lookup_email(USER)
    assert not isinstance(info.value, RateLimited)
    assert isinstance(info.value.__cause__, requests.exceptions.ConnectionError)
    assert len(api.calls) == 4
    assert len(sleeps) == 3


def test_bad_url_is_a_config_error(sleeps):
    client = InstruqtClient(KEY, TEAM, url="not a url", sleep=sleeps.append)
    with pytest.raises(PermanentError) as info:
        client.lookup_email(USER)
    assert info.value.category == "config"
    assert sleeps == []


@pytest.mark.parametrize(
    "message",
    ["user not found", "User does not exist", "record not_found", "no such user"],
)
def test_graphql_not_found_is_none(api, client, message):
    api.post(URL, json={"data": {"user": None}, "errors": [{"message": message}]})
    assert client.lookup_email(USER) is None


def test_graphql_not_found_code_is_none(api, client):
    error = {"message": "lookup failed", "extensions": {"code": "NOT_FOUND"}}
    api.post(URL, json={"data": None, "errors": [error]})
    assert client.lookup_email(USER) is None


def test_other_graphql_errors_are_permanent_with_the_message(api, client, sleeps):
    error = {"message": 'Cannot query field "emial" on type "Profile"'}
    api.post(URL, status=400, json={"errors": [error]})
    with pytest.raises(PermanentError) as info:
        client.lookup_email(USER)
    assert 'Cannot query field "emial"' in info.value.reason
    assert info.value.category == "config"  # the query itself: not this user's
    assert sleeps == []


def test_a_refused_request_is_config_even_if_it_says_not_found(api, client, sleeps):
    """A 4xx is about the request (a wrong URL path, say), never an unknown user."""
    api.post(URL, status=404, json={"errors": [{"message": "Not Found"}]})
    with pytest.raises(PermanentError) as info:
        client.lookup_email(USER)
    assert info.value.category == "config"
    assert sleeps == []


def test_an_error_about_one_users_data_is_that_users(api, client):
    error = {"message": "resolver failed", "path": ["user", "profile"]}
    api.post(URL, json={"data": None, "errors": [error]})
    with pytest.raises(PermanentError) as info:
        client.lookup_email(USER)
    assert info.value.category == "instruqt_api"


def test_graphql_permission_error_is_auth(api, client):
    api.post(URL, json={"data": {"user": None}, "errors": [{"message": "unauthorized"}]})
    with pytest.raises(PermanentError) as info:
        client.lookup_email(USER)
    assert info.value.category == "auth"


def test_graphql_internal_error_is_retried(api, client, sleeps):
    api.post(URL, json={"data": None, "errors": [{"message": "internal server error"}]})
    api.post(URL, json=user_body())
    assert client.lookup_email(USER) == "ada@example.com"
    assert len(sleeps) == 1


def test_non_json_200_is_retryable(api, client):
    api.post(URL, body="<html>maintenance</html>", status=200)
    with pytest.raises(RetryableError):
        client.lookup_email(USER)
    assert len(api.calls) == 4


def test_email_never_logged_at_info(api, client, caplog):
    api.post(URL, json=user_body())
    with caplog.at_level(logging.INFO, logger="instruqt_crm"):
        client.lookup_email(USER)
    assert USER in caplog.text
    assert "ada@example.com" not in caplog.text.lower()
    assert KEY not in caplog.text


def test_request_body_is_the_documented_query(api, client):
    api.post(URL, json=user_body())
    client.lookup_email(USER)
    sent = json.loads(api.calls[0].request.body)
    assert sent["query"].startswith("query ($userID: String!, $teamSlug: String!)")
    assert "details(teamSlug: $teamSlug) { email firstName lastName }" in sent["query"]
    assert "profile { email display_name }" in sent["query"]


def details_body(details: dict | None, email: str | None = "home@example.com") -> dict:
    user = {"id": USER, "details": details, "profile": {"email": email, "display_name": "Ada L"}}
    return {"data": {"user": user}}


def test_the_teams_details_come_first(api, client):
    details = {"email": " Ada@ACME.io ", "firstName": "Ada", "lastName": "Lovelace"}
    api.post(URL, json=details_body(details))
    found = Profile(USER, "ada@acme.io", "Ada L", "Ada", "Lovelace", "details")
    assert client.lookup_profile(USER) == found


def test_details_without_an_email_fall_back_to_the_profile(api, client):
    api.post(URL, json=details_body({"email": None, "firstName": "Ada", "lastName": None}))
    found = client.lookup_profile(USER)
    assert (found.email, found.email_from, found.first_name) == (
        "home@example.com",
        "profile",
        "Ada",
    )


def test_a_partial_answer_with_an_error_on_details_uses_the_profile(api, client):
    """How Instruqt answers for a user who never claimed the team's invite is undocumented:
    null details with an error beside the data is read like no details."""
    body = details_body(None)
    body["errors"] = [{"message": "no details for this team", "path": ["user", "details"]}]
    api.post(URL, json=body)
    assert client.lookup_email(USER) == "home@example.com"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5", 5.0), ("0.5", 0.5), ("-3", 0.0), ("", None), (None, None), ("soon", None)],
)
def test_parse_retry_after_seconds(value, expected):
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0


def test_a_name_that_is_not_valid_text_is_left_out_and_the_email_kept() -> None:
    """A lone surrogate in a name Instruqt gives would fail the cache write, and with it the
    learner's whole batch: the name is dropped, the email used."""
    user = {
        "id": "u1",
        "details": {"email": "ada@acme.co", "firstName": "Bad \ud800", "lastName": "Lovelace"},
        "profile": {"email": None, "display_name": "\udfff"},
    }
    found = profile_from("u1", user)
    assert found is not None and found.email == "ada@acme.co"
    assert found.first_name is None and found.last_name == "Lovelace"
    assert found.display_name is None
