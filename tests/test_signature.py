"""Svix verification: the known vector, rotation, both header families, every refusal."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest
import standardwebhooks.webhooks as std
from pydantic import SecretStr
from svix.webhooks import Webhook

from instruqt_crm.receiver import signature
from instruqt_crm.receiver.signature import SignatureError, verify
from samples.signing import OTHER_SECRET, SECRET, signed

VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIME = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.fixture
def frozen_at_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freeze the svix library's clock at the known vector's timestamp."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return datetime.fromtimestamp(VECTOR_TIME + 10, tz=tz or UTC)

    monkeypatch.setattr(std, "datetime", Frozen)


def vector_headers(signature: str = VECTOR_SIG) -> dict[str, str]:
    return {"svix-id": VECTOR_ID, "svix-timestamp": str(VECTOR_TIME), "svix-signature": signature}


def test_known_vector_verifies_with_frozen_time(frozen_at_vector: None) -> None:
    assert (
        verify(VECTOR_BODY, vector_headers(), [SecretStr(SECRET)], now=VECTOR_TIME + 10)
        == VECTOR_ID
    )


def test_known_vector_is_stale_today() -> None:
    with pytest.raises(SignatureError, match="outside the allowed window"):
        verify(VECTOR_BODY, vector_headers(), [SecretStr(SECRET)])


def test_known_vector_with_one_byte_changed_fails(frozen_at_vector: None) -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verify(b'{"test": 2432232315}', vector_headers(), [SecretStr(SECRET)], now=VECTOR_TIME)


def test_rotation_accepts_old_and_new_secret() -> None:
    secrets = [SecretStr(SECRET), SecretStr(OTHER_SECRET)]
    for secret in (SECRET, OTHER_SECRET):
        body, headers = signed({"type": "track.started"}, secret=secret)
        assert verify(body, headers, secrets) == headers["svix-id"]


def test_signature_header_with_several_entries_matches_any() -> None:
    body, headers = signed({"type": "track.started"})
    headers["svix-signature"] = (
        "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= " + headers["svix-signature"]
    )
    assert verify(body, headers, [SecretStr(SECRET)])


def test_webhook_prefixed_headers_are_accepted() -> None:
    body, headers = signed({"type": "track.started"}, prefix="webhook")
    assert verify(body, headers, [SecretStr(SECRET)]) == headers["webhook-id"]


@pytest.mark.parametrize("missing", ["svix-id", "svix-timestamp", "svix-signature"])
def test_missing_header(missing: str) -> None:
    body, headers = signed({"type": "x"})
    del headers[missing]
    with pytest.raises(SignatureError, match="missing signature headers"):
        verify(body, headers, [SecretStr(SECRET)])


@pytest.mark.parametrize(
    ("header", "value", "reason"),
    [
        ("svix-signature", "garbage", "malformed signature"),
        ("svix-signature", "v1,@@@not-base64@@@", "malformed signature"),
        ("svix-signature", "v1,", "malformed signature"),
        ("svix-timestamp", "yesterday", "malformed timestamp"),
        ("svix-timestamp", "nan", "malformed timestamp"),
        ("svix-timestamp", "1e400", "malformed timestamp"),
        ("svix-timestamp", "99999999999999999999", "outside the allowed window"),
        ("svix-timestamp", "-5", "outside the allowed window"),
    ],
)
def test_malformed_headers(header: str, value: str, reason: str) -> None:
    body, headers = signed({"type": "x"})
    headers[header] = value
    with pytest.raises(SignatureError, match=reason):
        verify(body, headers, [SecretStr(SECRET)])


@pytest.mark.parametrize("skew", [-301, 301, -3600])
def test_timestamp_outside_window(skew: int) -> None:
    import time

    body, headers = signed({"type": "x"}, timestamp=time.time() + skew)
    with pytest.raises(SignatureError, match="outside the allowed window"):
        verify(body, headers, [SecretStr(SECRET)])


def test_wrong_secret() -> None:
    body, headers = signed({"type": "x"}, secret=OTHER_SECRET)
    with pytest.raises(SignatureError, match="does not match"):
        verify(body, headers, [SecretStr(SECRET)])


def test_non_utf8_body() -> None:
    _, headers = signed({"type": "x"})
    with pytest.raises(SignatureError, match="not UTF-8"):
        verify(b"\xff\xfe{}", headers, [SecretStr(SECRET)])


def test_reason_never_contains_the_secret() -> None:
    body, headers = signed({"type": "x"}, secret=OTHER_SECRET)
    with pytest.raises(SignatureError) as caught:
        verify(body, headers, [SecretStr(SECRET)])
    assert SECRET not in str(caught.value) and SECRET[6:] not in str(caught.value)


def signed_bytes(body: bytes, secret: str = SECRET) -> dict[str, str]:
    """Svix's headers for any bytes, signed by hand (Svix's scheme: HMAC-SHA256 over
    ``id.timestamp.body``), so that even a body that is not UTF-8 carries a correct signature."""
    msg_id, stamp = "msg_handsigned", str(int(time.time()))
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "svix-id": msg_id,
        "svix-timestamp": stamp,
        "svix-signature": "v1," + base64.b64encode(mac).decode(),
        "Content-Type": "application/json",
    }


def test_hand_signing_agrees_with_the_library() -> None:
    headers = signed_bytes(b'{"type": "x"}')
    assert verify(b'{"type": "x"}', headers, [SecretStr(SECRET)]) == "msg_handsigned"


@pytest.mark.parametrize("raw", [b"not json", b"{", b"", "\u00e9t\u00e9".encode(), b"\x00"])
def test_signed_body_that_is_not_json_verifies(raw: bytes) -> None:
    """Only the signature is checked: the body's content is the receiver's business (400)."""
    body, headers = signed(raw)
    assert verify(body, headers, [SecretStr(SECRET)]) == headers["svix-id"]


def test_the_library_does_not_parse_the_body() -> None:
    """Holds the installed svix to what verify relies on: a signed non-JSON body verifies."""
    body, headers = signed(b"not json")
    assert Webhook(SECRET).verify(body.decode(), headers) is None


def test_signed_body_that_is_not_utf8_is_refused() -> None:
    raw = b"\xff\xfe{}\x80"
    headers = signed_bytes(raw)
    with pytest.raises(SignatureError, match="not UTF-8"):
        verify(raw, headers, [SecretStr(SECRET)])


@pytest.mark.parametrize("bad", ["whsec_", "whsec_====", "whsec_abcde", "whsec_\u00e9t\u00e9", ""])
def test_malformed_secret_matches_nothing(bad: str) -> None:
    body, headers = signed({"type": "x"})
    with pytest.raises(SignatureError, match="does not match"):
        verify(body, headers, [SecretStr(bad)])
    assert verify(body, headers, [SecretStr(bad), SecretStr(SECRET)]) == headers["svix-id"]


@pytest.mark.parametrize("value", ["v1,AAAA,AAAA", "v1,AAAA, v1,AAAA", ",AAAA"])
def test_signature_entry_with_extra_commas_is_malformed(value: str) -> None:
    body, headers = signed({"type": "x"})
    headers["svix-signature"] = value
    with pytest.raises(SignatureError, match="malformed signature"):
        verify(body, headers, [SecretStr(SECRET)])


def test_entries_separated_by_several_spaces_still_match() -> None:
    body, headers = signed({"type": "x"})
    headers["svix-signature"] = "v1,AAAA \t  " + headers["svix-signature"] + "  "
    assert verify(body, headers, [SecretStr(SECRET)]) == headers["svix-id"]


def test_other_library_errors_are_not_turned_into_a_mismatch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only svix's verification error means "does not match"; a bug elsewhere stays a bug."""

    def broken(self, data, headers):
        raise RuntimeError("bug")

    monkeypatch.setattr(Webhook, "verify", broken)
    body, headers = signed({"type": "x"})
    with pytest.raises(RuntimeError, match="bug"):
        verify(body, headers, [SecretStr(SECRET)])


def test_each_secret_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """svix's verifier per secret is made once and reused, a malformed secret's None too."""
    deliveries = [signed({"type": "x"}, msg_id=f"msg_once{number}") for number in range(3)]
    made: list[str] = []
    real_init = Webhook.__init__

    def counting(self, whsec: str) -> None:
        made.append(whsec)
        real_init(self, whsec)

    monkeypatch.setattr(Webhook, "__init__", counting)
    signature._webhook.cache_clear()
    secrets = [SecretStr("whsec_===="), SecretStr(OTHER_SECRET), SecretStr(SECRET)]
    try:
        for body, headers in deliveries:
            assert verify(body, headers, secrets) == headers["svix-id"]
    finally:
        signature._webhook.cache_clear()
    assert made == ["whsec_====", OTHER_SECRET, SECRET]
