"""HubSpot's failures as the engine's errors (``instruqt_crm.errors``), at the adapter boundary.

429 → ``RateLimited`` (wait per ``policyName``), 5xx/423/connection trouble →
``RetryableError``, 401/403 → ``PermanentError`` naming the token or scope, 409 → a
``CONFLICT`` and other 4xx → a ``VALIDATION`` ``PermanentError``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import urllib3

from instruqt_crm.errors import Category, PermanentError, RateLimited, RetryableError

from .hubspot_daily import next_utc_midnight


def _body(exc: Any) -> dict[str, Any]:
    """The JSON body of an SDK exception ({} if none)."""
    try:
        parsed = json.loads(getattr(exc, "body", None) or "{}")
    except (TypeError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _header(exc: Any, name: str) -> str | None:
    headers = getattr(exc, "headers", None) or {}
    return headers.get(name) if hasattr(headers, "get") else None


def rate_limit_wait(body: dict[str, Any], headers_interval_ms: str | None) -> tuple[float, str]:
    """How long to hold off after a 429, from HubSpot's ``policyName``."""
    policy = str(body.get("policyName") or "TEN_SECONDLY_ROLLING")
    if policy == "DAILY":  # the adapter reads the real reset (resetsAt) when it can
        now = time.time()
        return next_utc_midnight(now) - now, policy
    if policy == "SECONDLY":
        return 1.0, policy
    interval = float(headers_interval_ms) / 1000 if headers_interval_ms else 10.0
    return interval, policy


def convert(exc: Exception, what: str) -> Exception:
    """The engine error for an SDK or transport failure during ``what``."""
    status = getattr(exc, "status", None)
    if isinstance(exc, urllib3.exceptions.HTTPError) or status in (None, 0):
        return RetryableError(f"HubSpot {what}: connection problem ({type(exc).__name__})")
    body = _body(exc)
    message = str(body.get("message") or getattr(exc, "reason", "") or "")[:500]
    if status == 429:
        wait, policy = rate_limit_wait(
            body, _header(exc, "X-HubSpot-RateLimit-Interval-Milliseconds")
        )
        return RateLimited(f"HubSpot {what}: rate limited ({policy})", wait, policy)
    if status == 401:
        return PermanentError(
            f"HubSpot {what}: 401 {body.get('category', 'INVALID_AUTHENTICATION')}: the token "
            "in HUBSPOT_ACCESS_TOKEN is wrong, expired or revoked (copy the private app's "
            "access token)",
            Category.AUTH,
        )
    if status == 403:
        scopes = _scopes(body)
        return PermanentError(
            f"HubSpot {what}: 403 {body.get('category', 'MISSING_SCOPES')}: the private app lacks "
            f"scope(s) {scopes or 'needed for this call'}; add them in the app's settings",
            Category.AUTH,
        )
    if status == 409:
        return PermanentError(f"HubSpot {what}: 409 {message}", Category.CONFLICT)
    if status == 423:
        return RetryableError(f"HubSpot {what}: 423 locked, retrying", wait=2.0)
    if int(status) >= 500:
        return RetryableError(f"HubSpot {what}: {status} server error")
    return PermanentError(f"HubSpot {what}: {status} {message}", Category.VALIDATION)


def _scopes(body: dict[str, Any]) -> str:
    """Required scopes named in a 403 body."""
    found: list[str] = []
    for error in body.get("errors") or []:
        context = error.get("context") or {} if isinstance(error, dict) else {}
        for key in ("requiredGranularScopes", "requiredScopes"):
            found += [str(s) for s in context.get(key) or []]
    return ", ".join(sorted(set(found)))
