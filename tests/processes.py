"""Real processes for tests: the Procfile's web and worker, several workers, killing some."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import requests

ROOT = Path(__file__).resolve().parent.parent


def procfile_web(port: int, processes: int = 2) -> list[str]:
    """The Procfile's ``web`` command on 127.0.0.1:port, with ``processes`` as
    WEB_CONCURRENCY (its default, 2, unless given)."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == "web":
            command = command.strip().replace("0.0.0.0:$PORT", f"127.0.0.1:{port}")
            return shlex.split(command.replace("${WEB_CONCURRENCY:-2}", str(processes)))
    raise KeyError("no web line in the Procfile")


def start_web(
    port: int, env: dict[str, str], log_path: Path, processes: int = 2
) -> subprocess.Popen[bytes]:
    """The Procfile's web (gunicorn) on 127.0.0.1:port, ``env`` added to this environment,
    its output in ``log_path``, in a process group of its own."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            procfile_web(port, processes),
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_worker(
    env: dict[str, str], output: IO[bytes] | int = subprocess.PIPE, own_group: bool = False
) -> subprocess.Popen[bytes]:
    """``python worker.py`` as the Procfile runs it, ``env`` added to this environment."""
    return subprocess.Popen(
        [sys.executable, "worker.py"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=own_group,
    )


class Workers:
    """Several ``python worker.py`` processes sharing one environment."""

    def __init__(self, env: dict[str, str], count: int, log_dir: Path) -> None:
        self.env = {**os.environ, **env}
        self.count = count
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start_one(self) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"worker-{len(self.processes)}.log").open("wb") as log:
            process = start_worker(self.env, log, own_group=True)
        self.processes.append(process)
        return process

    def __enter__(self) -> Workers:
        for _ in range(self.count):
            self.start_one()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL a worker and the job it is running (its whole process group)."""
        family = [process.pid, *descendants(process.pid)]  # the job's work horse has its own group
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)
        wait_for(lambda: gone(family[1:]), 10, "the worker's children to die")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def gone(pids: list[int]) -> bool:
    """Whether none of these processes is left (zombies count as gone)."""
    return not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll until ``condition()`` holds, or fail saying what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def answer_of(client: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP answer read off ``client``: its head and its body (by Content-Length)."""

    def more() -> bytes:
        part = client.recv(4096)
        assert part, "the server closed the connection without an answer"
        return part

    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += more()
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += more()
    return head, body


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 (a web process that is up and ready)."""
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
