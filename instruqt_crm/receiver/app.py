"""The Flask app: the signed-webhook receiver and health checks."""

from __future__ import annotations

import logging
import os
from typing import Any

import redis
from flask import Flask, Response, current_app, jsonify, request

from instruqt_crm.config import Settings
from instruqt_crm.engine.inbox import enqueue_event, remember_refused
from instruqt_crm.engine.memory import MemoryWatch, out_of_memory
from instruqt_crm.engine.queueing import connect, unreachable
from instruqt_crm.errors import Category
from instruqt_crm.events import EventError, decode_body
from instruqt_crm.journal import counters, failures
from instruqt_crm.logs import configure

from . import pages
from .signature import SignatureError, verify

log = logging.getLogger(__name__)
JSON_TYPES = ("application/json",)


def create_app(settings: Settings | None = None, conn: redis.Redis | None = None) -> Flask:
    """Build the web app; settings default to the environment, Redis to the settings."""
    settings = settings or Settings.from_env()
    settings.require_webhook_secrets()
    configure(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    conn = conn if conn is not None else connect(settings)
    app.extensions["instruqt_crm"] = {
        "settings": settings,
        "redis": conn,
        # Per-request counts, written together about once a second (under gunicorn by a
        # background thread too): a HINCRBY per request cost as much as keeping the event.
        "tally": counters.Tally(conn, background=served_by_gunicorn()),
        "memory": MemoryWatch(),  # reads INFO memory at most once a minute, on webhooks
    }
    app.add_url_rule("/webhooks/instruqt", view_func=receive_webhook, methods=["POST"])
    app.add_url_rule("/healthz", view_func=healthz)
    app.add_url_rule("/readyz", view_func=readyz)
    pages.init_app(app)
    return app


def served_by_gunicorn() -> bool:
    """Whether this process is a gunicorn worker (gunicorn sets SERVER_SOFTWARE for them)."""
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/")


def settings_of(app: Flask) -> Settings:
    """The app's settings."""
    settings: Settings = app.extensions["instruqt_crm"]["settings"]
    return settings


def redis_of(app: Flask) -> redis.Redis:
    """The app's Redis connection."""
    conn: redis.Redis = app.extensions["instruqt_crm"]["redis"]
    return conn


def reply(code: int, **fields: Any) -> tuple[Response, int]:
    """A small JSON answer with HTTP status ``code``, counted by outcome in the metrics."""
    outcome = str(fields.get("outcome") or fields.get("status") or code)
    fields.pop("outcome", None)
    if request.endpoint == "receive_webhook" and code != 503:
        tally: counters.Tally = current_app.extensions["instruqt_crm"]["tally"]
        tally.incr("webhook_requests", outcome)
    return jsonify(fields), code


def _is_json(content_type: str | None) -> bool:
    """Whether a Content-Type header names JSON (``application/json`` or ``+json``)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


def _read_body(limit: int) -> bytes | None:
    """The raw body, or None when it exceeds ``limit`` (read no further than limit + 1 bytes).

    Raises ``MalformedBody`` when the framing cannot be read (a broken chunked encoding).
    """
    try:
        if request.content_length is not None:
            return None if request.content_length > limit else request.get_data(cache=True)
        if not request.environ.get("wsgi.input_terminated"):
            return b""  # no length and no chunked framing: nothing can be read safely
        stream = request.environ["wsgi.input"]
        parts: list[bytes] = []
        size = 0
        while size <= limit:
            part = stream.read(limit + 1 - size)
            if not part:
                break
            parts.append(part)
            size += len(part)
    except Exception as exc:  # each server reports broken framing its own way
        raise MalformedBody(f"{type(exc).__name__}: {exc}") from exc
    return None if size > limit else b"".join(parts)


class MalformedBody(Exception):
    """The request body's framing could not be read."""


def receive_webhook() -> tuple[Response, int]:
    """Verify, dedupe and enqueue one Instruqt event."""
    settings = settings_of(current_app)
    if (request.content_length or 0) > settings.max_body_bytes:
        return reply(413, status="rejected", reason="body too large", outcome="too_large")
    if not _is_json(request.content_type):
        return reply(
            415,
            status="rejected",
            reason="content type must be application/json",
            outcome="unsupported_media_type",
        )
    try:
        body = _read_body(settings.max_body_bytes)
    except MalformedBody as exc:
        log.info("webhook rejected, body framing unreadable: %s", exc)
        return reply(400, status="rejected", reason="malformed body framing", outcome="malformed")
    if body is None:
        return reply(413, status="rejected", reason="body too large", outcome="too_large")
    try:
        message_id = verify(body, dict(request.headers), settings.webhook_secrets)
    except SignatureError as exc:
        log.info("webhook rejected: %s", exc.reason)
        return reply(401, status="rejected", reason=exc.reason, outcome="bad_signature")
    conn = redis_of(current_app)
    current_app.extensions["instruqt_crm"]["memory"].check(conn)  # warns as Redis fills up
    try:
        return _accept(conn, message_id, body, settings)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.error("event %s not queued, Redis unreachable: %s", message_id, unreachable(exc))
        return reply(503, status="unavailable", reason="queue unavailable, retry later")
    except redis.ResponseError as exc:
        if not out_of_memory(exc):
            raise
        log.error("event %s not queued, Redis is full (maxmemory): %s", message_id, exc)
        return reply(503, status="unavailable", reason="queue full, retry later")


def _accept(
    conn: redis.Redis, message_id: str, body: bytes, settings: Settings
) -> tuple[Response, int]:
    """Read a verified body; refuse it if a later stage could not (400, kept as a failure
    once per message id), else enqueue it once (202/200)."""
    try:
        event_type = decode_body(body)["type"]
    except EventError as exc:
        reason = str(exc)
        if remember_refused(conn, message_id, settings.dedupe_ttl_seconds):
            failure = failures.record(
                conn, failures.Kind.BODY, Category.INVALID_BODY, reason, message_id, body
            )
            log.warning("event %s kept as failure %s: %s", message_id, failure.id, reason)
        return reply(400, status="invalid", reason=reason, id=message_id)
    if not enqueue_event(conn, message_id, body, settings.dedupe_ttl_seconds):
        log.info("event %s (%s) is a duplicate delivery", message_id, event_type)
        return reply(200, status="duplicate", id=message_id)
    log.info("event %s (%s) queued", message_id, event_type)
    return reply(202, status="queued", id=message_id)


def healthz() -> tuple[Response, int]:
    """The process is up."""
    return reply(200, status="ok")


def readyz() -> tuple[Response, int]:
    """Redis answers."""
    try:
        redis_of(current_app).ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("not ready, Redis unreachable: %s", unreachable(exc))
        return reply(503, status="unavailable", reason="redis unreachable")
    return reply(200, status="ready")
