"""No event can stop the pipeline: hostile signed bodies through the real receiver and worker.

Hypothesis builds realistic Instruqt events and spoils some of their fields with hostile
values (lone surrogates, NaN/Infinity, huge integers, deep nesting, wrong types, long or
malformed emails) or the whole body (a byte-order mark). Each is posted, correctly signed,
to gunicorn started from the Procfile; ``python worker.py`` handles what it accepts, with
real Redis, the fake Instruqt lookup and the fake HubSpot. Then one valid event follows:
it must reach HubSpot, the inbox must hold nothing, and every accepted event must be
merged, parked, failed with a reason, or skipped by the mapping (counted).
"""

from __future__ import annotations

import codecs
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.crm.dryrun import dry_run_records
from instruqt_crm.engine import inbox
from instruqt_crm.engine.queueing import QUEUE_NAME, queue
from instruqt_crm.journal import failures
from instruqt_crm.keys import text
from instruqt_crm.receiver.app import create_app
from samples.signing import SECRET, signed
from tests.engine_helpers import drain, enqueue_all, merged_ids
from tests.fakes.instruqt import FakeInstruqt
from tests.fault_harness import Stack
from tests.processes import answer_of, wait_for

RAW = {  # JSON text json.dumps cannot write, spliced in where a value's marker stands
    "nan": "NaN",
    "infinity": "Infinity",
    "minus_infinity": "-Infinity",
    "overflow": "1e999",
    "huge_int": "9" * 5000,  # past Python's 4300-digit limit for int <-> text
    "deep": "[" * 5000 + "]" * 5000,
    "deep_ok": "[" * 400 + "]" * 400,
}
FIELDS = (
    "type",
    "user_id",
    "timestamp",
    "track_slug",
    "track_id",
    "participant_id",
    "custom_parameters",
    "email",  # custom_parameters.email
    "score",
    "duration",
    "is_developer_play",
    "completed",
    "challenge_index",
    "content",
)
hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**40), 10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(["\ud800", "a\udfffb", "\udbff\u0000", "\x00\x1f\u2028", "", " "]),
    st.sampled_from(["a@b,c@d", "x y@z.com", "a\n@b.co", "a" * 5000 + "@x.com", "@", "a@"]),
    st.sampled_from(["track.started", "track.completed", "review.created", "no.such"]),
    st.just("x" * 70_000),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    st.sampled_from(sorted(RAW)).map(lambda name: f"__raw_{name}__"),
)


def spoiled(user: str, email: str, overrides: dict[str, Any], bom: bool) -> bytes:
    """A realistic track event with some fields replaced by hostile values, as raw JSON."""
    body: dict[str, Any] = {
        "type": "track.started",
        "user_id": user,
        "timestamp": "2026-11-30T10:00:00.123456Z",
        "track_slug": "intro",
        "track_id": "trk1",
        "participant_id": f"p-{uuid.uuid4().hex[:8]}",
        "custom_parameters": {"email": email},
    }
    for name, value in overrides.items():
        if name == "email" and isinstance(body.get("custom_parameters"), dict):
            body["custom_parameters"]["email"] = value
        else:
            body[name] = value
    raw = json.dumps(body)
    for name, fragment in RAW.items():
        raw = raw.replace(f'"__raw_{name}__"', fragment)
    return (codecs.BOM_UTF8 if bom else b"") + raw.encode()


BODY_READ_SECONDS = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    instruqt = FakeInstruqt(emails={})
    with Stack(
        tmp_path_factory.mktemp("poison"),
        workers=1,
        instruqt=instruqt,
        BODY_READ_SECONDS=str(BODY_READ_SECONDS),
    ) as running:
        yield running


def post(stack: Stack, raw: bytes, msg_id: str) -> requests.Response:
    body, headers = signed(raw, msg_id=msg_id)
    return requests.post(stack.url, data=body, headers=headers, timeout=10)


def stats(conn: redis.Redis) -> dict[str, int]:
    return {text(k): int(v) for k, v in conn.hgetall(keys.STATS).items()}


def merged_or_parked(conn: redis.Redis) -> set[str]:
    """Ids of events merged into any learner (their trails, whose bounds the tests raise) or
    waiting for a learner's email."""
    ids: set[str] = set()
    for key in conn.scan_iter(f"{keys.PREFIX}trace:*"):
        ids.update(merged_ids(conn, text(key)[len(keys.trail("")) :]))
    for key in conn.scan_iter(f"{keys.PREFIX}parked:*"):
        if not text(key).endswith(":meta"):
            ids.update(text(event_id) for event_id in conn.hkeys(key))
    return ids


def nothing_pending(conn: redis.Redis) -> bool:
    """The inbox is empty and no worker holds an entry."""
    try:
        held = conn.xpending(keys.INBOX, inbox.GROUP)["pending"]
    except redis.ResponseError:  # no stream yet
        held = 0
    return inbox.depth(conn) == 0 and held == 0


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no slow "explain"
)
@given(
    spoils=st.lists(
        st.tuples(
            st.integers(0, 2),  # which of three learners
            st.dictionaries(st.sampled_from(FIELDS), hostile, min_size=1, max_size=4),
            st.integers(0, 5).map(lambda n: n == 0),  # a byte-order mark now and then
        ),
        min_size=1,
        max_size=10,
    )
)
def test_no_signed_body_stops_the_pipeline(stack: Stack, spoils: list) -> None:
    conn = stack.conn()
    run = uuid.uuid4().hex[:8]
    before = stats(conn)
    accepted: set[str] = set()
    for number, (learner, overrides, bom) in enumerate(spoils):
        msg_id = f"msg_{run}_{number}"
        email = f"learner{learner}-{run}@example.com"
        raw = spoiled(f"u{learner}-{run}", email, overrides, bom)
        answer = post(stack, raw, msg_id)
        # 413: several 70 kB fields together pass MAX_BODY_BYTES (256 kB)
        assert answer.status_code in (200, 202, 400, 413), answer.text
        assert answer.json().get("reason") or answer.status_code < 400
        if answer.status_code == 202:
            accepted.add(msg_id)
        if answer.status_code == 400:  # Svix delivers a refused event again: kept once
            assert post(stack, raw, msg_id).status_code == 400
            kept = [f for f in failures.recent(conn, 10_000) if f.message_id == msg_id]
            assert len(kept) == 1 and kept[0].kind == failures.Kind.BODY

    sentinel = f"valid-{run}@example.com"
    valid = spoiled(f"valid-{run}", sentinel, {}, bom=False)
    assert post(stack, valid, f"msg_{run}_valid").status_code == 202
    wait_for(lambda: sentinel in stack.hubspot.contacts, 30, "the valid event to reach HubSpot")
    wait_for(lambda: nothing_pending(conn), 30, "the inbox to empty")

    failed = {f.message_id for f in failures.recent(conn, 10_000)}
    rest = accepted - merged_or_parked(conn) - failed
    after = stats(conn)
    skipped = sum(
        after.get(name, 0) - before.get(name, 0) for name in ("events:skipped", "events:unknown")
    )
    assert len(rest) == skipped, f"accepted events with no fate: {sorted(rest)}"
    assert all(f.reason for f in failures.recent(conn, 10_000))


# -- past the door: entries the receiver would refuse today (kept by older versions,
# -- requeued, replayed or written by hand) still end somewhere, and the inbox moves on.


def started(user: object, email: object) -> dict[str, Any]:
    return {
        "type": "track.started",
        "user_id": user,
        "timestamp": "2026-11-30T10:00:00Z",
        "track_slug": "intro",
        "custom_parameters": {"email": email},
    }


def test_a_batch_that_raises_as_a_whole_is_handled_one_by_one(
    engine: Path, redis_conn: redis.Redis
) -> None:
    poison = started("\ud800", "\ud800@example.com")  # Redis cannot take this user id
    enqueue_all(
        redis_conn,
        [("m1", started("u1", "a@example.com")), ("m2", poison), ("m3", started("u3", "c@x.io"))],
    )
    drain(redis_conn)
    assert set(dry_run_records(redis_conn)) == {"a@example.com", "c@x.io"}
    (failure,) = failures.recent(redis_conn)
    assert failure.message_id == "m2" and failure.kind == failures.Kind.EVENT
    assert "UnicodeEncodeError" in failure.reason
    assert json.loads(failure.payload)["user_id"] == "\ud800"
    assert nothing_pending(redis_conn)
    assert queue(QUEUE_NAME, redis_conn).failed_job_registry.count == 0
    assert stats(redis_conn)["events:failed"] == 1


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bodies=st.lists(
        st.dictionaries(st.sampled_from(FIELDS), hostile, max_size=4).map(
            lambda overrides: {**started("u1", "a@example.com"), **overrides}
        ),
        min_size=1,
        max_size=8,
    )
)
def test_whatever_reaches_the_inbox_ends_somewhere(
    engine: Path, redis_conn: redis.Redis, bodies: list[dict[str, Any]]
) -> None:
    run = uuid.uuid4().hex[:8]
    before = stats(redis_conn)
    ids = [f"m_{run}_{number}" for number in range(len(bodies))]
    enqueue_all(redis_conn, zip(ids, bodies, strict=True))
    drain(redis_conn)
    assert nothing_pending(redis_conn)
    assert queue(QUEUE_NAME, redis_conn).failed_job_registry.count == 0
    failed = {f.message_id for f in failures.recent(redis_conn, 10_000)}
    rest = set(ids) - merged_or_parked(redis_conn) - failed
    after = stats(redis_conn)
    skipped = sum(after.get(k, 0) - before.get(k, 0) for k in ("events:skipped", "events:unknown"))
    assert len(rest) == skipped, f"events with no fate: {sorted(rest)}"


# -- at the door


@pytest.mark.parametrize(
    "chunks",
    [
        b"ZZ\r\nabc\r\n0\r\n\r\n",  # a size that is not hex
        b"3\r\nabcdef\r\n0\r\n\r\n",  # a chunk longer than its size
        b"-1\r\nx\r\n0\r\n\r\n",  # a negative size
        b"3\r\nab",  # cut short
        b"100000000000000000000\r\nx\r\n",  # a size past any limit
    ],
)
def test_malformed_chunked_framing_is_refused_with_400(stack: Stack, chunks: bytes) -> None:
    request = (
        b"POST /webhooks/instruqt HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as client:
        client.sendall(request + chunks)
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while part := client.recv(4096):
            answer += part
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert json.loads(body)["reason"] == "malformed body framing"


def test_a_body_that_stops_arriving_is_answered_408_and_frees_the_worker(stack: Stack) -> None:
    # a process answers one delivery at a time: a client that stops sending mid-body must
    # not hold it for ever
    request = (
        b"POST /webhooks/instruqt HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as client:
        client.sendall(request + b'{"type": "track.')
        head, body = answer_of(client)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(body) == {
        "status": "rejected",
        "reason": f"no byte of the body for {BODY_READ_SECONDS} s",
    }
    after = json.dumps(started("u-after-408", "a408@example.com")).encode()
    assert post(stack, after, "m408").status_code == 202


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (codecs.BOM_UTF8 + b'{"type": "track.started"}', "byte-order mark"),
        (b'{"type": "track.started", "score": NaN}', "NaN"),
        (b'{"type": "track.started", "score": -Infinity}', "-Infinity"),
        (b'{"type": "track.started", "score": 1e999}', "not finite"),
        (b'{"type": "track.started", "user_id": "\\ud800"}', "lone surrogate"),
        (b'{"type": "track.started", "\\udc00": 1}', "lone surrogate"),
        (b'{"type": "track.started", "score": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b'{"type": "track.started", "user_id": ["u1"]}', "'user_id' must be a string"),
        (b'{"type": "track.started", "timestamp": 1e300}', "timestamp out of range"),
        (b"[" * 50_000 + b"]" * 50_000, "not valid JSON"),
    ],
)
def test_what_the_worker_could_not_read_is_refused_and_kept_once(
    redis_url: str, redis_conn: redis.Redis, raw: bytes, reason: str
) -> None:
    config = Settings.from_env(
        {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url, "MAX_BODY_BYTES": "200000"}
    )
    client = create_app(config, conn=redis_conn).test_client()
    for _ in range(3):  # Svix delivers a refused event again, re-signed
        body, headers = signed(raw, msg_id="msg_refused")
        answer = client.post("/webhooks/instruqt", data=body, headers=headers)
        assert answer.status_code == 400 and reason in answer.get_json()["reason"]
    (kept,) = failures.recent(redis_conn)
    assert kept.kind == failures.Kind.BODY and kept.message_id == "msg_refused"
    assert reason in kept.reason
    assert inbox.depth(redis_conn) == 0


INVALID_EMAILS = [
    "a@b,c@d",
    "x y@z.com",
    "line\n@break.com",
    "a" * 5000 + "@x.com",
    "ada@localhost",
]


def test_invalid_emails_never_reach_the_crm(stack: Stack) -> None:
    conn, run = stack.conn(), uuid.uuid4().hex[:8]
    assert stack.instruqt is not None
    for number, email in enumerate(INVALID_EMAILS):  # Instruqt's answer is no better
        stack.instruqt.emails[f"bad{number}-{run}"] = email
    events = [
        *(started(f"bad{n}-{run}", email) for n, email in enumerate(INVALID_EMAILS)),
        *(started(None, email) for email in INVALID_EMAILS),  # nobody to look up
        started(f"ok-{run}", f"ok-{run}@example.com"),
    ]
    for number, event in enumerate(events):
        assert post(stack, json.dumps(event).encode(), f"msg_{run}_{number}").status_code == 202
    wait_for(lambda: f"ok-{run}@example.com" in stack.hubspot.contacts, 30, "the valid one")
    wait_for(lambda: nothing_pending(conn), 30, "the inbox to empty")
    sent = {
        str(item["id"])
        for record in list(stack.hubspot.requests)
        if isinstance(record.body, dict)
        for item in record.body.get("inputs", [])
    }
    assert not sent & {email.strip().lower() for email in INVALID_EMAILS}
    failed = {f.message_id: f.reason for f in failures.recent(conn, 10_000)}
    for number in range(len(INVALID_EMAILS), 2 * len(INVALID_EMAILS)):  # no user id: failed
        assert "invalid email" in failed[f"msg_{run}_{number}"]
    waiting = merged_or_parked(conn)
    assert {f"msg_{run}_{n}" for n in range(len(INVALID_EMAILS))} <= waiting  # wait for one
