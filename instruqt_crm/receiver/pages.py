"""Operator pages: the RQ dashboard at /rq and the status page behind HTTP basic auth, and /metrics.

No dashboard credentials configured → /rq and /status are not mounted (never open by default).
"""

from __future__ import annotations

import hmac

import redis
from flask import Flask, Response, current_app, jsonify, render_template_string, request, url_for
from redis.connection import SSLConnection

from instruqt_crm.config import Settings
from instruqt_crm.journal import trail
from instruqt_crm.ops import metrics, status

PROTECTED_PREFIXES = ("/rq", "/status")


def shown_url(conn: redis.Redis) -> str:
    """Where ``conn`` goes, as the dashboard shows it (never with the password)."""
    kwargs = conn.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={db}"
    scheme = (
        "rediss" if issubclass(conn.connection_pool.connection_class, SSLConnection) else "redis"
    )
    return f"{scheme}://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{db}"


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


STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>instruqt-crm status</title>
{% if not who %}<meta http-equiv="refresh" content="30">{% endif %}
<style>body{font:14px/1.4 system-ui,sans-serif;margin:2rem;max-width:70rem}
pre{background:#f6f8fa;padding:1rem;overflow-x:auto}input{font:inherit;width:24rem}</style>
</head><body>
<h1>instruqt-crm</h1>
<p><a href="{{ dashboard }}">RQ dashboard</a> · <a href="/metrics">metrics</a></p>
<pre>{% for line in lines %}{{ line }}
{% endfor %}</pre>
<h2>Trace a learner</h2>
<form method="get"><input name="who" value="{{ who }}" placeholder="email or Instruqt user id">
<button>Trace</button></form>
{% if who %}<h3>{{ who }}</h3>
{% if trail %}<pre>{% for line in trail %}{{ line }}
{% endfor %}</pre>{% else %}<p>Nothing known about this learner.</p>{% endif %}{% endif %}
</body></html>
"""


def status_view() -> str:
    """The status figures, and a learner's trail when one is searched for."""
    settings: Settings = current_app.extensions["instruqt_crm"]["settings"]
    conn: redis.Redis = current_app.extensions["instruqt_crm"]["redis"]
    who = (request.args.get("who") or "").strip()[:200]
    found = [trail.describe(entry) for entry in trail.entries(conn, who)] if who else []
    lines = status.render(status.collect(conn, settings))
    return render_template_string(
        STATUS_PAGE,
        lines=lines,
        who=who,
        trail=found,
        dashboard=url_for("rq_dashboard.queues_overview"),
    )


def metrics_view() -> Response:
    """Prometheus text format."""
    conn: redis.Redis = current_app.extensions["instruqt_crm"]["redis"]
    return Response(metrics.render(conn), mimetype="text/plain; version=0.0.4; charset=utf-8")


def mount_dashboard(app: Flask, conn: redis.Redis) -> None:
    """Register rq-dashboard at /rq, reading our queues with the JSON serializer."""
    import rq_dashboard
    from rq.serializers import JSONSerializer
    from rq_dashboard.web import config as dashboard_config

    app.config.from_object(rq_dashboard.default_settings)
    app.config["RQ_DASHBOARD_REDIS_URL"] = (shown_url(conn),)  # shown on its pages only
    dashboard_config.serializer = JSONSerializer
    app.redis_conn = conn  # type: ignore[attr-defined]  # where rq-dashboard looks for it
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")

    def use_the_apps_connection() -> Response | None:
        """In place of rq-dashboard's own hook, which builds a client from the URL on every
        request: its pages use the app's connection (its TLS settings, its pool), never a
        client a concurrent request could catch half set up. One Redis: instance 0 only."""
        if (request.view_args or {}).get("instance_number", 0) != 0:
            response = jsonify(status="not found", reason="one Redis instance: /rq/0/...")
            response.status_code = 404
            return response
        app.redis_conn = conn  # type: ignore[attr-defined]
        return None

    app.before_request_funcs[rq_dashboard.blueprint.name] = [use_the_apps_connection]


def init_app(app: Flask) -> None:
    """Add /metrics, and the login-protected dashboard when credentials are configured."""
    settings: Settings = app.extensions["instruqt_crm"]["settings"]
    conn: redis.Redis = app.extensions["instruqt_crm"]["redis"]
    app.add_url_rule("/metrics", view_func=metrics_view)
    app.before_request(require_login)
    if settings.dashboard_username is not None:
        mount_dashboard(app, conn)
        app.add_url_rule("/status", view_func=status_view)
