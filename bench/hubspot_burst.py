"""A burst of signed webhooks through gunicorn, 2 workers and a rate-limited fake HubSpot.

    python -m bench.hubspot_burst [--scenario A|B|both] [--timeout 240] [--threads 16]
                                  [--worker-command "python worker.py"] [--direct RATE]

A: 5,000 events from 500 learners, fake limited to 100 requests / 10 s (50 ms latency),
   budget 90: counts HubSpot requests, 429s, the lag from the last accepted event to the
   last CRM write, and checks every contact against ``samples.history.expected_records``.
B: 5,000 events from 2,500 learners, fake limited to 10 / 10 s, budget 10: the drain time
   (first accepted event to last CRM write) against the least the limit allows.

Times: the fake records each request on its own ``time.monotonic()``, the same clock as
this process's on Linux, so its log is compared with the posting times directly. RQ's job
timestamps (epoch) are shifted onto that clock.

``--direct RATE`` (a what-if, not the benchmark): the events are kept with the receiver's
``inbox.enqueue_event`` from this process at RATE per second instead of being posted, as if
the receiver ran on machines of its own; the receiver still runs but gets nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.common import (
    REDIS_URL,
    Delivery,
    Processes,
    burst_events,
    claimed_db,
    cpu_seconds,
    ended_job_ids,
    free_port,
    fresh_redis,
    handled,
    job_spans,
    jobs_waiting,
    post_deliveries,
    print_table,
    process_tree,
    wait_for,
)
from bench.stack import MAPPING_PATH, FakeHubSpotProcess, start_receiver, start_workers
from instruqt_crm import keys
from instruqt_crm.crm.hubspot import format_value
from instruqt_crm.engine import identity, inbox, ledger
from instruqt_crm.engine.queueing import DRAIN_JOB, FLUSH_JOB
from samples.history import expected_records
from samples.signing import SECRET, signed

TOKEN = "bench-token"
WORKERS = 2
BATCH = 100
Row = tuple[str, str, str]


@dataclass(frozen=True)
class Scenario:
    """One burst: who sends what, and the limits it meets."""

    name: str
    learners: int
    per_learner: int
    rate: int  # the fake's limit per window
    budget: int  # HUBSPOT_REQUESTS_PER_10S
    window: float = 10.0
    latency: float = 0.05


SCENARIOS = {
    "A": Scenario("A", learners=500, per_learner=10, rate=100, budget=90),
    "B": Scenario("B", learners=2500, per_learner=2, rate=10, budget=10),
}


@dataclass
class Posted:
    """What the receiver answered: status counts and when the accepted ones came back."""

    statuses: Counter[int]
    first_accept: float
    last_accept: float
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # seconds by role while posting


@dataclass
class Outcome:
    """Everything a scenario observed, before it is turned into figures."""

    posted: Posted
    log: list[dict[str, Any]]
    contacts: dict[str, dict[str, str]]
    processed: int  # events handled (merged, parked, skipped or failed), from the stats hash
    event_spans: list[tuple[float, float]]  # drain jobs
    flush_spans: list[tuple[float, float]]
    timed_out: bool
    state: dict[str, int] = field(default_factory=dict)


def now() -> float:
    """The clock shared with the fake's request log."""
    return time.monotonic()


def post_all(port: int, deliveries: list[Delivery], threads: int) -> Posted:
    """POST every delivery to the receiver as fast as it takes them."""
    start = now()
    answers = post_deliveries(port, deliveries, threads)
    accepted = [answer.ended for answer in answers if answer.status == 202]
    statuses = Counter(answer.status for answer in answers)
    if not accepted:
        raise RuntimeError(f"the receiver accepted nothing: {dict(statuses)}")
    return Posted(statuses, min(accepted), max(accepted), now() - start)


ROLES = {"gunicorn": "receiver", "worker": "workers", "fake": "fake HubSpot"}


def roles(processes: Processes, conn: redis.Redis) -> dict[str, list[psutil.Process]]:
    """The processes behind each part of the stack, now (work horses come and go)."""
    found: dict[str, list[psutil.Process]] = {"client": [psutil.Process()]}
    for name, process in processes.started:
        role = ROLES[name.split("-")[0]]
        found[role] = found.get(role, []) + process_tree(process.pid)
    found["redis"] = process_tree(int(conn.info("server")["process_id"]))
    return found


def cpu_while(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each role used between two ``cpu_seconds`` readings, and the machine's
    busy share (0-1)."""
    used = {role: after[role] - before.get(role, 0.0) for role in after}
    used["busy"] = used["busy"] / used.pop("total") if used["total"] else 0.0
    return used


def keep_directly(conn: redis.Redis, events: list[dict[str, Any]], rate: float) -> Posted:
    """What-if: keep the events with the receiver's own ``enqueue_event``, ``rate`` per second
    (paced; no HTTP, no verification), as a receiver on machines of its own would."""
    start = now()
    moments = []
    for number, body in enumerate(events):
        delay = start + number / rate - now()
        if delay > 0:
            time.sleep(delay)
        inbox.enqueue_event(conn, f"msg_{number:06d}", body, 3600)
        moments.append(now())
    return Posted(Counter({202: len(events)}), moments[0], moments[-1], now() - start)


def state(conn: redis.Redis) -> dict[str, int]:
    """What is still waiting or running."""
    queued, running = jobs_waiting(conn)
    return {
        "inbox": inbox.depth(conn),
        "jobs_queued": queued,
        "jobs_running": running,
        "dirty": ledger.dirty_count(conn),
        "parked": identity.parked_count(conn),
        "flush_locked": int(conn.exists(keys.FLUSH_LOCK)),
    }


def settled(conn: redis.Redis) -> bool:
    """Nothing queued, running, dirty, parked or being flushed."""
    return not any(state(conn).values())


def spans(conn: redis.Redis, ids: list[str], func: str | None = None) -> list[tuple[float, float]]:
    """Job (start, end) on the monotonic clock."""
    shift = time.time() - time.monotonic()
    return [(start - shift, end - shift) for start, end in job_spans(conn, ids, func)]


def mismatches(events: list[dict[str, Any]], contacts: dict[str, dict[str, str]]) -> int:
    """Contacts that differ from the records the events imply (missing and extra included)."""
    expected = {
        email: {name: format_value(value) for name, value in record.items()}
        for email, record in expected_records(events).items()
    }
    stored = {
        email: {k: v for k, v in props.items() if k.startswith("instruqt_") or k == "email"}
        for email, props in contacts.items()
    }
    return sum(expected.get(email) != stored.get(email) for email in expected.keys() | stored)


def least_drain(
    before: list[float], start: float, upserts: int, limit: int, window: float
) -> float:
    """Least time from ``start`` to the last of ``upserts`` requests at ``limit`` per rolling
    ``window``, when requests were already sent at times ``before`` (all before ``start``)."""
    times = sorted(before)
    for _ in range(upserts):
        earliest = times[-limit] + window if len(times) >= limit else start
        times.append(max(start, earliest))
    return times[-1] - start


def shared_env(scenario: Scenario, fake: FakeHubSpotProcess) -> dict[str, str]:
    """The settings shared by the receiver and the workers."""
    return {
        "INSTRUQT_WEBHOOK_SECRET": SECRET,
        "REDIS_URL": REDIS_URL,
        "HUBSPOT_ACCESS_TOKEN": TOKEN,
        "HUBSPOT_API_BASE": fake.url,
        "HUBSPOT_REQUESTS_PER_10S": str(scenario.budget),
        "MAPPING_PATH": MAPPING_PATH,
    }


def run(scenario: Scenario, events: list[dict[str, Any]], args: argparse.Namespace) -> Outcome:
    """Start the stack, post the burst, wait until every contact is written."""
    conn = fresh_redis()
    with Processes(keep_logs=True) as processes:
        fake = FakeHubSpotProcess(
            processes, scenario.rate, scenario.window, scenario.latency, TOKEN
        )
        provisioning = fake.provision()
        env = shared_env(scenario, fake)
        port = free_port()
        start_receiver(processes, env, port)
        start_workers(processes, env, conn, WORKERS, args.worker_command)
        deliveries = (
            []
            if args.direct
            else [signed(body, msg_id=f"msg_{n:06d}") for n, body in enumerate(events)]
        )  # signed before the clock starts
        before = cpu_seconds(roles(processes, conn))
        if args.direct:
            posted = keep_directly(conn, events, args.direct)
        else:
            posted = post_all(port, deliveries, args.threads)
        posted.cpu = cpu_while(before, cpu_seconds(roles(processes, conn)))

        def done() -> bool:
            processes.check_alive()
            written = fake.control("GET", "requests")["contacts"]
            return written >= scenario.learners and settled(conn)

        try:
            wait_for(done, args.timeout, "every contact to be written", step=0.2)
            timed_out = False
        except TimeoutError:
            timed_out = True
        ended = ended_job_ids(conn)
        outcome = Outcome(
            posted,
            fake.requests_log()[provisioning:],
            fake.contacts(),
            handled(conn),
            spans(conn, ended, DRAIN_JOB),
            spans(conn, ended, FLUSH_JOB),
            timed_out,
            state(conn),
        )
        save(processes.log_dir, outcome)
    conn.flushdb()
    return outcome


def save(folder: Path, outcome: Outcome) -> None:
    """Keep the fake's request log and the final state next to the process logs."""
    (folder / "hubspot-requests.json").write_text(json.dumps(outcome.log))
    (folder / "final-state.json").write_text(json.dumps(outcome.state))
    print(f"  logs, fake's request log and final state: {folder}")


def figures(scenario: Scenario, events: list[dict[str, Any]], seen: Outcome) -> dict[str, Any]:
    """The numbers a scenario reports."""
    posted, log = seen.posted, seen.log
    upserts = [r for r in log if r["path"].endswith("/batch/upsert")]
    writes = [r["time"] for r in upserts if r["status"] in (200, 207)]
    last_write = max(writes) if writes else float("nan")
    before = [r["time"] for r in log if r["time"] < posted.first_accept]
    minimum = -(-scenario.learners // BATCH)
    bound = least_drain(before, posted.first_accept, minimum, scenario.rate, scenario.window)
    return {
        "posted": sum(posted.statuses.values()),
        "accepted": posted.statuses[202],
        "statuses": dict(posted.statuses),
        "post_rate": sum(posted.statuses.values()) / posted.seconds,
        "post_seconds": posted.seconds,
        "post_cpu": posted.cpu,
        "requests": len(log),
        "upserts": len(upserts),
        "inputs": sum(r["inputs"] for r in upserts),
        "other": len(log) - len(upserts),
        "before": len(before),
        "count_429": sum(r["status"] == 429 for r in log),
        "lag": last_write - posted.last_accept,
        "drain": last_write - posted.first_accept,
        "bound": bound,
        "min_upserts": minimum,
        "processed": seen.processed,
        "drains": len(seen.event_spans),
        "events_done": max((e for _, e in seen.event_spans), default=float("nan"))
        - posted.last_accept,
        "event_busy": sum(e - s for s, e in seen.event_spans),
        "flush_busy": sum(e - s for s, e in seen.flush_spans),
        "flushes": len(seen.flush_spans),
        "mismatches": mismatches(events, seen.contacts),
        "contacts": len(seen.contacts),
        "timed_out": seen.timed_out,
        "state": seen.state,
        "events": len(events),
    }


def cpu_note(f: dict[str, Any]) -> str:
    """Milliseconds of CPU per posted event, by role, largest first."""
    shown = {k: v for k, v in f["post_cpu"].items() if k not in ("busy", "steal") and v > 0}
    parts = [f"{role} {1000 * seconds / f['posted']:.2f}" for role, seconds in
             sorted(shown.items(), key=lambda item: -item[1])]  # fmt: skip
    return "ms/event: " + ", ".join(parts)


def verdict(ok: bool) -> str:
    """met / MISSED."""
    return "met" if ok else "MISSED"


def common_rows(f: dict[str, Any], learners: int, requests_note: str) -> list[Row]:
    """Rows both scenarios print."""
    contacts_ok = f["mismatches"] == 0 and f["contacts"] == learners
    return [
        ("events posted / accepted", f"{f['posted']}/{f['accepted']}", str(f["statuses"])),
        ("posting took", f"{f['post_seconds']:.1f} s", f"{f['post_rate']:.0f} events/s"),
        ("  CPU meanwhile", f"{100 * f['post_cpu'].get('busy', 0):.0f} % busy", cpu_note(f)),
        ("HubSpot requests (total)", str(f["requests"]), requests_note),
        ("  batch upserts / other", f"{f['upserts']}/{f['other']}", f"{f['inputs']} inputs sent"),
        ("429s received", str(f["count_429"]), f"target 0: {verdict(f['count_429'] == 0)}"),
        ("events processed", str(f["processed"]),
         f"{f['drains']} drain jobs, {f['flushes']} flush jobs"),
        ("worker busy in events / flush", f"{f['event_busy']:.0f}/{f['flush_busy']:.0f} s", ""),
        ("last accept -> last event done", f"{f['events_done']:.1f} s", "the workers' backlog"),
        ("contacts / mismatches", f"{f['contacts']}/{f['mismatches']}",
         f"target {learners}/0: {verdict(contacts_ok)}"),
        ("timed out", str(f["timed_out"]), str(f["state"]) if f["timed_out"] else ""),
    ]  # fmt: skip


def report_a(f: dict[str, Any], scenario: Scenario) -> None:
    """Scenario A's table."""
    per_event = f["requests"] / f["events"]
    note = f"{per_event:.4f}/event; target <= 100 (0.02/event): {verdict(f['requests'] <= 100)}"
    lag_ok = verdict(f["lag"] <= 5 and not f["timed_out"])
    at_least = ">= " if f["timed_out"] else ""  # the last write is still to come
    rows = common_rows(f, scenario.learners, note)
    rows += [
        ("last accept -> last write", f"{at_least}{f['lag']:.1f} s", f"target <= 5 s: {lag_ok}"),
        ("first accept -> last write", f"{at_least}{f['drain']:.1f} s", ""),
    ]  # fmt: skip
    print_table("scenario A: 5,000 events, 500 learners, fake 100/10 s + 50 ms, budget 90", rows)


def report_b(f: dict[str, Any], scenario: Scenario) -> None:
    """Scenario B's table."""
    ratio = f["drain"] / f["bound"] if f["bound"] > 0 else float("inf")
    at_least = ">= " if f["timed_out"] else ""  # the last write is still to come
    ratio_ok = verdict(ratio <= 1.3 and not f["timed_out"])
    rows = common_rows(f, scenario.learners, f"{f['requests'] / f['events']:.4f}/event")
    rows += [
        ("requests before 1st accept", str(f["before"]), "still in the window at the start"),
        ("lower bound", f"{f['bound']:.1f} s", f"{f['min_upserts']} upserts + those, 10 per 10 s"),
        ("drain: 1st accept -> last write", f"{at_least}{f['drain']:.1f} s", ""),
        ("ratio drain / bound", f"{at_least}{ratio:.2f}", f"target <= 1.3: {ratio_ok}"),
        ("last accept -> last write", f"{f['lag']:.1f} s", ""),
    ]  # fmt: skip
    print_table("scenario B: 5,000 events, 2,500 learners, fake 10/10 s + 50 ms, budget 10", rows)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["A", "B", "both"], default="both")
    parser.add_argument("--threads", type=int, default=16, help="posting threads (default 16)")
    parser.add_argument(
        "--direct",
        type=float,
        metavar="RATE",
        help="what-if: keep events directly at RATE/s with the receiver's enqueue, no HTTP",
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for sync")
    parser.add_argument(
        "--worker-command", default=None, help="instead of the Procfile's worker command"
    )
    args = parser.parse_args(argv)
    chosen = ["A", "B"] if args.scenario == "both" else [args.scenario]
    with claimed_db():
        for name in chosen:
            scenario = SCENARIOS[name]
            print(f"scenario {name}: fake HubSpot, gunicorn (Procfile), {WORKERS} workers")
            events = burst_events(scenario.learners, scenario.per_learner)
            found = figures(scenario, events, run(scenario, events, args))
            (report_a if name == "A" else report_b)(found, scenario)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
