"""The Flask app: the signed-webhook receiver and health checks.

Webhook deliveries are served in front of Flask (``WebhookFastPath``): a POST to the
webhook path is answered from the WSGI environ alone, without Flask's per-request contexts,
routing, hooks and signals, nor werkzeug's request and response objects, which cost a
gunicorn worker ~250 us of CPU per delivery (bench/README.md, "Receiver throughput"). The
route is registered with Flask too (``url_for``, 405 for other methods) and answers alike.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import redis
from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_content_length, get_input_stream

from instruqt_crm.config import Settings
from instruqt_crm.engine.inbox import enqueue_event, remember_refused
from instruqt_crm.engine.memory import MemoryWatch, out_of_memory
from instruqt_crm.engine.queueing import connect, unreachable
from instruqt_crm.errors import Category
from instruqt_crm.events import EventError, decode_body
from instruqt_crm.journal import counters, failures
from instruqt_crm.logs import configure

from . import pages
from .delivery_redis import DeliveryConnection
from .signature import SIGNATURE_HEADERS, SignatureError, verify

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)
WEBHOOK_PATH = "/webhooks/instruqt"
JSON_TYPES = ("application/json",)
# What jsonify writes (compact, sorted keys, ASCII), without its per-call set-up.
_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
Answer = tuple[int, dict[str, Any]]  # HTTP status and the JSON answer's fields
SIGNATURE_ENVIRON = tuple(
    (name, "HTTP_" + name.upper().replace("-", "_")) for name in SIGNATURE_HEADERS
)


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
        "delivery_redis": DeliveryConnection(conn),
    }
    app.add_url_rule(WEBHOOK_PATH, view_func=receive_webhook, methods=["POST"])
    app.add_url_rule("/healthz", view_func=healthz)
    app.add_url_rule("/readyz", view_func=readyz)
    pages.init_app(app)
    fast_path = WebhookFastPath(app.wsgi_app, app.extensions["instruqt_crm"])
    app.wsgi_app = fast_path  # type: ignore[method-assign]  # Flask's way to add WSGI middleware
    if served_by_gunicorn():
        freeze_startup_objects()
    return app


def served_by_gunicorn() -> bool:
    """Whether this process is a gunicorn worker (gunicorn sets SERVER_SOFTWARE for them)."""
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/")


def freeze_startup_objects() -> None:
    """Keep the objects start-up made (~117k: modules, classes, svix's models) out of every
    later garbage collection: a full collection over them stalled a worker for 90-330 ms
    now and then, mid-request; after ``gc.freeze`` one takes well under a millisecond."""
    gc.collect()  # what start-up left as garbage goes now, not into the frozen set
    gc.freeze()


def redis_of(app: Flask) -> redis.Redis:
    """The app's Redis connection."""
    conn: redis.Redis = app.extensions["instruqt_crm"]["redis"]
    return conn


def reply(code: int, **fields: Any) -> Response:
    """A small JSON answer with HTTP status ``code``."""
    return Response(_json_line(fields), status=code, mimetype="application/json")


def _json_line(fields: dict[str, Any]) -> bytes:
    """An answer's body: compact JSON and a newline."""
    return (_encode(fields) + "\n").encode()


def _is_json(content_type: str | None) -> bool:
    """Whether a Content-Type header names JSON (``application/json`` or ``+json``)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


def _read_body(environ: WSGIEnvironment, limit: int, seconds: float) -> bytes | None:
    """The raw body, or None when it exceeds ``limit`` (read no further than limit + 1 bytes).

    Raises ``MalformedBody`` when the framing cannot be read (a broken chunked encoding),
    ``BodyTimeout`` when, under gunicorn, no byte of it came for ``seconds``.
    """
    try:
        with _read_deadline(environ, seconds):
            return _read_within(environ, limit)
    except Exception as exc:  # each server reports broken framing its own way
        if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
            # werkzeug's length-limited stream reports the timeout as a disconnection
            raise BodyTimeout(f"no byte of the body for {seconds:g} s") from exc
        raise MalformedBody(f"{type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _read_deadline(environ: WSGIEnvironment, seconds: float) -> Iterator[None]:
    """Under gunicorn, the client's socket gives up after ``seconds`` without a byte while
    the body is read: a thread that waited for ever on a client that stopped sending would
    leave its process unable to answer anyone (a sync worker was replaced after --timeout)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        yield
        return
    before = sock.gettimeout()
    sock.settimeout(seconds)
    try:
        yield
    finally:
        sock.settimeout(before)


def _read_within(environ: WSGIEnvironment, limit: int) -> bytes | None:
    """The body as the request frames it (None past ``limit``)."""
    length = get_content_length(environ)
    if length is not None:
        return None if length > limit else get_input_stream(environ).read()
    if not environ.get("wsgi.input_terminated"):
        return b""  # no length and no chunked framing: nothing can be read safely
    stream = environ["wsgi.input"]
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        part = stream.read(limit + 1 - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return None if size > limit else b"".join(parts)


class MalformedBody(Exception):
    """The request body's framing could not be read."""


class BodyTimeout(Exception):
    """The client stopped sending the request body."""


def receive_webhook() -> Response:
    """The webhook route as Flask serves it (``WebhookFastPath`` takes its POSTs first)."""
    code, fields = answer_webhook(request.environ, current_app.extensions["instruqt_crm"])
    return reply(code, **fields)


class WebhookFastPath:
    """WSGI in front of Flask: a POST to the webhook path is answered here, anything else
    goes on to Flask. An unexpected error is logged with its traceback and answered 500, as
    Flask would (Sentry's logging integration reports it)."""

    def __init__(self, flask_app: WSGIApplication, state: dict[str, Any]) -> None:
        self.flask_app = flask_app
        self.state = state

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != WEBHOOK_PATH or environ.get("REQUEST_METHOD") != "POST":
            return self.flask_app(environ, start_response)
        try:
            code, fields = answer_webhook(environ, self.state)
        except HTTPException as exc:  # werkzeug's own refusals, answered as Flask would
            return exc(environ, start_response)
        except Exception:
            log.exception("Exception on %s [POST]", WEBHOOK_PATH)
            code, fields = 500, {"status": "error", "reason": "internal error"}
        body = _json_line(fields)
        start_response(
            f"{code} {HTTP_STATUS_CODES[code]}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]


def answer_webhook(environ: WSGIEnvironment, state: dict[str, Any]) -> Answer:
    """Verify, dedupe and enqueue one Instruqt event; the answer, counted by its outcome."""
    code, fields = _receive(environ, state)
    outcome = fields.pop("outcome", None) or fields["status"]
    if code != 503:  # Redis is out of reach: the count could not be written either
        state["tally"].incr("webhook_requests", outcome)
    return code, fields


def _receive(environ: WSGIEnvironment, state: dict[str, Any]) -> Answer:
    """The answer to one delivery: refused (413, 415, 400, 401, 408), or verified and kept."""
    settings: Settings = state["settings"]
    if (get_content_length(environ) or 0) > settings.max_body_bytes:
        return 413, {"status": "rejected", "reason": "body too large", "outcome": "too_large"}
    if not _is_json(environ.get("CONTENT_TYPE")):
        return 415, {
            "status": "rejected",
            "reason": "content type must be application/json",
            "outcome": "unsupported_media_type",
        }
    try:
        body = _read_body(environ, settings.max_body_bytes, settings.body_read_seconds)
    except BodyTimeout as exc:
        log.info("webhook rejected: %s", exc)
        return 408, {"status": "rejected", "reason": str(exc), "outcome": "timeout"}
    except MalformedBody as exc:
        log.info("webhook rejected, body framing unreadable: %s", exc)
        return 400, {
            "status": "rejected",
            "reason": "malformed body framing",
            "outcome": "malformed",
        }
    if body is None:
        return 413, {"status": "rejected", "reason": "body too large", "outcome": "too_large"}
    signed = {name: environ[key] for name, key in SIGNATURE_ENVIRON if environ.get(key)}
    try:
        message_id = verify(body, signed, settings.webhook_secrets)
    except SignatureError as exc:
        log.info("webhook rejected: %s", exc.reason)
        return 401, {"status": "rejected", "reason": exc.reason, "outcome": "bad_signature"}
    try:
        delivery = state["delivery_redis"].client()  # connects on first use
        state["memory"].check(delivery)  # warns as Redis fills up
        return _accept(delivery, message_id, body, settings)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.error("event %s not queued, Redis unreachable: %s", message_id, unreachable(exc))
        return 503, {"status": "unavailable", "reason": "queue unavailable, retry later"}
    except redis.ResponseError as exc:
        if not out_of_memory(exc):
            raise
        log.error("event %s not queued, Redis is full (maxmemory): %s", message_id, exc)
        return 503, {"status": "unavailable", "reason": "queue full, retry later"}


def _accept(conn: redis.Redis, message_id: str, body: bytes, settings: Settings) -> Answer:
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
        return 400, {"status": "invalid", "reason": reason, "id": message_id}
    if not enqueue_event(conn, message_id, body, settings.dedupe_ttl_seconds):
        log.info("event %s (%s) is a duplicate delivery", message_id, event_type)
        return 200, {"status": "duplicate", "id": message_id}
    log.debug("event %s (%s) queued", message_id, event_type)
    return 202, {"status": "queued", "id": message_id}


def healthz() -> Response:
    """The process is up."""
    return reply(200, status="ok")


def readyz() -> Response:
    """Redis answers."""
    try:
        redis_of(current_app).ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("not ready, Redis unreachable: %s", unreachable(exc))
        return reply(503, status="unavailable", reason="redis unreachable")
    return reply(200, status="ready")
