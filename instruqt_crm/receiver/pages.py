"""Operator pages: the RQ dashboard at /rq and the status page behind HTTP basic auth, and /metrics.

No dashboard credentials configured → /rq and /status are not mounted (never open by default).
Requests that change something there (any method but GET and HEAD) must come from the
pages themselves (same Origin, or Referer). /metrics is open unless METRICS_TOKEN is set,
then it needs that bearer token. The dashboard itself: ``dashboard``; the status page and
the front page: ``status_page``.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

import redis
from flask import Flask, Response, current_app, jsonify, request
from pydantic import SecretStr

from instruqt_crm.config import Settings
from instruqt_crm.ops import metrics

from . import status_page
from .dashboard import mount_dashboard

PROTECTED_PREFIXES = ("/rq", "/status")
SAFE_METHODS = ("GET", "HEAD")
DEFAULT_PORTS = {"http": 80, "https": 443}


def credentials_match(settings: Settings, username: str, password: str) -> bool:
    """Constant-time comparison of both parts (both always compared)."""
    if settings.dashboard_username is None or settings.dashboard_password is None:
        return False
    user_ok = hmac.compare_digest(username.encode(), settings.dashboard_username.encode())
    password_ok = hmac.compare_digest(
        password.encode(), settings.dashboard_password.get_secret_value().encode()
    )
    return user_ok & password_ok


def _challenge() -> Response:
    response = jsonify(status="unauthorized", reason="login required")
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Basic realm="instruqt-crm", charset="UTF-8"'
    return response


def require_login() -> Response | None:
    """Before each request: the protected pages need the dashboard credentials."""
    if not request.path.startswith(PROTECTED_PREFIXES):
        return None
    settings: Settings = current_app.extensions["instruqt_crm"]["settings"]
    if settings.dashboard_username is None:
        response = jsonify(
            status="disabled",
            reason="set RQ_DASHBOARD_USERNAME and "
            "RQ_DASHBOARD_PASSWORD to enable the dashboard and status pages",
        )
        response.status_code = 404
        return response
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return _challenge()
    if not credentials_match(settings, auth.username or "", auth.password or ""):
        return _challenge()
    return None


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of a URL, the default port filled in; None when it has none."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not scheme or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS.get(scheme)


def own_origin() -> tuple[str, str, int | None] | None:
    """Where this request was sent: its Host, with the scheme the client used (the
    X-Forwarded-Proto of the router in front, as on Heroku, else the connection's)."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
    return _origin(f"{forwarded or request.scheme}://{request.host}")


def require_same_origin() -> Response | None:
    """Before each request: a request to the protected pages that can change something
    comes from those pages, as its Origin (without one, its Referer) shows; 403 otherwise."""
    if request.method in SAFE_METHODS or not request.path.startswith(PROTECTED_PREFIXES):
        return None
    origin = request.headers.get("Origin")
    claimed = origin if origin is not None else request.headers.get("Referer")
    sender = _origin(claimed) if claimed is not None else None
    if sender is not None and sender == own_origin():
        return None
    response = jsonify(
        status="forbidden",
        reason="cross-origin request refused: send it from this site's own pages "
        "(its Origin or Referer must be this host)",
    )
    response.status_code = 403
    return response


def bearer_refusal(token: SecretStr | None) -> Response | None:
    """With ``token`` set, a 401 unless the request carries it as its bearer token (compared
    in constant time); None when it may pass."""
    if token is None:
        return None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        reason, challenge = "bearer token required (METRICS_TOKEN is set)", ""
    elif hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        return None
    else:
        reason, challenge = "wrong bearer token", ', error="invalid_token"'
    response = jsonify(status="unauthorized", reason=reason)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = f'Bearer realm="instruqt-crm metrics"{challenge}'
    return response


def protect() -> Response | None:
    """Before each request: the protected pages need the login, then (for a request that can
    change something) the same origin, 401 before 403; every other path passes at once."""
    if not request.path.startswith(PROTECTED_PREFIXES):
        return None
    refused = require_login()
    return refused if refused is not None else require_same_origin()


def metrics_view() -> Response:
    """Prometheus text format; with METRICS_TOKEN set, for its bearer only."""
    settings: Settings = current_app.extensions["instruqt_crm"]["settings"]
    refused = bearer_refusal(settings.metrics_token)
    if refused is not None:
        return refused
    conn: redis.Redis = current_app.extensions["instruqt_crm"]["redis"]
    return Response(
        metrics.render(conn, settings), mimetype="text/plain; version=0.0.4; charset=utf-8"
    )


def init_app(app: Flask) -> None:
    """Add / and /metrics, and the login-protected dashboard and status page when
    credentials are configured."""
    settings: Settings = app.extensions["instruqt_crm"]["settings"]
    conn: redis.Redis = app.extensions["instruqt_crm"]["redis"]
    app.add_url_rule("/metrics", view_func=metrics_view)
    app.before_request(protect)  # one hook: the webhook and the rest pay one path check
    if settings.dashboard_username is not None:
        mount_dashboard(app, conn)
    status_page.init_app(app, with_status=settings.dashboard_username is not None)
