"""Svix webhook verification: raw body first, several secrets during rotation, one error type."""

from __future__ import annotations

import binascii
import math
import time
from collections.abc import Mapping, Sequence

from pydantic import SecretStr
from svix.webhooks import Webhook, WebhookVerificationError

TOLERANCE_SECONDS = 5 * 60  # fixed by the svix library as well
HEADER_PREFIXES = ("svix-", "webhook-")


class SignatureError(Exception):
    """The request is not a genuine, fresh Svix delivery; ``reason`` is safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _headers_with(prefix: str, headers: Mapping[str, str]) -> dict[str, str] | None:
    """The id/timestamp/signature triple under one prefix, or None if any is missing."""
    found = {
        part: headers.get(f"{prefix}{part}", "").strip()
        for part in ("id", "timestamp", "signature")
    }
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


def _check_signature_format(text: str) -> None:
    """Refuse a signature header that is not space-separated ``vN,<base64>`` entries."""
    for entry in text.split():
        version, sep, value = entry.partition(",")
        if not sep or not version or not value:
            raise SignatureError("malformed signature header")
        try:
            binascii.a2b_base64(value.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError):
            raise SignatureError("malformed signature header") from None


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[SecretStr],
    now: float | None = None,
) -> str:
    """Verify a delivery against the raw body; return its message id or raise SignatureError."""
    triple = signature_headers(headers)
    _check_timestamp(triple["timestamp"], time.time() if now is None else now)
    _check_signature_format(triple["signature"])
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureError("body is not UTF-8, so its signature cannot match") from None
    svix_headers = {f"svix-{part}": value for part, value in triple.items()}
    for secret in secrets:
        try:
            Webhook(secret.get_secret_value()).verify(text, svix_headers)
        except (WebhookVerificationError, ValueError, binascii.Error):
            continue
        return triple["id"]
    raise SignatureError("signature does not match")
