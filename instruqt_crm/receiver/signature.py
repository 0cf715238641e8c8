"""Svix webhook verification: raw body first, several secrets during rotation, one error type."""

from __future__ import annotations

import binascii
import functools
import math
import time
from collections.abc import Mapping, Sequence

from pydantic import SecretStr
from standardwebhooks.webhooks import EmptyWebhookSecretError
from svix.webhooks import Webhook, WebhookVerificationError

TOLERANCE_SECONDS = 5 * 60  # fixed by the svix library as well
HEADER_PREFIXES = ("svix-", "webhook-")
HEADER_PARTS = ("id", "timestamp", "signature")
SIGNATURE_HEADERS = tuple(prefix + part for prefix in HEADER_PREFIXES for part in HEADER_PARTS)
# What svix's Webhook(secret) raises for a secret that is not base64 (binascii.Error is a
# ValueError) or decodes to nothing: such a secret matches no signature. Settings refuse both.
MALFORMED_SECRET = (ValueError, EmptyWebhookSecretError)


class SignatureError(Exception):
    """The request is not a genuine, fresh Svix delivery; ``reason`` is safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _headers_with(prefix: str, headers: Mapping[str, str]) -> dict[str, str] | None:
    """The id/timestamp/signature triple under one prefix, or None if any is missing."""
    found = {part: headers.get(f"{prefix}{part}", "").strip() for part in HEADER_PARTS}
    return found if all(found.values()) else None


def signature_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Pick the ``svix-*`` or ``webhook-*`` triple; raise SignatureError if neither is whole."""
    lowered = {key.lower(): value for key, value in headers.items()}
    for prefix in HEADER_PREFIXES:
        found = _headers_with(prefix, lowered)
        if found is not None:
            return found
    raise SignatureError("missing signature headers (svix-id, svix-timestamp, svix-signature)")


def _check_timestamp(text: str, now: float) -> None:
    """Refuse a timestamp that is not an integer or lies outside the tolerance window."""
    try:
        stamp = float(text)
    except ValueError:
        raise SignatureError("malformed timestamp header") from None
    if not math.isfinite(stamp):
        raise SignatureError("malformed timestamp header")
    if abs(now - stamp) > TOLERANCE_SECONDS:
        raise SignatureError("timestamp outside the allowed window (±5 minutes)")


def _signature_entries(text: str) -> str:
    """The ``vN,<base64>`` entries of a signature header, joined by single spaces; refuse any
    other form (standardwebhooks 1.1, which svix 2.0 allows, raises ValueError on extra commas
    or spaces instead of its verification error)."""
    entries = text.split()
    for entry in entries:
        version, sep, value = entry.partition(",")
        if not sep or not version or not value or "," in value:
            raise SignatureError("malformed signature header")
        try:
            binascii.a2b_base64(value.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError):
            raise SignatureError("malformed signature header") from None
    return " ".join(entries)


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[SecretStr],
    now: float | None = None,
) -> str:
    """Verify a delivery against the raw body; return its message id or raise SignatureError.

    Only the signature is checked here, never the body's content: svix 2's ``verify`` does not
    parse it (it passes ``json_parse=False``), so a signed body that is not JSON verifies and
    the receiver answers it 400 (tests/test_signature.py holds the installed svix to that).
    Only svix's verification error means "does not match"; anything else it raises is a bug
    and propagates rather than turning into a 401.
    """
    triple = signature_headers(headers)
    _check_timestamp(triple["timestamp"], time.time() if now is None else now)
    signature = _signature_entries(triple["signature"])
    try:
        text = body.decode("utf-8")  # verified as its UTF-8 encoding: exactly these bytes
    except UnicodeDecodeError:
        raise SignatureError("body is not UTF-8, so its signature cannot match") from None
    svix_headers = {
        "svix-id": triple["id"],
        "svix-timestamp": triple["timestamp"],
        "svix-signature": signature,
    }
    for secret in secrets:
        webhook = _webhook(secret.get_secret_value())
        if webhook is None:
            continue
        try:
            webhook.verify(text, svix_headers)
        except WebhookVerificationError:
            continue
        return triple["id"]
    raise SignatureError("signature does not match")


@functools.lru_cache(maxsize=16)  # the configured secrets: decoded once, not per delivery
def _webhook(secret: str) -> Webhook | None:
    """svix's verifier for one secret, or None for a secret that can match nothing."""
    try:
        return Webhook(secret)
    except MALFORMED_SECRET:
        return None
