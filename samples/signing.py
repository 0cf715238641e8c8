"""Build Svix-signed deliveries for tests, with the svix library's own signer."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from svix.webhooks import Webhook

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_" + "c2Vjb25kLXNlY3JldC1mb3ItdGVzdHM="


def signed(
    body: dict[str, Any] | bytes | str,
    secret: str = SECRET,
    msg_id: str | None = None,
    timestamp: float | None = None,
    prefix: str = "svix",
) -> tuple[bytes, dict[str, str]]:
    """The raw body and the headers Svix would send for it."""
    if isinstance(body, dict):
        raw = json.dumps(body).encode()
    elif isinstance(body, str):
        raw = body.encode()
    else:
        raw = body
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    stamp = time.time() if timestamp is None else timestamp
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(stamp, tz=UTC), raw.decode())
    headers = {
        f"{prefix}-id": msg_id,
        f"{prefix}-timestamp": str(int(stamp)),
        f"{prefix}-signature": signature,
        "Content-Type": "application/json",
    }
    return raw, headers


def post_signed(client: Any, pairs: Iterable[tuple[str, dict[str, Any]]]) -> list[int]:
    """POST each (svix id, body) to a Flask test client's receiver, signed; the status codes."""
    codes = []
    for msg_id, body in pairs:
        raw, headers = signed(body, msg_id=msg_id)
        codes.append(client.post("/webhooks/instruqt", data=raw, headers=headers).status_code)
    return codes


def track_event(user_id: str = "user-1", **extra: Any) -> dict[str, Any]:
    """A track.challenge_attempted body as Instruqt's webhook documentation shows it."""
    body: dict[str, Any] = {
        "challenge_id": "dxhrbpuvvia9",
        "completed": True,
        "invite_id": None,
        "organization_id": "instruqt",
        "participant_id": "tncb0s7cdkyu",
        "timestamp": "2021-07-29T16:14:57.31297754Z",
        "track_id": "rzwlxtp92ted",
        "type": "track.challenge_attempted",
        "user_id": user_id,
    }
    body.update(extra)
    return body
