"""End-to-end fault scenarios: real gunicorn, worker processes, Redis and fake CRM, under faults.

Each scenario posts a generated history (samples/history.py: shuffled, a third delivered two or
three times, every attempt re-signed with a fresh timestamp and the same svix-id), injects
its fault, waits until the service has settled and compares the fake CRM with the records
computed independently from the history. The table printed at the end (``pytest -s``) has,
per scenario:

- events / posts / tries: distinct events, deliveries in the list, HTTP attempts (incl. retries);
- 202 / 200: ids accepted, deliveries answered "duplicate"; retry: attempts repeated after
  a 503 or no answer (as Svix would);
- synced: contacts whose CRM record equals the expected one; rej: contacts in the failure
  registry (reasons listed below the row);
- lost: ids answered 2xx that are neither merged into a contact's ledger, parked nor in
  the failure registry (must be 0); wrong: non-rejected contacts whose record differs (0);
- dup: applied upsert inputs that set nothing new (every property already held that value,
  from the fake's request log; must be 0); resent: such inputs after a worker was SIGKILLed
  between the two writes (a flush killed after HubSpot answered but before the ledger
  recorded it is sent again: at-least-once by design, counted apart);
- upsert: batch upsert requests the CRM saw; secs: the scenario's wall time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from instruqt_crm import keys
from instruqt_crm.engine import inbox
from instruqt_crm.events import parse_timestamp
from instruqt_crm.journal import failures
from instruqt_crm.keys import text
from samples.history import _stamp, deliveries, expected_in_crm, expected_records, history
from samples.signing import SECRET
from tests.fakes.instruqt import FakeInstruqt
from tests.fault_harness import (
    Posted,
    Report,
    Stack,
    build_report,
    post_all,
    print_reports,
    settled,
    state,
)
from tests.processes import wait_for

pytestmark = pytest.mark.slow
LEARNERS = 120  # about 750 events, 1100 deliveries: each scenario stays near a minute on 2 cores
REPORTS: list[Report] = []


@pytest.fixture(scope="module", autouse=True)
def report_table() -> Iterator[None]:
    """Print every scenario's figures once the module is done."""
    yield
    print_reports(REPORTS)


def quietly_settled(conn: redis.Redis) -> bool:
    """``settled``, False while Redis does not answer."""
    try:
        return settled(conn)
    except redis.RedisError:
        return False


def run(
    name: str,
    stack: Stack,
    pairs: list[tuple[str, dict[str, Any]]],
    expected: dict[str, dict[str, str]],
    chaos: Callable[[threading.Event], None] | None = None,
    settle: float = 60,
) -> Report:
    """Post ``pairs`` while ``chaos`` runs, wait until settled, report and keep the report."""
    started = time.monotonic()
    stop = threading.Event()
    chaos_thread = threading.Thread(target=chaos, args=(stop,)) if chaos else None
    if chaos_thread:
        chaos_thread.start()
    try:
        posted = post_all(stack.url, pairs)
    finally:
        stop.set()
        if chaos_thread:
            chaos_thread.join()
    return finish(name, stack, pairs, posted, expected, started, settle)


def finish(
    name: str,
    stack: Stack,
    pairs: list[tuple[str, dict[str, Any]]],
    posted: Posted,
    expected: dict[str, dict[str, str]],
    started: float,
    settle: float = 60,
) -> Report:
    """Wait until the stack has settled, then report (and keep the report for the table)."""
    conn = stack.conn()
    try:
        wait_for(lambda: quietly_settled(conn), settle, f"scenario {name} to settle")
    except AssertionError:
        print(name, state(conn))
        raise
    report = build_report(name, stack, conn, pairs, posted, expected, started)
    REPORTS.append(report)
    assert report.lost == 0, "accepted events were lost:\n" + "\n".join(report.diffs)
    return report


def test_worker_processes_sigkilled_and_restarted(tmp_path: Path) -> None:
    events = history(LEARNERS, seed=101)
    pairs = deliveries(events, seed=102)
    rng = random.Random(103)

    with Stack(tmp_path) as stack:

        def chaos(stop: threading.Event) -> None:
            while not stop.wait(rng.uniform(0.5, 2.0)):
                stack.kill_random_worker(rng)
            for _ in range(max(3, 5 - len(stack.kill_times))):  # and while the last flushes run
                time.sleep(rng.uniform(0.2, 1.0))
                stack.kill_random_worker(rng)

        report = run(
            "a worker SIGKILL",
            stack,
            pairs,
            expected_in_crm(expected_records(events)),
            chaos,
            settle=60,
        )
    assert len(stack.kill_times) >= 5
    assert report.accepted == report.events
    assert report.wrong == 0 and report.rejected == 0
    assert report.synced == len(expected_records(events))
    assert report.duplicated_writes == 0


def test_redis_restarted_mid_run_with_persistence(tmp_path: Path) -> None:
    events = history(LEARNERS, seed=201)
    pairs = deliveries(events, seed=202)

    with Stack(tmp_path, persistent=True) as stack:
        started = time.monotonic()
        third = len(pairs) // 3
        posted = post_all(stack.url, pairs[:third])
        crash = threading.Thread(target=stack.restart_redis, args=(4.0,))
        crash.start()
        time.sleep(0.2)  # Redis is down: what follows is answered 503 until it is back
        posted.add(post_all(stack.url, pairs[third:]))
        crash.join()
        expected = expected_in_crm(expected_records(events))
        report = finish("b redis restart", stack, pairs, posted, expected, started, settle=60)
    assert report.retried > 0, "the receiver answered 503 (or nothing) while Redis was down"
    assert report.accepted == report.events
    assert report.wrong == 0 and report.rejected == 0
    assert report.synced == len(expected_records(events))
    assert report.duplicated_writes == 0


def test_crm_5xx_then_429_storm_then_recovery(tmp_path: Path) -> None:
    events = history(LEARNERS, seed=301)
    pairs = deliveries(events, seed=302)

    with Stack(tmp_path) as stack:
        fake = stack.hubspot
        expected = expected_in_crm(expected_records(events))
        half = len(pairs) // 2
        started = time.monotonic()
        fake.set_error_rate(0.3, 503, seed=303)
        first = post_all(stack.url, pairs[:half])  # flushed while 30 % of requests fail
        time.sleep(max(0.0, started + 10.0 - time.monotonic()))
        fake.set_error_rate(0.0)
        fake.set_rate_limit(2, 10.0)  # the storm: almost every request is refused
        storm = time.monotonic()
        second = post_all(stack.url, pairs[half:])  # flushed into the storm
        time.sleep(max(0.0, storm + 6.0 - time.monotonic()))
        fake.set_rate_limit(100, 10.0)
        recovered = time.monotonic()
        first.add(second)
        report = finish("c crm 5xx+429", stack, pairs, first, expected, started, settle=90)
        statuses = [r.status for r in fake.requests]
        late_429 = [r for r in fake.rate_limited_requests if r.time >= recovered]
    assert statuses.count(503) > 0, "the 5xx phase hit some requests"
    assert fake.count_429 > 0, "the storm hit some requests"
    assert late_429 == [], "no request over the limit once the CRM recovered"
    assert report.wrong == 0 and report.rejected == 0
    assert report.synced == len(expected)
    assert report.duplicated_writes == 0


def with_bad_emails(events: list[dict[str, Any]], every: int) -> tuple[list[dict], set[str]]:
    """Give every ``every``-th learner an email HubSpot refuses; returns events and bad emails."""
    bad: set[str] = set()
    changed = []
    for event in events:
        number = int(event["user_id"][4:])
        if number % every == 0 and "custom_parameters" in event:
            email = f"learner{number:05d}@example.рф"  # a valid address the CRM refuses
            bad.add(email)
            event = {**event, "custom_parameters": {"email": email}}
        changed.append(event)
    return changed, bad


def test_crm_rejects_some_records_permanently(tmp_path: Path) -> None:
    events, bad = with_bad_emails(history(LEARNERS, seed=401), every=15)
    pairs = deliveries(events, seed=402)
    learners = [e for e in events if not e.get("is_developer_play")]  # the CRM sees these
    bad_users = {
        e["user_id"] for e in learners if e.get("custom_parameters", {}).get("email") in bad
    }
    bad = {e["custom_parameters"]["email"] for e in learners if e.get("custom_parameters")} & bad
    good_users = {e["user_id"] for e in events} - bad_users  # reviews carry no email at all
    expected = expected_in_crm(expected_records([e for e in events if e["user_id"] in good_users]))

    with Stack(tmp_path) as stack:
        report = run("d crm rejects", stack, pairs, expected)
        registry = failures.recent(stack.conn(), limit=1000)
    rejected = {f.message_id: f for f in registry}
    assert set(rejected) == bad
    assert all(f.category == "validation" and "INVALID_EMAIL" in f.reason for f in registry)
    assert report.wrong == 0
    assert report.synced == len(expected)
    assert report.duplicated_writes == 0


def invites(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One invite.claimed per learner, a minute before their first play, with the email param."""
    first: dict[str, dict[str, Any]] = {}
    for event in events:
        first.setdefault(event["user_id"], event)
    return [
        {
            "type": "invite.claimed",
            "user_id": user_id,
            "invite_id": f"inv{user_id[4:]}",
            "organization_id": "instruqt",
            "timestamp": _stamp(parse_timestamp(event["timestamp"]) - timedelta(minutes=1)),
            "custom_parameters": {"email": f"learner{int(user_id[4:]):05d}@example.com"},
        }
        for user_id, event in first.items()
    ]


def drained(conn: redis.Redis) -> bool:
    """Every event handled: none waiting in the inbox or being handled (parked ones may wait)."""
    return inbox.depth(conn) == 0


def test_instruqt_lookup_down_then_back(tmp_path: Path) -> None:
    events = history(LEARNERS, seed=501, email_in_params=False)
    users = sorted({e["user_id"] for e in events})
    emails = {u: f"learner{int(u[4:]):05d}@example.com" for u in users}
    claims = invites(events)
    pairs = deliveries(events, seed=502)
    claim_pairs = [(f"msg_claim_{i:05d}", body) for i, body in enumerate(claims)]
    expected = expected_in_crm(expected_records(events + claims))
    instruqt = FakeInstruqt(emails=emails)
    instruqt.down = True

    with Stack(tmp_path, instruqt=instruqt) as stack:

        def lookup_comes_back() -> None:
            time.sleep(8.0)
            instruqt.down = False

        started = time.monotonic()
        outage = threading.Thread(target=lookup_comes_back)
        outage.start()
        half = len(pairs) // 2
        posted = post_all(stack.url, pairs[:half])  # while the lookup is down
        outage.join()
        posted.add(post_all(stack.url, pairs[half:]))  # after: lookups answer again
        conn = stack.conn()
        wait_for(lambda: drained(conn), 90, "the events to be merged or parked")
        parked = int(conn.hget(keys.STATS, "events:parked") or 0)
        posted.add(post_all(stack.url, claim_pairs))  # the invites reveal the emails
        report = finish("e lookup down", stack, pairs + claim_pairs, posted, expected, started)
        stats = {text(k): int(v) for k, v in conn.hgetall(keys.STATS).items()}
    print(f"\ne: {parked} events parked during the outage; identity stats {stats}")
    assert parked > 0, "some events waited for the email while the lookup was down"
    assert stats.get("identity:lookup-failed", 0) > 0
    assert stats.get("identity:lookup", 0) > 0, "events after the outage found emails by lookup"
    assert report.accepted == report.events
    assert report.wrong == 0 and report.rejected == 0
    assert report.synced == len(expected)
    assert report.duplicated_writes == 0


# ------------------------------------------------------------------ bad input, real gunicorn


def raw_signature(msg_id: str, stamp: int, body: bytes) -> str:
    """A Svix ``v1`` signature computed over raw bytes (the svix library only signs text)."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def post_raw(
    port: int, body: bytes | Iterator[bytes], headers: dict[str, str], chunked: bool = False
) -> int:
    """POST to the receiver with http.client (chunked: no Content-Length); the status, 0 if cut."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request(
            "POST", "/webhooks/instruqt", body=body, headers=headers, encode_chunked=chunked
        )
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        connection.close()


def test_bad_input_against_real_gunicorn(tmp_path: Path) -> None:
    """What test_receiver_fuzz cannot do in-process: chunking, limits and odd bytes on the wire."""
    limit = 256 * 1024
    with Stack(tmp_path, workers=0) as stack:
        conn = stack.conn()

        def signed_raw(body: bytes, msg_id: str) -> dict[str, str]:
            stamp = int(time.time())
            return {
                "svix-id": msg_id,
                "svix-timestamp": str(stamp),
                "svix-signature": raw_signature(msg_id, stamp, body),
                "Content-Type": "application/json",
            }

        big = b'{"type": "track.started", "pad": "' + b"x" * (limit + 10) + b'"}'
        chunks = (big[i : i + 8192] for i in range(0, len(big), 8192))
        cases = {
            "chunked, no length, over the limit, validly signed": (
                post_raw(stack.port, chunks, signed_raw(big, "msg_big"), chunked=True),
                {413, 0},
            ),
            "Content-Length far over the limit (body never sent)": (
                post_raw(
                    stack.port, b"", {**signed_raw(b"{}", "msg_len"), "Content-Length": str(10**12)}
                ),
                {413, 0},
            ),
            "deep JSON, validly signed": (
                post_raw(
                    stack.port,
                    b"[" * 100_000 + b"]" * 100_000,
                    signed_raw(b"[" * 100_000 + b"]" * 100_000, "msg_deep"),
                ),
                {400},
            ),
            "non-UTF-8 body with a signature over its bytes": (
                post_raw(
                    stack.port,
                    b'{"type": "\xff\xfe"}',
                    signed_raw(b'{"type": "\xff\xfe"}', "msg_latin"),
                ),
                {401},
            ),
            "garbled signature header": (
                post_raw(
                    stack.port,
                    b'{"type": "x"}',
                    {**signed_raw(b"{}", "msg_g"), "svix-signature": "v1,\x7f@@"},
                ),
                {400, 401},
            ),
            "huge header": (
                post_raw(stack.port, b"{}", {**signed_raw(b"{}", "msg_h"), "X-Pad": "a" * 20_000}),
                {400, 431, 0},
            ),
        }
        small = b'{"type": "track.started", "user_id": "u1"}'
        ok = post_raw(
            stack.port, iter([small[:10], small[10:]]), signed_raw(small, "msg_ok"), chunked=True
        )
        queued = inbox.depth(conn)
        web_log = (tmp_path / "web.log").read_text(errors="replace")
    print("\nbad input against gunicorn:")
    for name, (status, _) in cases.items():
        print(f"  {status:>3}  {name}")
    assert {
        name: status for name, (status, allowed) in cases.items() if status not in allowed
    } == {}
    assert ok == 202, "a small chunked, validly signed delivery is accepted"
    assert queued == 1, "only the valid delivery was queued"
    assert "Traceback" not in web_log
