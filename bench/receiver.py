"""Receiver load benchmark: the production webhook route against a bare Flask route.

    python -m bench.receiver [--seconds 10] [--clients 16] [--warmup 2]

Both run under the Procfile's ``web`` command (gunicorn, 2 workers x 4 threads, same
timeouts) on 127.0.0.1, one after the other in the same run. The production app gets its
production settings (JSON logs, access log, 256 KiB limit, 72 h dedupe) and a private
redis-server (tests/redis_process.py, AOF off); the bare app (``bare_app`` below) answers
202 to any POST without reading Redis. The load client is this process: ``--clients``
threads, each with one keep-alive ``http.client`` connection, sending pre-signed deliveries
(every one a new svix-id, so each is verified, deduped and enqueued). It prints requests/s,
p50 and p99 latency for each and the ratio production/bare (target >= 0.5). No RQ worker
runs: this measures the receiver only. wrk is not needed (and not used).
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flask import Flask

ROOT = Path(__file__).resolve().parent.parent
bare_app = Flask(__name__)


@bare_app.post("/webhooks/instruqt")
def bare_route() -> tuple[str, int]:
    """The baseline: a Flask route that accepts anything."""
    return '{"status":"queued"}', 202


@dataclass
class Result:
    """Throughput and latency of one target."""

    name: str
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return self.requests / self.seconds

    def line(self) -> str:
        """One table row."""
        return (
            f"{self.name:<12} {self.rps:>9.0f} {self.p50_ms:>8.1f} {self.p99_ms:>8.1f}"
            f" {self.requests:>8} {self.errors:>6}"
        )


def gunicorn(app: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The Procfile's web command for ``app`` on 127.0.0.1:port."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == "web":
            break
    else:
        raise SystemExit("no web line in the Procfile")
    command = command.strip().replace("0.0.0.0:$PORT", f"127.0.0.1:{port}")
    argv = shlex.split(command.replace("${WEB_CONCURRENCY:-2}", "2"))
    argv[argv.index("app:app")] = app
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log.open("wb"),
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


def signed_requests(count: int) -> list[tuple[bytes, dict[str, str]]]:
    """``count`` signed deliveries, each with its own svix-id, valid for the next 5 minutes."""
    from tests.history import history
    from tests.signing import signed

    events = history(max(1, count // 6 + 1), seed=5)
    stamp = time.time()
    return [
        signed(events[i % len(events)], msg_id=f"msg_bench{i:08d}", timestamp=stamp)
        for i in range(count)
    ]


def load(
    name: str, port: int, requests: list[tuple[bytes, dict[str, str]]], clients: int, seconds: float
) -> Result:
    """Send requests from ``clients`` threads for ``seconds``; 2xx counts, the rest are errors."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    counter = iter(range(len(requests)))
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(slot: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            body, headers = requests[index]
            began = time.perf_counter()
            try:
                connection.request("POST", "/webhooks/instruqt", body=body, headers=headers)
                answer = connection.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException):
                errors[slot] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            if 200 <= answer.status < 300:
                latencies[slot].append(time.perf_counter() - began)
            else:
                errors[slot] += 1

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    every = sorted(x for mine in latencies for x in mine)
    if not every:
        raise SystemExit(f"{name}: no successful request")
    p99 = every[min(len(every) - 1, int(len(every) * 0.99))]
    return Result(
        name, len(every), sum(errors), elapsed, statistics.median(every) * 1000, p99 * 1000
    )


def run_target(
    name: str,
    app: str,
    env: dict[str, str],
    requests: list[tuple[bytes, dict[str, str]]],
    args: argparse.Namespace,
    log_dir: Path,
) -> Result:
    """Start gunicorn for ``app``, warm it up, measure, stop it."""
    from tests.redis_process import free_port

    port = free_port()
    server = gunicorn(app, port, env, log_dir / f"{name}.log")
    try:
        wait_up(port)
        warm = int(len(requests) * args.warmup / (args.warmup + args.seconds))
        load(name, port, requests[:warm], args.clients, args.warmup)
        return load(name, port, requests[warm:], args.clients, args.seconds)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


def main(argv: list[str] | None = None) -> int:
    """Run both targets and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target")
    parser.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients")
    parser.add_argument("--max-rps", type=int, default=3000, help="pre-signed requests per second")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.redis_process import RedisProcess
    from tests.signing import SECRET

    count = int(args.max_rps * (args.seconds + args.warmup))
    print(f"signing {count} deliveries ...", flush=True)
    requests = signed_requests(count)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-receiver-"))
    redis_server = RedisProcess().start()
    try:
        env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_server.url}
        bare = run_target("bare-flask", "bench.receiver:bare_app", env, requests, args, log_dir)
        prod = run_target("production", "app:app", env, requests, args, log_dir)
    finally:
        redis_server.stop()
    print(f"\n{'target':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ok':>8} {'errors':>6}")
    print(bare.line())
    print(prod.line())
    ratio = prod.rps / bare.rps
    print(f"\nratio production/bare: {ratio:.2f} (target >= 0.5); logs in {log_dir}")
    return 0 if ratio >= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
