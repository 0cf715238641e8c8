"""Receiver load benchmark: the Procfile's ``web`` line against the simplest Flask deploy.

    python -m bench.receiver [--seconds 8] [--warmup 2] [--clients 16] [--rounds 3]
        [--noise-us 25] [--repeats 2]

Two targets on 127.0.0.1, in the same run, alternating (bare, production, bare, ...) so that
a change in the machine's background load hits both:

- **bare**: a Flask route that answers 202 to any POST without reading Redis
  (``bare_app`` below) on gunicorn's defaults: ``gunicorn -w 2``, sync workers (one request
  at a time each, no keep-alive), no access log. The simplest way to deploy a Flask app.
- **production**: ``app:app`` under the Procfile's ``web`` command (2 processes of one
  thread each that keep connections alive, its timeouts and logger), production settings
  (JSON logs, 256 KiB limit, 30 h dedupe) and a private redis-server
  (tests/redis_process.py, AOF off). No worker runs: this measures the receiver only.

Two phases, each of ``--rounds`` alternating rounds: **throughput**, ``--clients`` threads
(one ``http.client`` connection each) posting as fast as answers come; then **latency** at
half the bare target's throughput (the median of its rounds), paced: request i is due at
start + i/rate and its latency counts from then, so a server that falls behind is not let
off by being sent less. Every delivery is pre-signed with its own svix-id (each is verified,
deduped and kept). It prints requests/s, p50 and p99 with the CPU time per request of the
client, the gunicorn processes and redis-server and the machine's idle share, then the
targets: throughput production/bare >= 0.5 (median of the rounds' ratios) and p99 at half
the bare maximum <= 2x bare's. Exit 1 if either is missed. Before each target it waits (up
to 5 min) until the machine has been ``--idle`` % idle for 3 s; the ``other`` column still
shows what other processes took meanwhile, and ``steal`` what the VM's host took. A round
in which either passed ``--noise-us`` (25 µs) per request in either target is measured
again, up to ``--repeats`` (2) times: a p99 over 8 s is decided by whether one stall of the
host fell into it. wrk is not needed (nor used).

What-ifs: ``--env WEB_CONCURRENCY=3`` (or any setting, for both targets) and
``--web-command "gunicorn app:app ..."`` (instead of the Procfile's line; keep ``app:app``).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from flask import Flask

from bench.common import (
    WEBHOOK_PATH,
    Delivery,
    cpu_seconds,
    post_deliveries,
    process_tree,
    wait_until_idle,
)

ROOT = Path(__file__).resolve().parent.parent
CPU_ROLES = ("client", "gunicorn", "redis", "irq", "steal", "other")
bare_app = Flask(__name__)


@bare_app.post(WEBHOOK_PATH)
def bare_route() -> tuple[str, int]:
    """The baseline: a Flask route that accepts anything."""
    return '{"status":"queued"}', 202


@dataclass
class Result:
    """Throughput, latency and CPU cost of one target in one round."""

    name: str
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_us: dict[str, float] = field(default_factory=dict)  # per request, by role; idle %

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return self.requests / self.seconds

    def line(self) -> str:
        """One table row."""
        cpu = " ".join(f"{self.cpu_us.get(role, 0):>7.0f}" for role in CPU_ROLES)
        return (
            f"{self.name:<12} {self.rps:>7.0f} {self.p50_ms:>7.1f} {self.p99_ms:>7.1f}"
            f" {self.requests:>7} {self.errors:>6} {cpu} {self.cpu_us.get('idle %', 0):>6.0f}"
        )


HEADER = (
    f"{'target':<12} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'ok':>7} {'errors':>6} "
    + " ".join(f"{role:>7}" for role in CPU_ROLES)
    + f" {'idle %':>6}\n{'':<51}(CPU us per request, user + system)"
)


def cpu_per_request(
    before: dict[str, float], after: dict[str, float], requests: int
) -> dict[str, float]:
    """Microseconds of CPU per request by role, idle %.

    ``irq``: the kernel's interrupt work (loopback packets), not charged to any process;
    ``steal``: time the VM's host gave to others; ``other``: every other process.
    """
    delta = {key: after[key] - before[key] for key in after}
    roles = {role: delta.get(role, 0.0) for role in CPU_ROLES[:-1]}
    roles["other"] = max(0.0, delta["busy"] - sum(roles.values()))
    result = {role: seconds / max(requests, 1) * 1e6 for role, seconds in roles.items()}
    result["idle %"] = 100 * (1 - delta["busy"] / delta["total"]) if delta["total"] else 0.0
    return result


def procfile_web() -> str:
    """The Procfile's ``web`` command."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == "web":
            return command.strip()
    raise SystemExit("no web line in the Procfile")


def expand(command: str, env: dict[str, str]) -> list[str]:
    """Split a Procfile command, expanding ``$VAR``, ``${VAR}`` and ``${VAR:-default}``."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        return env.get(name, match.group(2) or "")

    return shlex.split(re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", value, command))


BARE_COMMAND = "gunicorn app:app --bind 0.0.0.0:$PORT -w 2"  # gunicorn's defaults otherwise


def gunicorn(
    app: str, port: int, env: dict[str, str], log: Path, command: str
) -> subprocess.Popen[bytes]:
    """``command`` (a Procfile-style line naming ``app:app``) for ``app`` on 127.0.0.1:port."""
    full_env = {**os.environ, **env, "PORT": str(port)}
    argv = expand(command.replace("0.0.0.0:", "127.0.0.1:"), full_env)
    argv[argv.index("app:app")] = app
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env=full_env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_up(port: int, timeout: float = 30) -> None:
    """Wait until something answers HTTP on the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answered on port {port}")


def signed_requests(count: int, tag: str = "") -> list[Delivery]:
    """``count`` signed deliveries, each with its own svix-id, valid for the next 5 minutes."""
    from samples.history import history
    from samples.signing import signed

    events = history(max(1, count // 6 + 1), seed=5)
    stamp = time.time()
    return [
        signed(events[i % len(events)], msg_id=f"msg_bench{tag}{i:08d}", timestamp=stamp)
        for i in range(count)
    ]


def load(
    name: str,
    port: int,
    requests: list[Delivery],
    clients: int,
    seconds: float,
    processes: dict[str, list[psutil.Process]] | None = None,
    rate: float | None = None,
) -> Result:
    """Send requests from ``clients`` threads for ``seconds`` (at ``rate`` per second, or as
    fast as answers come); 2xx counts, the rest are errors. ``processes`` (role -> processes)
    are measured for CPU with the client (this process)."""
    roles = {"client": [psutil.Process()], **(processes or {})}
    cpu_before = cpu_seconds(roles)
    began = time.monotonic()
    answers = post_deliveries(port, requests, clients, seconds, rate)
    elapsed = time.monotonic() - began
    cpu_after = cpu_seconds(roles)
    every = sorted(a.seconds for a in answers if 200 <= a.status < 300)
    if not every:
        raise SystemExit(f"{name}: no successful request")
    p99 = every[min(len(every) - 1, int(len(every) * 0.99))]
    return Result(
        name,
        len(every),
        len(answers) - len(every),
        elapsed,
        statistics.median(every) * 1000,
        p99 * 1000,
        cpu_per_request(cpu_before, cpu_after, len(answers)),
    )


@dataclass(frozen=True)
class Target:
    """What one target runs: its app and its gunicorn command."""

    name: str
    app: str
    command: str


def run_target(
    target: Target,
    env: dict[str, str],
    args: argparse.Namespace,
    log_dir: Path,
    redis_pid: int,
    tag: str,
    rate: float | None = None,
) -> Result:
    """Wait for a quiet machine, sign fresh deliveries (valid 5 min, new svix-ids), start
    gunicorn for the target, warm it up, measure (at ``rate``, or flat out), stop it."""
    from tests.redis_process import free_port

    if args.idle:
        wait_until_idle(args.idle)
    count = int((rate or args.max_rps) * (args.seconds + args.warmup) * 1.05) + args.clients
    requests = signed_requests(count, tag=f"{target.name}{tag}")
    port = free_port()
    server = gunicorn(target.app, port, env, log_dir / f"{target.name}.log", target.command)
    try:
        wait_up(port)
        warm = int(len(requests) * args.warmup / (args.warmup + args.seconds))
        load(target.name, port, requests[:warm], args.clients, args.warmup, rate=rate)
        processes = {
            "gunicorn": process_tree(server.pid),
            "redis": [psutil.Process(redis_pid)],
        }
        return load(target.name, port, requests[warm:], args.clients, args.seconds, processes, rate)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


def cpu_ratio(bare: Result, prod: Result) -> float:
    """Bare's CPU per request over production's (client, gunicorn, redis, irq): what the
    ratio of requests/s would be on a CPU-bound machine with nothing else running."""

    def own(result: Result) -> float:
        return sum(result.cpu_us.get(role, 0) for role in ("client", "gunicorn", "redis", "irq"))

    return own(bare) / own(prod) if own(prod) else 0.0


def median_result(name: str, results: list[Result]) -> Result:
    """The median of each figure over the rounds."""

    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    seconds = med([r.seconds for r in results])
    return Result(
        name,
        round(med([r.rps for r in results]) * seconds),
        round(med([r.errors for r in results])),
        seconds,
        med([r.p50_ms for r in results]),
        med([r.p99_ms for r in results]),
        {key: med([r.cpu_us.get(key, 0) for r in results]) for key in (*CPU_ROLES, "idle %")},
    )


def alternate(
    targets: tuple[Target, Target],
    env: dict[str, str],
    args: argparse.Namespace,
    log_dir: Path,
    redis_pid: int,
    rate: float | None = None,
) -> list[tuple[Result, Result]]:
    """``--rounds`` rounds of (bare, production); a round the machine disturbed (``noisy``)
    is measured again, up to ``--repeats`` times, and the last try counts."""
    phase = "throughput" if rate is None else f"latency at {rate:.0f} req/s"
    rounds: list[tuple[Result, Result]] = []
    for number in range(1, args.rounds + 1):
        for attempt in range(args.repeats + 1):
            tag = f"{'t' if rate is None else 'l'}{number}.{attempt}"
            bare, prod = (
                run_target(target, env, args, log_dir, redis_pid, tag, rate) for target in targets
            )
            disturbed = noisy(bare, args.noise_us) or noisy(prod, args.noise_us)
            note = " (disturbed: measured again)" if disturbed and attempt < args.repeats else ""
            print(
                f"\n{phase}, round {number}{note}\n{HEADER}\n{bare.line()}\n{prod.line()}",
                flush=True,
            )
            if not note:
                break
        rounds.append((bare, prod))
    return rounds


def noisy(result: Result, limit_us: float) -> bool:
    """Whether the host (``steal``) or other processes (``other``) took more than
    ``limit_us`` of CPU per request while the target was measured."""
    return max(result.cpu_us.get("steal", 0), result.cpu_us.get("other", 0)) > limit_us


def summary(title: str, rounds: list[tuple[Result, Result]]) -> tuple[Result, Result]:
    """Print and return the median of each figure over the rounds."""
    bare = median_result("bare", [bare for bare, _ in rounds])
    prod = median_result("production", [prod for _, prod in rounds])
    print(f"\n{title}: median of {len(rounds)} round(s)\n{HEADER}\n{bare.line()}\n{prod.line()}")
    return bare, prod


def main(argv: list[str] | None = None) -> int:
    """Both phases, alternating the targets; print the comparison; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client connections")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the targets N times")
    parser.add_argument("--max-rps", type=int, default=5000, help="pre-signed requests per second")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="setting for both"
    )
    parser.add_argument("--web-command", help="instead of the Procfile's web line (what-ifs)")
    parser.add_argument(
        "--noise-us",
        type=float,
        default=25.0,
        help="a round in which steal or other processes took more CPU per request than this "
        "is measured again",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="how often a disturbed round is measured again"
    )
    parser.add_argument(
        "--idle", type=float, default=85.0, help="wait for this %% idle before each target (0: no)"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from samples.signing import SECRET
    from tests.redis_process import RedisProcess

    targets = (
        Target("bare", "bench.receiver:bare_app", BARE_COMMAND),
        Target("production", "app:app", args.web_command or procfile_web()),
    )
    log_dir = Path(tempfile.mkdtemp(prefix="bench-receiver-"))
    extra = dict(item.split("=", 1) for item in args.env)
    for target in targets:
        print(f"{target.name}: {target.command}", flush=True)
    if extra:
        print(f"settings for both: {extra}")
    redis_server = RedisProcess().start()
    try:
        env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_server.url, **extra}
        pid = redis_server.process.pid if redis_server.process else os.getpid()
        flat_out = alternate(targets, env, args, log_dir, pid)
        rate = summary("throughput", flat_out)[0].rps / 2
        paced = alternate(targets, env, args, log_dir, pid, rate)
        paced_bare, paced_prod = summary(f"latency at {rate:.0f} req/s", paced)
    finally:
        redis_server.stop()
    ratios = [prod.rps / bare.rps for bare, prod in flat_out]
    ratio = statistics.median(ratios)
    p99_ratio = paced_prod.p99_ms / paced_bare.p99_ms
    print("\nthroughput ratios by round: " + ", ".join(f"{r:.2f}" for r in ratios))
    cpu_ratios = [cpu_ratio(bare, prod) for bare, prod in flat_out]
    print("CPU per request, bare/production: " + ", ".join(f"{r:.2f}" for r in cpu_ratios))
    print(
        f"throughput production/bare: {ratio:.2f} (target >= 0.5: "
        f"{'met' if ratio >= 0.5 else 'missed'})"
    )
    print(
        f"p99 at {rate:.0f} req/s (half the bare maximum): production {paced_prod.p99_ms:.1f} ms,"
        f" bare {paced_bare.p99_ms:.1f} ms, {p99_ratio:.2f}x (target <= 2x: "
        f"{'met' if p99_ratio <= 2 else 'missed'}); logs in {log_dir}"
    )
    return 0 if ratio >= 0.5 and p99_ratio <= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
