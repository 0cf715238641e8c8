"""Shared by the benchmarks: Redis db 12, child processes, deadlines, events, job times."""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from instruqt_crm.engine import queueing
from instruqt_crm.journal import counters
from samples.history import history, learner_history

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
CLAIM_PREFIX = "instruqt_crm_test_db_claim:"  # shared with tests/conftest.py
WEBHOOK_PATH = "/webhooks/instruqt"
Delivery = tuple[bytes, dict[str, str]]  # a signed body and its headers


class Answer(NamedTuple):
    """One POST: the status (0 when the connection failed), its latency and when it ended."""

    status: int
    seconds: float
    ended: float  # time.monotonic()


def cpu_seconds(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """User + system CPU seconds so far of each role's processes (with their exited and
    reaped children, e.g. RQ's work horses), and of the whole machine."""
    used: dict[str, float] = {}
    for role, members in processes.items():
        total = 0.0
        for process in members:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
        used[role] = total
    machine = psutil.cpu_times()
    used["busy"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    used["total"] = sum(machine)
    used["irq"] = getattr(machine, "irq", 0.0) + getattr(machine, "softirq", 0.0)
    used["steal"] = getattr(machine, "steal", 0.0)  # taken by the host (a VM's neighbours)
    return used


def wait_until_idle(percent: float, limit: float = 300.0) -> float:
    """Wait until the machine has been at least ``percent`` % idle for 3 s (other work on a
    shared machine skews a measurement), at most ``limit`` s; the idle share seen last."""
    deadline = time.monotonic() + limit
    while True:
        idle = 100.0 - psutil.cpu_percent(interval=3)
        if idle >= percent or time.monotonic() > deadline:
            return idle


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants alive now (none if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def post_deliveries(
    port: int,
    deliveries: list[Delivery],
    clients: int,
    seconds: float | None = None,
    rate: float | None = None,
) -> list[Answer]:
    """POST deliveries in order from ``clients`` threads, each with one keep-alive
    ``http.client`` connection (a light client: its CPU competes with the server's), until
    all are sent or ``seconds`` have passed. With ``rate`` (requests/s), delivery i is due at
    start + i/rate: a client waits until then, and its latency counts from when it was due,
    so a server that falls behind is not let off by being sent less."""
    answers: list[list[Answer]] = [[] for _ in range(clients)]
    counter = iter(range(len(deliveries)))
    lock = threading.Lock()
    stop = None if seconds is None else time.monotonic() + seconds
    start = time.perf_counter()

    def client(slot: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while stop is None or time.monotonic() < stop:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            body, headers = deliveries[index]
            began = time.perf_counter()
            if rate:
                due = start + index / rate
                time.sleep(max(0.0, due - began))
                began = due
            try:
                connection.request("POST", WEBHOOK_PATH, body=body, headers=headers)
                reply = connection.getresponse()
                reply.read()
                status = reply.status
            except (OSError, http.client.HTTPException):
                status = 0
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            answers[slot].append(Answer(status, time.perf_counter() - began, time.monotonic()))
        connection.close()

    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [answer for mine in answers for answer in mine]


def fresh_redis(url: str = REDIS_URL) -> redis.Redis:
    """A connection to the benchmark database, emptied first (never db 9: the tests use it)."""
    if url.rstrip("/").endswith("/9"):
        raise SystemExit("refusing to use Redis db 9: the test suite owns it")
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    return conn


@contextlib.contextmanager
def claimed_db(url: str = REDIS_URL, wait: float = 120.0) -> Iterator[None]:
    """Hold the benchmark database the way test sessions claim theirs (tests/conftest.py keeps
    ``instruqt_crm_test_db_claim:N`` in db 0), so a concurrent pytest run never flushes it."""
    conn = redis.Redis.from_url(url)
    number = conn.connection_pool.connection_kwargs.get("db", 0)
    control = redis.Redis.from_url(url.rsplit("/", 1)[0] + "/0")
    claim, token = f"{CLAIM_PREFIX}{number}", f"bench-{os.getpid()}-{time.time()}"
    what = f"a test run to release Redis db {number}"
    wait_for(lambda: bool(control.set(claim, token, nx=True, ex=3600)), wait, what, step=1.0)
    try:
        yield
    finally:
        if control.get(claim) == token.encode():
            control.delete(claim)
        conn.flushdb()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> float:
    """Poll until ``condition()`` holds; the monotonic time it did, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Child processes in their own sessions, logging to files; all stopped on exit."""

    def __init__(self, keep_logs: bool = False) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="instruqt-bench-"))
        self.keep_logs = keep_logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str], pipe_stdout: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the project root; stderr (and stdout unless piped) to a log file."""
        log = (self.log_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE if pipe_stdout else log,
            stderr=log,
            start_new_session=True,
        )
        self.started.append((name, process))
        return process

    def python(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start ``python ARGS`` with this interpreter."""
        return self.start(name, [sys.executable, *args], env)

    def check_alive(self, may_end: Collection[str] = ()) -> None:
        """Fail loudly if any child has died (those named in ``may_end`` only if they failed)."""
        for name, process in self.started:
            code = process.poll()
            if code is not None and (name not in may_end or code != 0):
                raise RuntimeError(f"{name} exited with {code}; see {self.log(name)}")

    def log(self, name: str) -> Path:
        """A child's log file."""
        return self.log_dir / f"{name}.log"

    def stop(self) -> None:
        """SIGTERM every process group, then SIGKILL what is still there after 15 s."""
        for _, process in self.started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for _, process in self.started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # leftovers in the group (work horses)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if not self.keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)


def roles_of(
    processes: Processes, conn: redis.Redis, names: dict[str, str], own: str
) -> dict[str, list[psutil.Process]]:
    """The processes behind each part of a stack, now (work horses come and go): each child
    under ``names[its name's prefix]``, this process as ``own``, and the Redis server."""
    found: dict[str, list[psutil.Process]] = {own: [psutil.Process()]}
    for name, process in processes.started:
        role = names[name.split("-")[0]]
        found[role] = found.get(role, []) + process_tree(process.pid)
    found["redis"] = process_tree(int(conn.info("server")["process_id"]))
    return found


def first_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line a child prints on its piped stdout (within ``timeout`` s)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("the child printed nothing")
    return process.stdout.readline().decode().strip()


def realistic_events(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` events from samples/history.py (emails in params), learner after learner."""
    learners = max(1, count // 5)
    events = history(learners, seed=seed)
    while len(events) < count:
        learners *= 2
        events = history(learners, seed=seed)
    return events[:count]


def burst_events(learners: int, per_learner: int, seed: int = 7) -> list[dict[str, Any]]:
    """Exactly ``per_learner`` realistic events for each learner, shuffled across learners."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    for number in range(learners):
        mine: list[dict[str, Any]] = []
        while len(mine) < per_learner:  # more plays until there are enough events
            mine += learner_history(number, rng)
        events += mine[:per_learner]
    rng.shuffle(events)
    return events


def events_queue(conn: redis.Redis) -> Queue:
    """The one queue drain and flush jobs share."""
    return queueing.queue(queueing.QUEUE_NAME, conn)


def jobs_waiting(conn: redis.Redis) -> tuple[int, int]:
    """(queued, running) jobs over every queue the workers listen on."""
    every = queueing.queues(conn)
    return sum(q.count for q in every), sum(q.started_job_registry.count for q in every)


def handled(conn: redis.Redis) -> int:
    """Events the workers handled, whatever the outcome (the engine's own counters)."""
    events = counters.stats(conn)["events"]
    outcomes = ("merged", "parked", "skipped", "unknown", "failed")
    return sum(events.get(outcome, 0) for outcome in outcomes)


def ended_job_ids(conn: redis.Redis) -> list[str]:
    """Ids of every job that finished or failed, on any of the workers' queues."""
    registries = (FinishedJobRegistry, FailedJobRegistry)
    return [
        job_id
        for q in queueing.queues(conn)
        for registry in registries
        for job_id in registry(q.name, connection=conn, serializer=JSONSerializer).get_job_ids()
    ]


def job_spans(
    conn: redis.Redis, job_ids: Iterable[str], func: str | None = None
) -> list[tuple[float, float]]:
    """(start, end) as epoch seconds of each given job (of function ``func``) that ended."""
    jobs = Job.fetch_many(list(job_ids), connection=conn, serializer=JSONSerializer)
    return [
        (job.started_at.timestamp(), job.ended_at.timestamp())
        for job in jobs
        if job is not None and job.started_at and job.ended_at
        if func is None or job.func_name == func
    ]


def job_window(
    conn: redis.Redis, job_ids: Iterable[str], func: str | None = None
) -> tuple[float, float, int]:
    """(earliest start, latest end, jobs finished) of the given jobs (of ``func``), epoch s."""
    spans = job_spans(conn, job_ids, func)
    if not spans:
        raise RuntimeError("none of the jobs ran")
    return min(s for s, _ in spans), max(e for _, e in spans), len(spans)


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """A compact three-column table: figure, value, target/verdict."""
    width = max(len(name) for name, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    print(f"\n== {title}")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>{value_width}}  {note}")
