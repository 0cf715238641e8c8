"""The production stack for benchmarks: fake HubSpot, provisioning, gunicorn receiver, workers."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import redis
import requests
from rq import Worker

from bench.common import ROOT, Processes, first_line, wait_for
from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.mapping import load_mapping

MAPPING_PATH = "mappings/hubspot.yaml"
UNLIMITED = 100_000


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment (nothing inherited by accident) with the venv first on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    base = {name: os.environ[name] for name in ("HOME", "LANG", "TMPDIR") if name in os.environ}
    return {**base, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", **extra}


def procfile_command(kind: str) -> str:
    """The Procfile's command for a process type, bound to 127.0.0.1 instead of 0.0.0.0."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == kind:
            return command.strip().replace("0.0.0.0:", "127.0.0.1:")
    raise KeyError(f"no {kind!r} line in the Procfile")


class FakeHubSpotProcess:
    """``python -m tests.fakes.hubspot`` as a child process, with its control endpoints."""

    def __init__(
        self, processes: Processes, rate: int, window: float, latency: float, token: str
    ) -> None:
        argv = [sys.executable, "-m", "tests.fakes.hubspot", "--port", "0", "--rate", str(rate)]
        argv += ["--window", str(window), "--latency", str(latency), "--token", token]
        process = processes.start("fake-hubspot", argv, clean_env(), pipe_stdout=True)
        self.url = first_line(process, timeout=20)
        self.rate, self.window, self.token = rate, window, token
        self.http = requests.Session()

    def control(self, method: str, path: str, **body: Any) -> dict[str, Any]:
        """Call a ``/_fake/...`` endpoint (not rate limited, not recorded)."""
        url = f"{self.url}/_fake/{path}"
        answer = self.http.request(method, url, json=body or None, timeout=10)
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    def requests_log(self) -> list[dict[str, Any]]:
        """Every API request the fake answered, oldest first (``time`` is its monotonic clock)."""
        return list(self.control("GET", "requests?full=1")["requests"])

    def contacts(self) -> dict[str, dict[str, str]]:
        """The contacts it holds, by email."""
        return dict(self.control("GET", "contacts")["contacts"])

    def provision(self) -> int:
        """Create the mapping's properties (limit lifted meanwhile); returns the log length."""
        self.control("POST", "rate_limit", requests_per_window=UNLIMITED)
        adapter = HubSpotAdapter(self.token, self.url)
        mapping = load_mapping(ROOT / MAPPING_PATH)
        hubspot_setup.apply(adapter, mapping, hubspot_setup.plan(adapter, mapping))
        self.control("POST", "rate_limit", requests_per_window=self.rate)
        log = self.requests_log()
        if log:  # provisioning calls stay in the rolling window: let them age out
            time.sleep(max(0.0, log[-1]["time"] + self.window - time.monotonic()) + 0.1)
        return len(log)


def start_receiver(processes: Processes, env: dict[str, str], port: int) -> str:
    """Gunicorn with the Procfile's ``web`` command; the webhook URL once /readyz answers."""
    web_env = clean_env(**env, PORT=str(port), WEB_CONCURRENCY="2")
    processes.start("gunicorn", ["sh", "-c", "exec " + procfile_command("web")], web_env)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        processes.check_alive()
        try:
            return requests.get(f"{base}/readyz", timeout=2).status_code == 200
        except requests.RequestException:  # not listening yet, or still starting
            return False

    wait_for(ready, 30, "gunicorn to answer /readyz", step=0.2)
    return f"{base}/webhooks/instruqt"


def start_workers(
    processes: Processes,
    env: dict[str, str],
    conn: redis.Redis,
    count: int,
    command: str | None = None,
) -> None:
    """``count`` workers (the Procfile's ``worker`` command unless given), once registered."""
    argv = shlex.split(command or procfile_command("worker"))
    for number in range(count):
        processes.start(f"worker-{number}", argv, clean_env(**env))

    def registered() -> bool:
        processes.check_alive()
        return Worker.count(connection=conn) >= count

    wait_for(registered, 60, f"{count} workers to register", step=0.2)
