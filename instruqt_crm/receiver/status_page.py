"""The status page at /status (behind the dashboard login) and the front page at /.

/status is HTML tables, no script: the pipeline's figures, the failures with their reasons
and a Requeue button each, the learners waiting for an email, the CRM's request budget and
daily use, Redis's memory and the mapping the workers run against the file's. Everything
shown is escaped (Jinja's autoescape), and the page forbids scripts, frames and foreign
forms (its Content-Security-Policy). A learner is searched by POST so that emails stay out
of URLs; Requeue is a POST too, which the same-origin check in ``pages`` guards, and it
calls what ``instruqt-crm failed requeue ID`` calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, Response, current_app, redirect, render_template, request, url_for
from rq.job import JOB_ID_PATTERN
from werkzeug.wrappers import Response as BaseResponse

from instruqt_crm.config import Settings
from instruqt_crm.crm import hubspot_daily
from instruqt_crm.engine import identity, requeue
from instruqt_crm.journal import failures, trail
from instruqt_crm.journal.failures import Kind
from instruqt_crm.ops import status

log = logging.getLogger(__name__)
FAILURES_SHOWN = 50
LEARNERS_SHOWN = 50
MAX_WHO = 200  # characters of a search kept
REQUEUEABLE = frozenset(kind for kind in Kind if kind not in (Kind.BODY, Kind.JOB))
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",  # it shows learners' emails
    "Referrer-Policy": "same-origin",  # its forms still send their Origin
    "X-Content-Type-Options": "nosniff",
}


@dataclass(frozen=True)
class Notice:
    """A line at the top of the page: what an action did (``ok``) or why not (``bad``)."""

    text: str
    level: str = "ok"


def _conn() -> redis.Redis:
    conn: redis.Redis = current_app.extensions["instruqt_crm"]["redis"]
    return conn


def _settings() -> Settings:
    settings: Settings = current_app.extensions["instruqt_crm"]["settings"]
    return settings


def page(body: str, code: int = 200) -> Response:
    """An HTML answer with the headers every page here carries."""
    response = Response(body, status=code, mimetype="text/html")
    response.headers.update(PAGE_HEADERS)
    return response


def render_status(notice: Notice | None = None, who: str = "") -> str:
    """The status page, read fresh; with ``who``, that learner's trail (and, for a user id,
    the events waiting for their email) too."""
    conn = _conn()
    figures = status.collect(conn, _settings())
    email = identity.email_of(conn, who) if who else None
    found = [trail.describe(entry) for entry in trail.entries(conn, email)] if email else []
    user_id = who if who and "@" not in who else None
    parked = identity.parked_events(conn, user_id) if user_id else []
    daily = figures["crm"].get("daily")
    resets = daily["resets_at"] if daily else None
    return render_template(
        "status.html",
        figures=figures,
        failures=failures.recent(conn, FAILURES_SHOWN),
        waiting=identity.waiting(conn, LEARNERS_SHOWN),
        requeueable=REQUEUEABLE,
        meaning=requeue.MEANING,
        daily_resets=hubspot_daily.ahead(resets, figures["at"]) if resets else None,
        notice=notice,
        who=who,
        trail=found,
        parked=parked,
        refresh=not who and notice is None,
        dashboard=url_for("rq_dashboard.queues_overview"),
    )


def status_view() -> Response:
    """The status page; with a POSTed ``who``, that learner's trail too (a ``who`` in the URL
    is ignored: emails stay out of URLs and access logs)."""
    who = (request.form.get("who") or "").strip()[:MAX_WHO] if request.method == "POST" else ""
    return page(render_status(_requeued_notice(), who))


def _requeued_notice() -> Notice | None:
    """The line saying a failure was requeued, after the redirect that follows a Requeue."""
    failure_id = request.args.get("requeued", "")
    kind = next((k for k in Kind if k.value == request.args.get("kind")), None)
    if kind is None or not JOB_ID_PATTERN.fullmatch(failure_id):
        return None
    return Notice(f"Failure {failure_id} requeued: {requeue.MEANING[kind]}.")


def requeue_view(failure_id: str) -> BaseResponse:
    """Requeue one failure as ``instruqt-crm failed requeue ID`` does, then show the page."""
    try:
        kind = requeue.requeue(_conn(), failure_id)
    except KeyError:
        why = f"No open failure {failure_id}: it was requeued or purged meanwhile."
        return page(render_status(Notice(why, "bad")), 404)
    except requeue.NotRequeueable as exc:
        return page(render_status(Notice(str(exc), "bad")), 409)
    log.info("failure %s (%s) requeued from the status page", failure_id, kind)
    target = url_for("status_page", requeued=failure_id, kind=kind.value)
    return redirect(target, code=303)  # a reload shows the page, never requeues again


def index_view() -> Response:
    """The front page: what runs here and where the operator pages are."""
    settings = _settings()
    enabled = settings.dashboard_username is not None
    return page(
        render_template(
            "index.html",
            pages_enabled=enabled,
            dashboard=url_for("rq_dashboard.queues_overview") if enabled else None,
            metrics_locked=settings.metrics_token is not None,
        )
    )


def ago(seconds: float | None) -> str:
    """A duration in the largest units that say it: ``42 s``, ``3 min``, ``2 h 5 min``."""
    if seconds is None:
        return "never"
    whole = int(seconds)
    if whole < 120:
        return f"{whole} s"
    if whole < 2 * 3600:
        return f"{whole // 60} min"
    if whole < 2 * 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def init_app(app: Flask, with_status: bool) -> None:
    """Add / and, ``with_status`` (dashboard credentials set), /status and its Requeue."""
    filters: dict[str, Any] = {"when": trail.when, "ago": ago}
    for name, function in filters.items():
        app.add_template_filter(function, name)
    app.add_url_rule("/", view_func=index_view)
    if with_status:
        app.add_url_rule(
            "/status", endpoint="status_page", view_func=status_view, methods=["GET", "POST"]
        )
        app.add_url_rule(
            "/status/failures/<failure_id>/requeue",
            endpoint="status_requeue",
            view_func=requeue_view,
            methods=["POST"],
        )
