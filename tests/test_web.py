"""The receiver end to end against a real Redis: status codes, dedupe, enqueue, health."""

from __future__ import annotations

import gc
import io
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from flask import Flask, jsonify
from flask.testing import FlaskClient
from werkzeug.exceptions import BadRequest
from werkzeug.test import Client

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.engine import inbox
from instruqt_crm.engine.queueing import QUEUE_NAME, connect, queue
from instruqt_crm.journal import failures
from instruqt_crm.receiver import app as receiver_app
from instruqt_crm.receiver.app import create_app
from samples.signing import OTHER_SECRET, SECRET, signed, track_event
from tests.engine_helpers import inbox_events
from tests.test_signature import signed_bytes

URL = "/webhooks/instruqt"


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings.from_env(
        {
            "INSTRUQT_WEBHOOK_SECRET": f"{SECRET},{OTHER_SECRET}",
            "REDIS_URL": redis_url,
            "MAX_BODY_BYTES": "4096",
        }
    )


@pytest.fixture
def app(settings: Settings) -> Flask:
    return create_app(settings)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as client:
        yield client


def stored(conn: redis.Redis) -> list[bytes]:
    """Every key in Redis except the metric counters (a rejected request must add none)."""
    return [key for key in conn.scan_iter() if not key.startswith(b"instruqt_crm:metrics:")]


def queued(conn: redis.Redis) -> int:
    """Events kept in the inbox."""
    return inbox.depth(conn)


def post(client: FlaskClient, body: bytes, headers: dict[str, str]):
    return client.post(URL, data=body, headers=headers)


def test_valid_event_is_queued_once(client: FlaskClient, redis_conn: redis.Redis) -> None:
    body, headers = signed(track_event())
    response = post(client, body, headers)
    assert response.status_code == 202
    assert response.json["status"] == "queued"
    assert response.json["id"] == headers["svix-id"]
    drain_jobs = queue(QUEUE_NAME, redis_conn).jobs
    assert [job.func_name for job in drain_jobs] == ["instruqt_crm.engine.jobs.process_inbox"]
    assert inbox_events(redis_conn) == [(headers["svix-id"], json.loads(body))]


def test_unknown_type_is_accepted(client: FlaskClient, redis_conn: redis.Redis) -> None:
    body, headers = signed({"type": "something.new", "user_id": "u"})
    assert post(client, body, headers).status_code == 202
    assert queued(redis_conn) == 1


def test_both_rotation_secrets_accepted(client: FlaskClient, redis_conn: redis.Redis) -> None:
    for secret in (SECRET, OTHER_SECRET):
        body, headers = signed(track_event(), secret=secret)
        assert post(client, body, headers).status_code == 202
    assert queued(redis_conn) == 2


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda h: h.pop("svix-signature"), "missing"),
        (lambda h: h.update({"svix-signature": "v1,bm90IGl0"}), "does not match"),
        (lambda h: h.update({"svix-signature": "nonsense"}), "malformed"),
        (lambda h: h.update({"svix-timestamp": "1614265330"}), "window"),
    ],
)
def test_bad_signatures_get_401_and_store_nothing(
    client: FlaskClient, redis_conn: redis.Redis, tamper, reason: str
) -> None:
    body, headers = signed(track_event())
    tamper(headers)
    response = post(client, body, headers)
    assert response.status_code == 401
    assert reason in response.json["reason"]
    assert SECRET not in response.get_data(as_text=True)
    assert stored(redis_conn) == []


def test_wrong_secret_gets_401(client: FlaskClient, redis_conn: redis.Redis) -> None:
    body, headers = signed(track_event(), secret="whsec_" + "d3JvbmcgY2VydA==")
    assert post(client, body, headers).status_code == 401
    assert stored(redis_conn) == []


def test_too_large_gets_413(client: FlaskClient, redis_conn: redis.Redis) -> None:
    body, headers = signed(track_event(padding="x" * 5000))
    response = post(client, body, headers)
    assert response.status_code == 413
    assert stored(redis_conn) == []


def test_too_large_without_content_length_gets_413(
    client: FlaskClient, redis_conn: redis.Redis
) -> None:
    body, headers = signed(track_event(padding="x" * 5000))
    headers["Transfer-Encoding"] = "chunked"
    response = client.post(
        URL,
        input_stream=io.BytesIO(body),
        headers=headers,
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    assert stored(redis_conn) == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_non_json_content_type_gets_415(
    client: FlaskClient, redis_conn: redis.Redis, content_type: str
) -> None:
    body, headers = signed(track_event())
    headers["Content-Type"] = content_type
    assert post(client, body, headers).status_code == 415
    assert stored(redis_conn) == []


def test_json_with_charset_is_fine(client: FlaskClient) -> None:
    body, headers = signed(track_event())
    headers["Content-Type"] = "application/json; charset=utf-8"
    assert post(client, body, headers).status_code == 202


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[1, 2]", "body must be a JSON object"),
        (b'{"no_type": 1}', "body must have a string 'type'"),
        (b'{"type": 5}', "body must have a string 'type'"),
        (b'{"type": ""}', "body must have a string 'type'"),
        (b"not json", "body is not valid JSON"),
        (b"{", "body is not valid JSON"),
        ("\u00e9t\u00e9".encode(), "body is not valid JSON"),
    ],
)
def test_signed_but_unusable_body_gets_400_with_the_reason_and_is_kept(
    client: FlaskClient, redis_conn: redis.Redis, raw: bytes, reason: str
) -> None:
    """A genuine delivery that is not an event: ours to keep (400), not a bad signature."""
    body, headers = signed(raw)
    response = post(client, body, headers)
    assert response.status_code == 400
    assert response.json == {"status": "invalid", "reason": reason, "id": headers["svix-id"]}
    assert queued(redis_conn) == 0
    [kept] = failures.recent(redis_conn)
    assert (kept.category, kept.reason) == ("invalid_body", reason)
    assert (kept.message_id, kept.payload) == (headers["svix-id"], raw.decode())


def test_signed_body_that_is_not_utf8_gets_401_and_stores_nothing(
    client: FlaskClient, redis_conn: redis.Redis
) -> None:
    raw = b"\xff\xfe{}\x80"
    response = post(client, raw, signed_bytes(raw))
    assert response.status_code == 401
    assert "not UTF-8" in response.json["reason"]
    assert stored(redis_conn) == []


def test_same_id_twice_is_one_job(client: FlaskClient, redis_conn: redis.Redis) -> None:
    body, headers = signed(track_event(), msg_id="msg_repeat")
    assert post(client, body, headers).status_code == 202
    body, headers = signed(track_event(), msg_id="msg_repeat")  # Svix re-signs with a new time
    response = post(client, body, headers)
    assert response.status_code == 200
    assert response.json == {"status": "duplicate", "id": "msg_repeat"}
    assert queued(redis_conn) == 1


def test_same_id_ten_times_concurrently_is_one_job(app: Flask, redis_conn: redis.Redis) -> None:
    deliveries = [signed(track_event(), msg_id="msg_storm") for _ in range(10)]

    def deliver(delivery):
        with app.test_client() as client:
            return post(client, *delivery).status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        codes = sorted(pool.map(deliver, deliveries))
    assert codes.count(202) == 1
    assert codes.count(200) == 9
    assert queued(redis_conn) == 1


def test_a_delivery_after_redis_dropped_the_kept_connection_is_queued(
    client: FlaskClient, redis_conn: redis.Redis
) -> None:
    # each thread keeps one connection for its deliveries; a server restart or an idle
    # timeout closes it, and the next delivery must reconnect, not fail
    first, second = signed(track_event()), signed(track_event(user_id="user-2"))
    assert post(client, *first).status_code == 202
    assert redis_conn.client_kill_filter(_type="normal", skipme=True) >= 1
    assert post(client, *second).status_code == 202
    ids = [message_id for message_id, _ in inbox_events(redis_conn)]
    assert ids == [first[1]["svix-id"], second[1]["svix-id"]]


def test_each_thread_keeps_its_own_connection(app: Flask) -> None:
    kept = app.extensions["instruqt_crm"]["delivery_redis"]
    both_running = threading.Barrier(2)

    def twice(_: int) -> tuple[redis.Redis, redis.Redis]:
        both_running.wait(timeout=5)
        return kept.client(), kept.client()

    with ThreadPoolExecutor(max_workers=2) as pool:
        (a, a_again), (b, b_again) = pool.map(twice, range(2))
    assert a is a_again and b is b_again  # taken once per thread
    assert a is not b and a.connection is not b.connection


class StalledBody(io.RawIOBase):
    """A request body whose client stopped sending: every read times out."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        raise TimeoutError("timed out")


class ClientSocket:
    """What gunicorn puts in the environ as ``gunicorn.socket``: only its timeout is used."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = [None]

    def gettimeout(self) -> float | None:
        return self.timeouts[-1]

    def settimeout(self, value: float | None) -> None:
        self.timeouts.append(value)


@pytest.mark.parametrize("terminated", [True, False])  # gunicorn's raw body, werkzeug's limit
def test_a_stalled_body_is_answered_408_whichever_stream_reads_it(
    app: Flask, redis_conn: redis.Redis, terminated: bool
) -> None:
    sock = ClientSocket()
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": URL,
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "500",
        "wsgi.input": io.BufferedReader(StalledBody()),
        "gunicorn.socket": sock,
        **({"wsgi.input_terminated": True} if terminated else {}),  # werkzeug reads the key
    }
    answered: list[str] = []
    body = b"".join(app.wsgi_app(environ, lambda status, headers: answered.append(status)))
    assert answered == ["408 Request Timeout"]
    assert json.loads(body) == {"status": "rejected", "reason": "no byte of the body for 10 s"}
    assert sock.timeouts == [None, 10.0, None]  # set for the read, then given back
    assert stored(redis_conn) == []


def test_health(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_readyz_and_receiver_answer_503_without_redis(settings: Settings) -> None:
    dead = connect(Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1"}))
    app = create_app(settings, conn=dead)
    with app.test_client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        body, headers = signed(track_event())
        response = post(client, body, headers)
        assert response.status_code == 503
        assert "retry" in response.json["reason"]


def test_absurd_type_is_an_invalid_body(client: FlaskClient, redis_conn: redis.Redis) -> None:
    body, headers = signed({"type": "x" * 500, "user_id": "u"})
    response = post(client, body, headers)
    assert response.status_code == 400
    assert "at most" in response.json["reason"]
    assert queued(redis_conn) == 0


def test_outcomes_are_counted_together_and_shown_by_metrics(
    app: Flask, client: FlaskClient, redis_conn: redis.Redis
) -> None:
    app.extensions["instruqt_crm"]["tally"].clock = lambda: 1000.0  # all within one second
    counter = keys.metric("webhook_requests")
    for number in range(3):
        assert post(client, *signed(track_event(), msg_id=f"msg_c{number}")).status_code == 202
    assert post(client, *signed(track_event(), msg_id="msg_c0")).status_code == 200
    assert post(client, *signed(track_event(), secret="whsec_b3RoZXI=")).status_code == 401
    assert redis_conn.hgetall(counter) == {b"queued": b"1"}  # only the first, at once
    text = client.get("/metrics").get_data(as_text=True)  # the scrape writes the rest first
    assert redis_conn.hgetall(counter) == {
        b"queued": b"3",
        b"duplicate": b"1",
        b"bad_signature": b"1",
    }
    assert 'instruqt_crm_webhook_requests_total{outcome="queued"} 3.0' in text


def test_answers_are_the_compact_json_jsonify_writes(app: Flask, client: FlaskClient) -> None:
    """The answer is encoded without jsonify's per-call set-up, to the same bytes."""
    response = post(client, *signed(track_event(), msg_id="msg_wire"))
    assert response.mimetype == "application/json"
    assert response.get_data() == b'{"id":"msg_wire","status":"queued"}\n'
    with app.test_request_context():
        assert jsonify(status="queued", id="msg_wire").get_data() == response.get_data()


def test_webhook_prefixed_signature_headers_are_read(
    client: FlaskClient, redis_conn: redis.Redis
) -> None:
    """Only the signature headers are handed to verification: both families of them."""
    body, headers = signed(track_event(), msg_id="msg_family", prefix="webhook")
    assert post(client, body, {**headers, "X-Other": "ignored"}).status_code == 202
    assert inbox_events(redis_conn) == [("msg_family", json.loads(body))]


def test_accepted_deliveries_log_at_debug_repeats_and_refusals_at_info(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker logs every event it handles (and the counter counts each answer): the
    receiver's own line for an accepted delivery is DEBUG; what went wrong stays INFO."""
    caplog.set_level(logging.DEBUG, logger="instruqt_crm.receiver.app")
    assert post(client, *signed(track_event(), msg_id="msg_log")).status_code == 202
    assert post(client, *signed(track_event(), msg_id="msg_log")).status_code == 200
    assert post(client, *signed(track_event(), secret="whsec_b3RoZXI=")).status_code == 401
    lines = [
        (record.levelname, record.getMessage())
        for record in caplog.records
        if record.name == "instruqt_crm.receiver.app"
    ]
    assert lines == [
        ("DEBUG", "event msg_log (track.challenge_attempted) queued"),
        ("INFO", "event msg_log (track.challenge_attempted) is a duplicate delivery"),
        ("INFO", "webhook rejected: signature does not match"),
    ]


def test_a_gunicorn_worker_keeps_its_start_up_objects_out_of_collections(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full collection over start-up's objects stalled a worker mid-request: frozen."""
    assert gc.get_freeze_count() == 0
    create_app(settings)  # not a gunicorn worker: nothing frozen
    assert gc.get_freeze_count() == 0
    monkeypatch.setenv("SERVER_SOFTWARE", "gunicorn/27.0.1")
    try:
        create_app(settings)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def deliveries_of_every_outcome(tag: str) -> list[tuple[bytes, dict[str, str]]]:
    """One delivery per answer the receiver gives, with svix-ids of their own."""
    queued = signed(track_event(), msg_id=f"msg_{tag}")
    wrong_type = signed(track_event(), msg_id=f"msg_{tag}_type")
    wrong_type[1]["Content-Type"] = "text/plain"
    return [
        queued,
        signed(track_event(), msg_id=f"msg_{tag}"),  # a repeat
        signed(track_event(), msg_id=f"msg_{tag}_bad", secret="whsec_b3RoZXI="),
        wrong_type,
        signed(track_event(padding="x" * 5000), msg_id=f"msg_{tag}_big"),
        signed(b"[1]", msg_id=f"msg_{tag}_invalid"),
    ]


def answers(client: Client, tag: str) -> list[tuple[int, dict[str, str]]]:
    found = []
    for body, headers in deliveries_of_every_outcome(tag):
        response = client.post(URL, data=body, headers=headers)
        fields = {k: v.replace(tag, "TAG") for k, v in json.loads(response.get_data()).items()}
        found.append((response.status_code, fields))
    return found


def test_the_fast_path_answers_and_counts_as_the_flask_route(
    app: Flask, client: FlaskClient, redis_conn: redis.Redis
) -> None:
    """Webhook POSTs are answered in front of Flask; Flask's own route gives the same."""
    flask_route = Client(app.wsgi_app.flask_app)  # type: ignore[attr-defined]
    fast = answers(client, "fast")
    assert [code for code, _ in fast] == [202, 200, 401, 415, 413, 400]
    assert answers(flask_route, "flask") == fast
    app.extensions["instruqt_crm"]["tally"].flush()
    assert redis_conn.hgetall(keys.metric("webhook_requests")) == {
        outcome: b"2"
        for outcome in (
            b"queued",
            b"duplicate",
            b"bad_signature",
            b"unsupported_media_type",
            b"too_large",
            b"invalid",
        )
    }
    assert client.get(URL).status_code == flask_route.get(URL).status_code == 405


def test_an_unexpected_error_is_logged_and_answered_500(
    app: Flask,
    client: FlaskClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(raw: bytes) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(receiver_app, "decode_body", broken)
    response = post(client, *signed(track_event()))
    assert response.status_code == 500
    assert response.json == {"status": "error", "reason": "internal error"}
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and "bug" in str(record.exc_info[1])
    flask_route = Client(app.wsgi_app.flask_app)  # type: ignore[attr-defined]
    body, headers = signed(track_event())
    assert flask_route.post(URL, data=body, headers=headers).status_code == 500


def test_werkzeug_refusals_raised_inside_are_answered_as_flask_answers_them(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusing(raw: bytes) -> None:
        raise BadRequest("refused by werkzeug")

    monkeypatch.setattr(receiver_app, "decode_body", refusing)
    flask_route = Client(app.wsgi_app.flask_app)  # type: ignore[attr-defined]
    body, headers = signed(track_event())
    assert post(client, body, headers).status_code == 400
    assert flask_route.post(URL, data=body, headers=headers).status_code == 400
