"""``instruqt-crm backfill`` of 20,000 past plays through the workers to a rate-limited fake
HubSpot, with a live event posted mid-way.

    python -m bench.backfill [--rps 10] [--workers 2] [--timeout 900]

The test fake of Instruqt (in this process, 0.02 s per request) serves 20,000 plays of 5,000
learners over 2025, every learner with an email in the team's details; the fake HubSpot (a
child process) allows 100 requests / 10 s with 50 ms latency. The receiver (the Procfile's
``web``) and the workers (its ``worker``) run as processes, and the command as a user runs
it. A live event for a new learner is posted before the backfill (the baseline) and once
half the report's pages were read; each is timed from its POST until the fake HubSpot holds
the contact with the values it implies. Exit 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    REDIS_URL,
    Processes,
    claimed_db,
    cpu_seconds,
    ended_job_ids,
    free_port,
    fresh_redis,
    handled,
    post_deliveries,
    print_table,
    roles_of,
    wait_for,
)
from bench.hubspot_burst import least_drain, spans, state, verdict
from bench.stack import MAPPING_PATH, FakeHubSpotProcess, clean_env, start_receiver, start_workers
from instruqt_crm.engine import inbox, ledger
from instruqt_crm.engine.queueing import DRAIN_JOB
from instruqt_crm.events import format_timestamp
from instruqt_crm.ops.backfill import PAGE_SIZE, Plan
from samples.history import crm_records, expected_in_crm, expected_records
from samples.signing import SECRET, signed
from tests.fakes.instruqt import KINDS, Answer, FakeInstruqt, report_item

TEAM, KEY, TOKEN = "acme", "bench-instruqt-key", "bench-token"
SINCE, UNTIL = datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)
TRACKS, CLI = 20, "backfill"
RATE, WINDOW, LATENCY, BUDGET = 100, 10.0, 0.05, 90  # the fake's limit; HUBSPOT_REQUESTS_PER_10S
LIVE_TARGET, WRITE_TARGET = 5.0, 1.1
LIVE_LEARNERS = (90_001, 90_002)  # posted before the backfill, and mid-way
ROLES = {"gunicorn": "receiver", "worker": "workers", "fake": "fake HubSpot", CLI: "cli"}
COUNTS = ("instruqt_challenges_completed_count", "instruqt_tracks_completed_count")
Row = tuple[str, str, str]


@dataclass
class Team:
    """The generated team: report items, details, challenges, tracks and expected counts."""

    items: list[dict[str, Any]]
    details: dict[str, dict[str, str]]
    challenges: dict[str, list[dict[str, Any]]]  # track id -> {"id", "slug", "index"}
    tracks: dict[str, str]  # slug -> id
    expected: dict[str, tuple[int, int]]  # email -> (challenges, tracks) completed


def make_team(plays: int, learners: int, seed: int = 18) -> Team:
    """Completed, stopped and running plays (2-6 challenges per track), some reviews, a few
    developer plays; every learner's first play is a normal one."""
    rng = random.Random(seed)
    tracks = {f"track-{n:02d}": f"trk{n:02d}" for n in range(TRACKS)}
    ids = {t: [f"{t}-ch{i}" for i in range(1, rng.randint(2, 6) + 1)] for t in tracks.values()}
    users = [f"learner-{n:05d}" for n in range(learners)]
    details = {u: {"email": f"{u}@acme.example", "firstName": "Ada", "lastName": u} for u in users}
    pairs: dict[str, set[str]] = {u: set() for u in users}
    finished: dict[str, set[str]] = {u: set() for u in users}
    items = []
    for n in range(plays):
        user = users[n] if n < learners else rng.choice(users)
        slug = rng.choice(sorted(tracks))
        track_id, total = tracks[slug], len(ids[tracks[slug]])
        outcome = rng.choices(["completed", "stopped", "running"], weights=[5, 3, 2])[0]
        done = total if outcome == "completed" else rng.randint(0, total - 1)
        developer = n >= learners and rng.random() < 0.02
        if not developer:  # the first `done` challenges, by index; tracks at 100 %
            pairs[user] |= {f"{track_id}/{challenge}" for challenge in ids[track_id][:done]}
            finished[user] |= {slug} if done == total else set()
        reviewed = outcome == "completed" and rng.random() < 0.2
        items.append(
            report_item(
                f"play-{n:06d}", user,
                format_timestamp(SINCE + timedelta(seconds=rng.randrange(365 * 86400))),
                track_id=track_id, track_slug=slug, invite_id=f"invite-{n % 7}",
                completion_percent=100.0 if done == total else round(100 * done / total, 1),
                total_challenges=total, completed_challenges=done,
                time_spent=rng.randint(300, 7200),
                stopped_reason="expired" if outcome == "stopped" else None,
                mode="DEVELOPER" if developer else "NORMAL",
                review=(rng.randint(1, 5), "useful") if reviewed else None,
            )
        )  # fmt: skip
    challenges = {
        t: [{"id": c, "slug": f"step-{i}", "index": i} for i, c in enumerate(found, 1)]
        for t, found in ids.items()
    }
    expected = {details[u]["email"]: (len(pairs[u]), len(finished[u])) for u in users}
    return Team(items, details, challenges, tracks, expected)


def report_requests(team: Team) -> int:
    """The play report requests the command makes: the total, then each window's pages."""
    starts = [datetime.fromisoformat(item["startedAt"]) for item in team.items]
    pages = 1
    for begin, end in Plan(TEAM, SINCE, UNTIL).windows():
        pages += max(1, math.ceil(sum(begin <= moment < end for moment in starts) / PAGE_SIZE))
    return pages


class TimedInstruqt(FakeInstruqt):
    """The test fake, noting when it answered each request, of which kind and with what."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.answered: list[tuple[float, str, int]] = []

    def answer(self, authorization: str | None, raw: bytes) -> Answer:
        status, body, headers = super().answer(authorization, raw)
        kind = next((k for fragment, k in KINDS if fragment.encode() in raw), "other")
        self.answered.append((time.monotonic(), kind, status))
        return status, body, headers


def live_event(number: int) -> tuple[str, dict[str, Any]]:
    """A track completion of a learner new to the service, the email in its parameters."""
    email = f"learner{number:05d}@example.com"  # the shape samples.history.expected_records reads
    body = {
        "type": "track.completed", "timestamp": format_timestamp(datetime.now(UTC)),
        "user_id": f"user{number:05d}", "track_slug": "live-track", "track_id": "id-live-track",
        "participant_id": f"live-play-{number}", "organization_id": TEAM,
        "is_developer_play": False, "duration": 600, "custom_parameters": {"email": email},
    }  # fmt: skip
    return email, body


@dataclass
class Live:
    """One live event: seconds from its POST to the right contact, and the backfill then."""

    seconds: float
    lane: int  # backfill events waiting when it was posted
    held: int  # backfill learners held then
    reading: bool  # whether the command was still reading


def live_sync(conn: redis.Redis, fake: FakeHubSpotProcess, port: int, number: int) -> Live:
    """POST one signed live event; wait (60 s at most) until the contact holds its values."""
    email, body = live_event(number)
    expected = expected_in_crm(expected_records([body]))[email]
    delivery = signed(body, msg_id=f"msg_live_{number}")
    lane, held = inbox.depth(conn, inbox.BACKFILL), ledger.held_count(conn)
    reading = inbox.backfill_reading(conn)
    start = time.monotonic()
    answer = post_deliveries(port, [delivery], 1)[0]
    if answer.status != 202:
        raise RuntimeError(f"the receiver answered {answer.status} to the live event")
    try:
        synced = wait_for(
            lambda: crm_records(fake.contacts()).get(email) == expected, 60, email, step=0.05
        )
    except TimeoutError:
        synced = math.inf
    return Live(synced - start, lane, held, reading)


class Watch:
    """The running command: when it exited, and the deepest the backfill lane was seen."""

    def __init__(
        self, processes: Processes, conn: redis.Redis, command: list[str], env: dict[str, str]
    ):
        self.processes, self.conn = processes, conn
        self.started = time.monotonic()
        self.cli = processes.start(CLI, command, env)
        self.ended = math.nan
        self.deepest = 0

    def exited(self) -> bool:
        """Whether the command ended (with 0: a failure, or a server's, raises)."""
        self.processes.check_alive(may_end=(CLI,))
        self.deepest = max(self.deepest, inbox.depth(self.conn, inbox.BACKFILL))
        if math.isnan(self.ended) and self.cli.poll() is not None:
            self.ended = time.monotonic()
        return not math.isnan(self.ended)


def settled(conn: redis.Redis) -> bool:
    """Nothing waits in either lane, is held, dirty, parked, queued or being flushed."""
    if inbox.depth(conn, inbox.BACKFILL) or ledger.held_count(conn):
        return False
    return not any(state(conn).values())


@dataclass
class Run:
    """What one run observed (times on this process's monotonic clock, the fakes' too)."""

    watch: Watch
    live: tuple[Live, Live]  # before the backfill, mid-way
    log: list[dict[str, Any]]  # the fake HubSpot's requests after provisioning
    contacts: dict[str, dict[str, str]]
    instruqt: list[tuple[float, str, int]]  # (answered, kind, status)
    drains: list[tuple[float, float]]  # drain jobs after the start
    events: int
    output: str  # the command's
    cpu: dict[str, float]
    timed_out: bool


def run(team: Team, args: argparse.Namespace) -> Run:
    """Start the stack, time a live event, run the command, time one mid-way, wait for sync."""
    conn = fresh_redis()
    live = {f"user{n:05d}": {"email": live_event(n)[0]} for n in LIVE_LEARNERS}  # invited
    instruqt = TimedInstruqt(
        key=KEY, team=TEAM, details={**team.details, **live}, plays=team.items,
        challenges=team.challenges, tracks=team.tracks,
    )  # fmt: skip
    instruqt.delay = 0.02
    half = report_requests(team) // 2
    with instruqt, Processes(keep_logs=True) as processes:
        fake = FakeHubSpotProcess(processes, RATE, WINDOW, LATENCY, TOKEN)
        provisioning = fake.provision()
        env = {
            "INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": REDIS_URL, "MAPPING_PATH": MAPPING_PATH,
            "HUBSPOT_ACCESS_TOKEN": TOKEN, "HUBSPOT_API_BASE": fake.url,
            "HUBSPOT_REQUESTS_PER_10S": str(BUDGET), "INSTRUQT_API_KEY": KEY,
            "INSTRUQT_TEAM_SLUG": TEAM, "INSTRUQT_GRAPHQL_URL": instruqt.url,
        }  # fmt: skip
        port = free_port()
        start_receiver(processes, env, port)
        start_workers(processes, env, conn, args.workers)
        print(f"  {args.workers} workers (the Procfile's worker); logs in {processes.log_dir}")
        before = live_sync(conn, fake, port, LIVE_LEARNERS[0])
        command = [str(Path(sys.executable).parent / "instruqt-crm"), "backfill"]
        command += ["--since", f"{SINCE:%Y-%m-%d}", "--until", f"{UNTIL:%Y-%m-%d}"]
        command += ["--requests-per-second", f"{args.rps:g}"]
        print(f"  $ {' '.join(command[1:])}")
        cpu_before, reaped = cpu_seconds(roles_of(processes, conn, ROLES, "bench")), children_cpu()
        watch = Watch(processes, conn, command, clean_env(**env))

        def half_read() -> bool:
            return watch.exited() or instruqt.reports_calls >= half

        wait_for(half_read, args.timeout, "half the report's pages to be read", step=0.05)
        if watch.exited():
            raise RuntimeError("the command ended before half the report was read")
        mid = live_sync(conn, fake, port, LIVE_LEARNERS[1])
        learners = len(team.expected) + len(LIVE_LEARNERS)

        def done() -> bool:
            if not watch.exited():
                return False
            return fake.control("GET", "requests")["contacts"] >= learners and settled(conn)

        try:
            wait_for(done, args.timeout, "every contact to be written", step=0.2)
            timed_out = False
        except TimeoutError:
            timed_out = True
            print(f"  timed out; state: {state(conn)}, held {ledger.held_count(conn)}")
        cpu_after = cpu_seconds(roles_of(processes, conn, ROLES, "bench"))
        cpu = cpu_used(cpu_before, cpu_after, children_cpu() - reaped)
        drains = spans(conn, ended_job_ids(conn), DRAIN_JOB)
        seen = Run(
            watch, (before, mid), fake.requests_log()[provisioning:], fake.contacts(),
            list(instruqt.answered), [job for job in drains if job[0] > watch.started],
            handled(conn), processes.log(CLI).read_text(), cpu, timed_out,
        )  # fmt: skip
        (processes.log_dir / "hubspot-requests.json").write_text(json.dumps(seen.log))
    conn.flushdb()
    return seen


def children_cpu() -> float:
    """User + system CPU seconds of this process's children that ended and were reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_used(before: dict[str, float], after: dict[str, float], cli: float) -> dict[str, float]:
    """CPU seconds by role between two readings (the command's from its rusage, once reaped);
    ``other``: the rest of the machine's busy time (work next door)."""
    used = {role: after[role] - before.get(role, 0.0) for role in after}
    used["cli"] = cli
    total, busy = used.pop("total"), used.pop("busy")
    used["other"] = busy - sum(v for k, v in used.items() if k != "steal")
    used["busy %"] = 100 * busy / total if total else 0.0
    return used


def mismatched(team: Team, contacts: dict[str, dict[str, str]]) -> tuple[int, int]:
    """(learners missing from the fake, learners whose two counts differ from the plays')."""
    found = {
        email: [props.get(name) or "0" for name in COUNTS] for email, props in contacts.items()
    }
    missing = sum(email not in found for email in team.expected)
    wrong = sum(
        found[email] != [str(challenges), str(tracks)]
        for email, (challenges, tracks) in team.expected.items()
        if email in found
    )
    return missing, wrong


def figures(team: Team, seen: Run, rps: float) -> dict[str, Any]:
    """The numbers the table shows."""
    start = seen.watch.started
    live_emails = {live_event(n)[0] for n in LIVE_LEARNERS}
    log = [r for r in seen.log if r["time"] >= start]
    upserts = [
        r for r in log
        if r["path"].endswith("/batch/upsert") and r["status"] in (200, 207)
        and any(i.get("id") not in live_emails for i in (r["body"] or {}).get("inputs", []))
    ]  # fmt: skip
    reads = sum(r["path"].endswith("/batch/read") for r in log)
    answered = [(t, kind, status) for t, kind, status in seen.instruqt if t >= start]
    reading = [t for t, kind, _ in answered if kind != "user"]  # the command's requests
    floor = (len(reading) - 1) / rps  # the pacing's least: one request per 1/R s
    before = [r["time"] for r in seen.log if r["time"] < start + floor]
    minimum = math.ceil(len(team.expected) / 100)
    last_write = max((r["time"] for r in upserts), default=math.nan)
    missing, wrong = mismatched(team, seen.contacts)
    drain_span = max((e for _, e in seen.drains), default=math.nan) - min(
        (s for s, _ in seen.drains), default=math.nan
    )
    return {
        "plays": len(team.items), "learners": len(team.expected), "floor": floor,
        "reading": max(reading) - min(reading), "last_answer": max(reading),
        "kinds": dict(Counter(kind for _, kind, _ in answered)),
        "errors": sum(status == 429 or status >= 500 for _, _, status in answered),
        "cli": seen.watch.ended - start, "deepest": seen.watch.deepest,
        "drain_rate": seen.events / drain_span, "drain_jobs": len(seen.drains),
        "drain_busy": sum(e - s for s, e in seen.drains),
        "upserts": len(upserts), "inputs": sum(r["inputs"] for r in upserts), "reads": reads,
        "minimum": minimum, "count_429": sum(r["status"] == 429 for r in seen.log),
        "total": last_write - start, "tail": last_write - max(reading),
        "flush": last_write - min((r["time"] for r in upserts), default=math.nan),
        "bound": floor + least_drain(before, start + floor, minimum, RATE, WINDOW),
        "bound_reads": floor + least_drain(before, start + floor, minimum + reads, RATE, WINDOW),
        "missing": missing, "wrong": wrong,
    }  # fmt: skip


def summary_figure(output: str, label: str) -> str:
    """A figure from the command's summary (``plays read``, ``events queued``)."""
    lines = (line.split() for line in output.splitlines() if line.strip().startswith(label))
    return next((words[-1] for words in lines), "?")


def report(f: dict[str, Any], seen: Run, rps: float) -> list[str]:
    """Print the table; the targets missed."""
    (before, mid), cpu = seen.live, seen.cpu
    checks = {
        "live event mid-backfill <= 5 s": mid.seconds <= LIVE_TARGET,
        f"write requests <= {WRITE_TARGET:g} x {f['minimum']}": f["upserts"]
        <= WRITE_TARGET * f["minimum"],
        "HubSpot 429s = 0": f["count_429"] == 0,
        "every contact, right counts": not (f["missing"] or f["wrong"] or seen.timed_out),
    }
    ok = [verdict(passed) for passed in checks.values()]
    parts = sorted((k for k in cpu if k != "busy %" and cpu[k] >= 0.5), key=lambda k: -cpu[k])
    rows: list[Row] = [
        ("plays read (the command's summary)", summary_figure(seen.output, "plays read"),
         f"of {f['plays']}; events queued {summary_figure(seen.output, 'events queued')}"),
        ("reading: 1st -> last Instruqt answer", f"{f['reading']:.1f} s",
         f"{f['plays'] / f['reading']:.0f} plays/s; pacing floor {f['floor']:.1f} s at {rps:g}/s"),
        ("Instruqt requests", str(sum(f["kinds"].values())),
         f"{f['kinds']}; 429/5xx: {f['errors']}"),
        ("command ran", f"{f['cli']:.1f} s", "start -> exit"),
        ("events handled", str(seen.events),
         f"{f['drain_rate']:.0f}/s over {f['drain_jobs']} drain jobs (busy "
         f"{f['drain_busy']:.0f} s); lane seen at most {f['deepest']}"),
        ("live event, no backfill", f"{before.seconds:.2f} s", "POST -> right contact in the fake"),
        ("live event, mid-backfill", f"{mid.seconds:.2f} s",
         f"lane {mid.lane}, held {mid.held}, reading {mid.reading}; target <= 5 s: {ok[0]}"),
        ("HubSpot write requests", str(f["upserts"]),
         f"{f['inputs']} inputs; minimum {f['minimum']}, target <= {WRITE_TARGET:g}x: {ok[1]}"),
        ("  batch reads / 429s", f"{f['reads']}/{f['count_429']}", f"429 target 0: {ok[2]}"),
        ("total: command start -> last write", f"{f['total']:.1f} s",
         f"bound {f['bound']:.1f} s (x{f['total'] / f['bound']:.2f}); with the reads "
         f"{f['bound_reads']:.1f} s (x{f['total'] / f['bound_reads']:.2f})"),
        ("  last Instruqt answer -> last write", f"{f['tail']:.1f} s", "workers' tail, flush"),
        ("  1st -> last backfill write", f"{f['flush']:.1f} s",
         f"{f['flush'] / max(1, f['upserts'] - 1):.2f} s per batch (a read and an upsert)"),
        ("contacts missing / counts wrong", f"{f['missing']}/{f['wrong']}",
         f"of {f['learners']}; target 0/0: {ok[3]}"),
        ("CPU while it ran", f"{cpu['busy %']:.0f} % busy",
         ", ".join(f"{k} {cpu[k]:.0f} s" for k in parts)),
    ]  # fmt: skip
    title = f"backfill: {f['plays']:,} plays of {f['learners']:,} learners, R = {rps:g}/s, "
    print_table(title + f"fake HubSpot {RATE}/{WINDOW:g} s + {LATENCY * 1000:.0f} ms", rows)
    return [name for name, passed in checks.items() if not passed]


def main(argv: list[str] | None = None) -> int:
    """Generate the team, run the backfill, print the table; 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rps", type=float, default=10.0, help="--requests-per-second (10)")
    parser.add_argument("--workers", type=int, default=2, help="python worker.py processes (2)")
    parser.add_argument("--plays", type=int, default=20_000)
    parser.add_argument("--learners", type=int, default=5_000)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait per phase")
    args = parser.parse_args(argv)
    team = make_team(args.plays, args.learners)
    print(f"backfill: {len(team.items)} plays, {len(team.expected)} learners, "
          f"{report_requests(team)} report requests; budget {BUDGET}")  # fmt: skip
    with claimed_db():
        seen = run(team, args)
    missed = report(figures(team, seen, args.rps), seen, args.rps)
    for name in missed:
        print(f"  MISSED: {name}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
