"""How much Redis memory learners cost: per learner (kept while active), per event (transient).

LEARNERS x EVENTS realistic events (samples/history.py, emails in the parameters) are kept in
the inbox with the receiver's own ``inbox.enqueue_event`` (dedupe marks included) and handled
by one real ``python worker.py`` into a private ``redis-server``, flushing to the fake HubSpot
(a child process). Then every key is measured with ``MEMORY USAGE`` and grouped by family.

Baseline, same run: each learner's state written as the JSON hash earlier versions kept
(``c:``/``s:`` fields per property, email, user id, version), measured the same way, plus
the ids of its events, which they kept for ever.

Then every learner's state is dropped (what ``STATE_IDLE_DAYS`` does to learners who went
quiet) and one more event per learner arrives: the CRM reads and the time that return costs.

    python -m bench.redis_memory [--learners 10000] [--events 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import redis

from bench.common import ROOT, Processes, burst_events, free_port, print_table, wait_for
from bench.stack import MAPPING_PATH, FakeHubSpotProcess, clean_env, start_workers
from instruqt_crm import keys
from instruqt_crm.engine import inbox, ledger
from instruqt_crm.events import format_timestamp, parse_timestamp
from instruqt_crm.keys import text
from instruqt_crm.mapping import load_mapping

TOKEN = "pat-bench-memory"
STATE = ("learner", "schema", "identity")  # kept while the learner is active
TARGET_STATE, TARGET_ALL = 500, 2500  # bytes per learner
MAPPING = load_mapping(ROOT / MAPPING_PATH)


def family(key: str) -> str:
    """A key's family: its first part after the prefix (``contact:events`` for event ids)."""
    if not key.startswith(keys.PREFIX):
        return "rq" if key.startswith("rq:") else "other"
    rest = key[len(keys.PREFIX) :]
    name = rest.split(":", 1)[0]
    return "contact:events" if name == "contact" and rest.endswith(":events") else name


def measure(conn: redis.Redis) -> dict[str, list[int]]:
    """Per family: [keys, bytes, keys with a TTL]."""
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    names = [text(k) for k in conn.scan_iter(count=2000)]
    with conn.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.memory_usage(name, samples=0)
            pipe.ttl(name)
        replies = pipe.execute()
    for index, name in enumerate(names):
        size, ttl = replies[2 * index], replies[2 * index + 1]
        row = found[family(name)]
        row[0] += 1
        row[1] += int(size or 0)
        row[2] += int(ttl > 0)
    return dict(found)


def legacy_bytes(conn: redis.Redis, scratch: redis.Redis) -> int:
    """The learners' state as earlier versions kept it (one JSON hash each), in bytes. Count
    cells held the values (``id-consul-mesh/ch0``): the 16-character fingerprints stand in
    for them."""
    scratch.flushdb()
    total = 0
    for raw in conn.scan_iter(f"{keys.PREFIX}learner:*", count=2000):
        key = text(raw)[len(keys.PREFIX) + len("learner:") :]
        state = ledger.state(conn, key)
        fields: dict[str, str] = {"email": state.email or key, "version": str(state.version)}
        if state.user_id:
            fields["user_id"] = state.user_id
        for name, cell in state.cells.items():
            fields[f"c:{name}"] = json.dumps(cell, sort_keys=True, separators=(",", ":"))
            value = ledger.current_values(state, MAPPING).get(name)
            if value is not None:
                fields[f"s:{name}"] = json.dumps(value)
        scratch.hset(keys.contact(key), mapping=fields)
        total += int(scratch.memory_usage(keys.contact(key), samples=0) or 0)
    scratch.flushdb()
    return total


@contextmanager
def private_redis(processes: Processes) -> Iterator[str]:
    """A redis-server of our own (nothing on disk), its URL."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    processes.start("redis", argv, clean_env())
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: _pings(url), 20, "redis-server to answer")
    yield url


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.ConnectionError:
        return False


def settled(conn: redis.Redis, events: int) -> bool:
    """Every event handled, nothing dirty, the inbox empty."""
    handled = sum(
        int(v) for k, v in conn.hgetall(keys.STATS).items() if text(k).count(":") == 1
        and text(k).startswith("events:")
    )  # fmt: skip
    return handled >= events and ledger.dirty_count(conn) == 0 and inbox.depth(conn) == 0


def returning_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One later event per learner: each one's last event again, a day later."""
    last: dict[str, dict[str, Any]] = {}
    for event in events:
        last[event["user_id"]] = event
    later = []
    for event in last.values():
        moment = parse_timestamp(event["timestamp"]) + timedelta(days=1)
        later.append({**event, "timestamp": format_timestamp(moment)})
    return later


def run(learners: int, per_learner: int) -> None:
    events = burst_events(learners, per_learner)
    with Processes() as processes, private_redis(processes) as url:
        conn = redis.Redis.from_url(url)
        fake = FakeHubSpotProcess(processes, 100_000, 10.0, 0.0, TOKEN)
        fake.provision()
        env = {
            "REDIS_URL": url,
            "HUBSPOT_ACCESS_TOKEN": TOKEN,
            "HUBSPOT_API_BASE": fake.url,
            "HUBSPOT_REQUESTS_PER_10S": "100000",
            "INSTRUQT_WEBHOOK_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        }
        started = time.monotonic()
        for number, body in enumerate(events):
            inbox.enqueue_event(conn, f"msg_{number:08d}_{'x' * 16}", body, 72 * 3600)
        start_workers(processes, env, conn, 1)
        wait_for(lambda: settled(conn, len(events)), 1800, "the worker to handle every event", 1.0)
        handled_in = time.monotonic() - started
        found = measure(conn)
        legacy = legacy_bytes(conn, redis.Redis.from_url(url.replace("/0", "/1")))
        reads_before = sum(r["path"].endswith("/batch/read") for r in fake.requests_log())
        dropped = conn.delete(*[k for k in conn.scan_iter(f"{keys.PREFIX}learner:*")])
        later = returning_events(events)
        started = time.monotonic()
        for number, body in enumerate(later):
            inbox.enqueue_event(conn, f"back_{number:08d}", body, 72 * 3600)
        wait_for(lambda: settled(conn, len(events) + len(later)), 1800, "the returns", 1.0)
        returned_in = time.monotonic() - started
        reads = sum(r["path"].endswith("/batch/read") for r in fake.requests_log()) - reads_before
    report(found, legacy, learners, len(events), handled_in, dropped, reads, returned_in)


def report(
    found: dict[str, list[int]],
    legacy: int,
    learners: int,
    events: int,
    handled_in: float,
    returning: int,
    reads: int,
    returned_in: float,
) -> None:
    total = sum(row[1] for row in found.values())
    state = sum(found.get(name, [0, 0, 0])[1] for name in STATE)
    old = legacy + found.get("contact:events", [0, 0, 0])[1]  # event ids had no TTL then
    rows = [
        (name, f"{n} keys ({ttl} with TTL)", f"{size / learners:,.0f} B/learner, "
         f"{size / events:,.0f} B/event")
        for name, (n, size, ttl) in sorted(found.items(), key=lambda item: -item[1][1])
    ]  # fmt: skip
    print_table(f"Redis after {learners:,} learners x {events // learners} events", rows)
    summary = [
        ("state kept per learner (learner + schema + identity)", f"{state / learners:,.0f} B",
         f"target ≤ {TARGET_STATE} B"),
        ("the same state as earlier versions kept it (same run)", f"{old / learners:,.0f} B",
         f"ratio {state / old:.2f}" if old else "-"),
        ("everything, per learner (default retention)", f"{total / learners:,.0f} B",
         f"target ≤ {TARGET_ALL:,} B"),
        ("transient, per event", f"{(total - state) / events:,.0f} B", "before TTLs"),
        ("events handled", f"{events:,} in {handled_in:.0f} s", "1 worker"),
        ("returning learners (state dropped)", f"{returning:,} in {returned_in:.0f} s",
         f"{reads} CRM reads = {100 * reads / max(returning, 1):.2f} per 100 (target ≤ 1)"),
    ]  # fmt: skip
    print_table("Summary", summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learners", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=10, help="events per learner")
    args = parser.parse_args()
    run(args.learners, args.events)


if __name__ == "__main__":
    sys.exit(main())
