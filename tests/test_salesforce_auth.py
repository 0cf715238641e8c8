"""Salesforce login: each token flow, one refresh on 401, timeouts, no secrets in errors."""

from __future__ import annotations

import logging
from pathlib import Path

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from instruqt_crm.config import Settings
from instruqt_crm.crm.salesforce_auth import (
    TIMEOUT,
    Connection,
    Credentials,
    TimeoutSession,
    credentials_from,
    jwt_audience,
)
from instruqt_crm.errors import PermanentError, RetryableError
from samples.signing import SECRET
from tests.fakes.salesforce import URL, FakeSalesforce


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def client_credentials(secret: str = "s3cret") -> Credentials:
    return Credentials(login_url=URL, client_id="3MVG.client", client_secret=SecretStr(secret))


def query(sf) -> object:
    return sf.restful("query/", params={"q": "SELECT Id FROM Contact WHERE Email IN ('a@x.io')"})


def test_client_credentials_token_is_fetched_and_used() -> None:
    with FakeSalesforce() as fake:
        conn = Connection(client_credentials())
        conn.call("lookup", query)
        assert fake.grants[0]["grant_type"] == ["client_credentials"]
        assert fake.grants[0]["client_id"] == ["3MVG.client"]
        assert len(fake.tokens_issued) == 1
        assert conn.client().base_url.startswith(f"{URL}/services/data/v62.0/")


def test_jwt_bearer_signs_an_rs256_assertion(rsa_key: rsa.RSAPrivateKey) -> None:
    creds = Credentials(
        login_url=URL,
        client_id="3MVG.client",
        username="integration@acme.com",
        private_key=SecretStr(pem(rsa_key)),
    )
    with FakeSalesforce() as fake:
        Connection(creds).call("lookup", query)
        assertion = fake.grants[0]["assertion"][0]
    claims = jwt.decode(
        assertion,
        rsa_key.public_key(),
        algorithms=["RS256"],
        audience="https://login.salesforce.com",
    )
    assert claims["iss"] == "3MVG.client"
    assert claims["sub"] == "integration@acme.com"
    assert fake.grants[0]["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]


def test_jwt_audience_follows_the_login_host() -> None:
    assert jwt_audience("https://test.salesforce.com") == "https://test.salesforce.com"
    assert jwt_audience("https://acme--dev.sandbox.my.salesforce.com") == (
        "https://test.salesforce.com"
    )
    assert jwt_audience("https://acme.my.salesforce.com") == "https://login.salesforce.com"


def test_session_flow_uses_the_given_token_without_login() -> None:
    with FakeSalesforce() as fake:
        token = fake.issue_token()
        creds = Credentials(instance_url=URL, access_token=SecretStr(token))
        Connection(creds).call("lookup", query)
        assert fake.grants == []


def test_expired_token_is_refreshed_exactly_once() -> None:
    with FakeSalesforce() as fake:
        conn = Connection(client_credentials())
        conn.call("lookup", query)
        fake.valid_tokens.clear()  # the session expires
        conn.call("lookup", query)
        assert len(fake.tokens_issued) == 2
        assert [c.status for c in fake.calls] == [200, 401, 200]


def test_a_401_after_the_refresh_is_permanent_not_a_loop() -> None:
    with FakeSalesforce() as fake:
        conn = Connection(client_credentials())
        fake.valid_tokens.clear()
        original = fake.issue_token
        fake.issue_token = lambda: original() and "revoked"  # type: ignore[method-assign]
        with pytest.raises(PermanentError) as caught:
            conn.call("lookup", query)
        assert caught.value.category == "auth"
        assert len(fake.grants) == 2  # the first login and one refresh
        assert len(fake.calls) == 2


def test_session_flow_cannot_refresh_and_says_so() -> None:
    with FakeSalesforce():
        creds = Credentials(instance_url=URL, access_token=SecretStr("00Dstale!tok"))
        with pytest.raises(PermanentError, match="SALESFORCE_ACCESS_TOKEN expired"):
            Connection(creds).call("lookup", query)


def test_bad_client_secret_is_an_auth_error_without_the_secret(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeSalesforce(), pytest.raises(PermanentError) as caught:
        Connection(client_credentials("wrong-secret-value")).call("lookup", query)
    assert caught.value.category == "auth"
    assert "invalid_client" in caught.value.reason
    assert "wrong-secret-value" not in caught.value.reason
    assert "wrong-secret-value" not in caplog.text


def test_token_endpoint_down_is_retryable() -> None:
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, f"{URL}/services/oauth2/token", status=503)
        with pytest.raises(RetryableError):
            Connection(client_credentials()).call("lookup", query)


def test_timeouts_are_set_on_every_request() -> None:
    seen = []

    class Spy(TimeoutSession):
        def send(self, request, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(kwargs.get("timeout"))
            raise requests.ConnectTimeout("slow")

    with pytest.raises(RetryableError):
        Connection(client_credentials(), session=Spy()).call("lookup", query)
    creds = Credentials(instance_url=URL, access_token=SecretStr("tok"))
    with pytest.raises(RetryableError, match="connection problem"):
        Connection(creds, session=Spy()).call("lookup", query)
    assert seen == [TIMEOUT, TIMEOUT]


def test_settings_pick_the_flow(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    base = {"INSTRUQT_WEBHOOK_SECRET": SECRET}
    settings = Settings.from_env(base)
    assert settings.salesforce_login_url == "https://login.salesforce.com"
    assert settings.salesforce_api_version == "62.0"
    assert credentials_from(settings).flow == ""
    cc = {**base, "SALESFORCE_CLIENT_ID": "id", "SALESFORCE_CLIENT_SECRET": "sec"}
    assert credentials_from(Settings.from_env(cc)).flow == "client_credentials"
    key_file = tmp_path / "server.key"
    key_file.write_text(pem(rsa_key))
    jwt_env = {
        **base,
        "SALESFORCE_CLIENT_ID": "id",
        "SALESFORCE_USERNAME": "u@acme.com",
        "SALESFORCE_PRIVATE_KEY": str(key_file),
        "SALESFORCE_LOGIN_URL": "https://test.salesforce.com/",
    }
    settings = Settings.from_env(jwt_env)
    assert credentials_from(settings).flow == "jwt"
    assert settings.salesforce_login_url == "https://test.salesforce.com"
    escaped = pem(rsa_key).replace("\n", "\\n")
    inline = Settings.from_env({**jwt_env, "SALESFORCE_PRIVATE_KEY": escaped})
    assert inline.salesforce_private_key == SecretStr(pem(rsa_key))
    session = {**base, "SALESFORCE_INSTANCE_URL": URL, "SALESFORCE_ACCESS_TOKEN": "tok"}
    assert credentials_from(Settings.from_env(session)).flow == "session"
