"""The whole service as real processes, for fault tests: receiver, workers, Redis, fake CRM.

``Stack`` starts a private redis-server (optionally with AOF), the fake HubSpot (in this
process, provisioned with the mapping's properties), optionally the fake Instruqt GraphQL
server, gunicorn with the Procfile's ``web`` configuration on a free port, and N
``python worker.py`` processes. ``post_all`` sends signed deliveries from a thread pool and
retries 503s and connection errors like Svix (same id, re-signed later). ``build_report``
compares the fake CRM with the records the history implies and counts what happened.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests
from rq.scheduler import RQScheduler

from instruqt_crm import keys
from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.engine import identity, inbox, ledger
from instruqt_crm.engine.queueing import FLUSH_JOB, QUEUE_NAME, queue
from instruqt_crm.journal import failures
from instruqt_crm.keys import text
from instruqt_crm.mapping import load_mapping
from samples.history import crm_records
from samples.signing import SECRET, signed
from tests.engine_helpers import merged_ids
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.instruqt import FakeInstruqt
from tests.processes import Workers, answers, start_web, wait_for
from tests.redis_process import RedisProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
MAPPING_PATH = "mappings/hubspot.yaml"
UPSERT = "/crm/v3/objects/contacts/batch/upsert"


class Stack:
    """Receiver + workers + Redis + fake CRM (+ fake Instruqt); a context manager."""

    def __init__(
        self,
        log_dir: Path,
        workers: int = 2,
        persistent: bool = False,
        instruqt: FakeInstruqt | None = None,
        mapping_path: str = MAPPING_PATH,
        provision_mapping: str = MAPPING_PATH,
        **env: str,
    ) -> None:
        self.log_dir = log_dir
        self.redis = RedisProcess(persistent=persistent)
        self.hubspot = FakeHubSpot()
        self.instruqt = instruqt
        self.mapping_path = mapping_path
        self.provision_mapping = provision_mapping
        self.worker_count = workers
        self.extra_env = env
        self.port = free_port()
        self.web: subprocess.Popen[bytes] | None = None
        self.workers: Workers | None = None
        self.kill_times: list[float] = []  # time.monotonic() of each SIGKILL (the fake's clock)
        self._stop_keeper = threading.Event()
        self._keeper: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The webhook endpoint."""
        return f"http://127.0.0.1:{self.port}/webhooks/instruqt"

    def env(self) -> dict[str, str]:
        """The production environment, pointed at the fakes."""
        values = {
            "INSTRUQT_WEBHOOK_SECRET": SECRET,
            "REDIS_URL": self.redis.url,
            "HUBSPOT_ACCESS_TOKEN": self.hubspot.token,
            "HUBSPOT_API_BASE": self.hubspot.url,
            "MAPPING_PATH": self.mapping_path,
            "FLUSH_WINDOW_SECONDS": "0.3",
            "FLUSH_LEASE_SECONDS": "3",
            "LOG_FORMAT": "text",
            # every learner's whole trail: which events were merged (``accounted_ids``)
            "TRACE_MAX_ENTRIES": "100000",
            "TRACE_MAX_BYTES": "100000000",
        }
        if self.instruqt is not None:
            values["INSTRUQT_API_KEY"] = self.instruqt.key
            values["INSTRUQT_TEAM_SLUG"] = self.instruqt.team
            values["INSTRUQT_GRAPHQL_URL"] = self.instruqt.url
        return {**values, **self.extra_env}

    def __enter__(self) -> Stack:
        self.redis.start()
        self.hubspot.start()
        if self.instruqt is not None:
            self.instruqt.start()
        adapter = HubSpotAdapter(self.hubspot.token, self.hubspot.url)
        mapping = load_mapping(ROOT / self.provision_mapping)
        hubspot_setup.apply(adapter, mapping, hubspot_setup.plan(adapter, mapping))
        self.web = start_web(self.port, self.env(), self.log_dir / "web.log")
        healthz = f"http://127.0.0.1:{self.port}/healthz"
        wait_for(lambda: answers(healthz), 30, "gunicorn to answer /healthz")
        self.workers = Workers(self.env(), self.worker_count, self.log_dir).__enter__()
        self._keeper = threading.Thread(target=self._keep_workers, daemon=True)
        self._keeper.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop_keeper.set()
        if self._keeper is not None:
            self._keeper.join(timeout=5)
        if self.workers is not None:
            self.workers.__exit__()
        if self.web is not None and self.web.poll() is None:
            os.killpg(self.web.pid, signal.SIGTERM)
            try:
                self.web.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.web.pid, signal.SIGKILL)
                self.web.wait()
        if self.instruqt is not None:
            self.instruqt.stop()
        self.hubspot.stop()
        self.redis.stop()

    def _keep_workers(self) -> None:
        """Like a platform's process manager: start a new worker for every one that exited."""
        assert self.workers is not None
        while not self._stop_keeper.wait(1.0):
            alive = [p for p in self.workers.processes if p.poll() is None]
            for _ in range(self.worker_count - len(alive)):
                self.workers.start_one()

    def conn(self) -> redis.Redis:
        """A fresh connection to the stack's Redis."""
        return redis.Redis.from_url(self.redis.url, socket_connect_timeout=1, socket_timeout=5)

    def kill_random_worker(self, rng: random.Random) -> None:
        """SIGKILL one running worker with its work horse (the keeper starts a replacement)."""
        assert self.workers is not None
        alive = [p for p in self.workers.processes if p.poll() is None]
        if alive:
            self.kill_times.append(time.monotonic())
            self.workers.kill(rng.choice(alive))

    def restart_redis(self, down_for: float) -> None:
        """SIGKILL redis-server (as a crash), keep it down ``down_for`` s, start it again."""
        assert self.redis.process is not None
        self.redis.process.kill()
        self.redis.process.wait(timeout=10)
        self.redis.process = None
        time.sleep(down_for)
        self.redis.start()


def settled(conn: redis.Redis) -> bool:
    """Every accepted event handled and written: nothing in the inbox (waiting or being
    handled), no contact dirty, no learner waiting for an email, no flush running.

    RQ jobs do not count: all work lives in the inbox, the ledger and the parked set, and a
    job left "started" by a worker that lost Redis mid-job (RQ clears it after its timeout)
    holds none of it.
    """
    return (
        inbox.depth(conn) == 0
        and ledger.dirty_count(conn) == 0
        and identity.parked_count(conn) == 0
        and not conn.exists(keys.FLUSH_LOCK)
    )


def state(conn: redis.Redis) -> dict[str, int]:
    """What is still waiting (printed when a scenario times out)."""
    jobs = queue(QUEUE_NAME, conn)
    oldest = ledger.dirty_since(conn, 1)
    return {
        "inbox": inbox.depth(conn),
        "jobs": jobs.count,
        "started": jobs.started_job_registry.count,
        "scheduled": jobs.scheduled_job_registry.count,
        "failed": jobs.failed_job_registry.count,
        "intermediate": int(conn.llen(jobs.intermediate_queue_key)),
        "dirty": ledger.dirty_count(conn),
        "dirty_oldest_age_s": int(time.time() - oldest[0][1]) if oldest else -1,
        "flush_mark_ttl_ms": int(conn.pttl(keys.pending_job(FLUSH_JOB))),
        "scheduler_lock_ttl_ms": int(conn.pttl(RQScheduler.get_locking_key(QUEUE_NAME))),
        "parked": identity.parked_count(conn),
        "locked": int(conn.exists(keys.FLUSH_LOCK)),
        "scheduled_jobs": ",".join(jobs.scheduled_job_registry.get_job_ids()),
    }


# ------------------------------------------------------------------ posting like Svix


@dataclass
class Posted:
    """What the receiver answered, per delivery attempt and per message id."""

    codes: Counter[int] = field(default_factory=Counter)  # every attempt's status (0 = no answer)
    accepted: set[str] = field(default_factory=set)  # ids answered 202 at least once
    seen: set[str] = field(default_factory=set)  # ids answered 202 or 200
    retried: int = 0  # attempts repeated after a 503 / connection error
    refused: Counter[str] = field(default_factory=Counter)  # final 4xx answers, by reason
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, other: Posted) -> None:
        """Fold another posting round into this one."""
        self.codes.update(other.codes)
        self.accepted |= other.accepted
        self.seen |= other.seen
        self.retried += other.retried
        self.refused.update(other.refused)


def post_all(
    url: str, pairs: Iterable[tuple[str, dict[str, Any]]], threads: int = 8, give_up: float = 60
) -> Posted:
    """POST each (svix id, body), re-signed per attempt; retry 5xx/no answer until ``give_up``."""
    posted = Posted()
    local = threading.local()
    deadline = time.monotonic() + give_up

    def deliver(pair: tuple[str, dict[str, Any]]) -> None:
        msg_id, body = pair
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        while True:
            raw, headers = signed(body, msg_id=msg_id)
            try:
                answer = session.post(url, data=raw, headers=headers, timeout=10)
                code, reason = answer.status_code, answer.json().get("reason", "")
            except (requests.RequestException, ValueError):
                code, reason = 0, "no answer"
            with posted.lock:
                posted.codes[code] += 1
                if code in (200, 202):
                    posted.seen.add(msg_id)
                if code == 202:
                    posted.accepted.add(msg_id)
                if 400 <= code < 500:
                    posted.refused[f"{code} {reason}"] += 1
                retry = (code == 0 or code >= 500) and time.monotonic() < deadline
                posted.retried += retry
            if not retry:
                return
            time.sleep(0.5)  # Svix waits longer; compressed to keep the scenario short

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(deliver, pairs))
    return posted


# ------------------------------------------------------------------ the report


def duplicated_writes(fake: FakeHubSpot, kill_times: list[float]) -> tuple[int, int]:
    """(duplicates, re-sent after a kill) among applied upsert inputs.

    A *duplicated write* is an input of a successful (200) batch upsert whose every property
    equals what earlier successful upserts already gave that contact: a write that changes
    nothing. It is counted as *re-sent after a kill* instead when a worker was SIGKILLed
    between the earlier write and this one (the flush died after HubSpot answered and before
    the ledger recorded it, so the design sends it again: at-least-once, harmless).
    """
    held: dict[str, dict[str, str]] = {}
    last_write: dict[str, float] = {}
    duplicates = after_kill = 0
    for record in list(fake.requests):
        if record.path != UPSERT or record.status != 200 or not isinstance(record.body, dict):
            continue
        for item in record.body.get("inputs", []):
            contact = str(item["id"]).lower()
            props = {k: str(v) for k, v in item["properties"].items()}
            mine = held.setdefault(contact, {})
            if all(mine.get(k) == v for k, v in props.items()):
                previous = last_write.get(contact, 0.0)
                if any(previous <= t <= record.time for t in kill_times):
                    after_kill += 1
                else:
                    duplicates += 1
            mine.update(props)
            last_write[contact] = record.time
    return duplicates, after_kill


def accounted_ids(conn: redis.Redis, emails: Iterable[str]) -> set[str]:
    """Event ids the engine can show for: merged into a learner (its trail, whose bounds the
    stack raises), parked, or in a failure."""
    ids: set[str] = set()
    for email in emails:
        ids.update(merged_ids(conn, email))
    for failure in failures.recent(conn, limit=10_000):
        ids.add(failure.message_id)
        body = failure.body()
        if isinstance(body, dict):
            ids.update(body.get("events") or [])
    for raw in conn.scan_iter(f"{keys.PREFIX}parked:*"):
        key = text(raw)
        if not key.endswith(":meta"):
            ids.update(text(event_id) for event_id in conn.hkeys(key))
    return ids


def developer_plays(pairs: Iterable[tuple[str, dict[str, Any]]]) -> set[str]:
    """Ids of the developer-play events, which the mapping skips by design (and counts)."""
    return {msg_id for msg_id, body in pairs if body.get("is_developer_play")}


def inbox_fate(conn: redis.Redis, msg_id: str) -> str:
    """Where a lost event is in the inbox: waiting, held by a consumer, or gone."""
    for entry_id, fields in conn.xrange(keys.INBOX):
        if text(fields.get(b"id", b"")) == msg_id:
            held = conn.xpending_range(keys.INBOX, inbox.GROUP, entry_id, entry_id, 1)
            owner = text(held[0]["consumer"]) if held else None
            return f"entry {text(entry_id)} " + (f"held by {owner}" if owner else "waiting")
    return "not in the inbox (handled or never kept)"


def log_trace(log_dir: Path, msg_id: str, limit: int = 6) -> str:
    """What the processes' logs say of an event (its first lines), to tell where it went."""
    lines = [
        f"{path.stem}: {line.strip()[:200]}"
        for path in sorted(log_dir.glob("*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if msg_id in line
    ]
    return "logs: " + (" | ".join(lines[:limit]) if lines else "nothing")


@dataclass
class Report:
    """One scenario's figures (see the module docstring of tests/test_faults.py)."""

    scenario: str
    events: int
    deliveries: int
    attempts: int
    accepted: int
    duplicates_200: int
    retried: int
    synced: int
    rejected: int
    reasons: list[str]
    lost: int
    wrong: int
    duplicated_writes: int
    resent_after_kill: int
    upserts: int
    seconds: float
    diffs: list[str] = field(default_factory=list)  # a few wrong records, for the failure message

    ROW = (
        "{scenario:<18} {events:>6} {deliveries:>6} {attempts:>7} {accepted:>6} {duplicates_200:>5}"
        " {retried:>6} {synced:>6} {rejected:>5} {lost:>4} {wrong:>5} {duplicated_writes:>4}"
        " {resent_after_kill:>6} {upserts:>6} {seconds:>6.1f}"
    )
    HEADER = (
        f"{'scenario':<18} {'events':>6} {'posts':>6} {'tries':>7} {'202':>6} {'200':>5}"
        f" {'retry':>6} {'synced':>6} {'rej':>5} {'lost':>4} {'wrong':>5} {'dup':>4}"
        f" {'resent':>6} {'upsert':>6} {'secs':>6}"
    )

    def row(self) -> str:
        """One table line (reasons follow on their own lines)."""
        line = self.ROW.format(**self.__dict__)
        notes = [f"    rejected: {reason}" for reason in self.reasons]
        return "\n".join([line, *notes, *(f"    WRONG {diff}" for diff in self.diffs)])


def build_report(
    scenario: str,
    stack: Stack,
    conn: redis.Redis,
    pairs: list[tuple[str, dict[str, Any]]],
    posted: Posted,
    expected: dict[str, dict[str, str]],
    started: float,
) -> Report:
    """Compare the CRM with ``expected`` (formatted) and count what happened to every event."""
    stored = crm_records(stack.hubspot.contacts)
    rejections = [f for f in failures.recent(conn, limit=10_000) if f.message_id != "flush"]
    rejected_keys = {f.message_id for f in rejections}
    synced = sum(stored.get(email) == record for email, record in expected.items())
    accounted = accounted_ids(conn, {*expected, *rejected_keys}) | developer_plays(pairs)
    missing = sorted(posted.seen - accounted)
    diffs = [
        f"lost {msg_id}: {inbox_fate(conn, msg_id)}; {log_trace(stack.log_dir, msg_id)}"
        for msg_id in missing[:5]
    ]
    wrong_emails = [
        email
        for email, record in expected.items()
        if email not in rejected_keys and stored.get(email) != record
    ]
    diffs += [
        f"{email}: "
        + ", ".join(
            f"{k} expected {v!r} got {stored.get(email, {}).get(k)!r}"
            for k, v in expected[email].items()
            if stored.get(email, {}).get(k) != v
        )
        for email in wrong_emails[:5]
    ]
    duplicates, after_kill = duplicated_writes(stack.hubspot, stack.kill_times)
    reasons = Counter(f"[{f.category}] {f.reason[:110]}" for f in rejections)
    return Report(
        scenario=scenario,
        events=len({msg_id for msg_id, _ in pairs}),
        deliveries=len(pairs),
        attempts=sum(posted.codes.values()),
        accepted=len(posted.accepted),
        duplicates_200=posted.codes[200],
        retried=posted.retried,
        synced=synced,
        rejected=len(rejected_keys),
        reasons=[f"{n} x {reason}" for reason, n in reasons.most_common()],
        lost=len(missing),
        wrong=len(wrong_emails),
        duplicated_writes=duplicates,
        resent_after_kill=after_kill,
        upserts=sum(r.path == UPSERT for r in stack.hubspot.requests),
        seconds=time.monotonic() - started,
        diffs=diffs,
    )


def print_reports(reports: Iterable[Report]) -> None:
    """The table, for ``pytest -s``."""
    print("\n" + Report.HEADER)
    for report in reports:
        print(report.row())
    sys.stdout.flush()
