"""What `instruqt-crm dev` runs beside its receiver, and how it stops all of it.

``dev`` runs the receiver in its own process and, beside it, the embedded Redis (unless
REDIS_URL is set) and one worker in a process group of its own (the worker's scheduler and
work horses live in that group). SIGTERM, SIGHUP and Ctrl-C stop everything: the worker's
group (SIGKILL after a grace period) and the embedded Redis, whose process is waited for.
A watch on the mapping file restarts the worker when the file changes and passes the check;
otherwise the running worker keeps its mapping and one line says why. The local test secret
and the URL of the running ``dev`` are kept in ``var/`` (git-ignored).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import redis
from rq.worker import Worker

from instruqt_crm.config import parse_webhook_secrets
from instruqt_crm.engine.queueing import EmbeddedRedis
from instruqt_crm.mapping import MappingError, load_mapping

DEV_DIR = Path("var")  # beside var/redis and var/dry-run.jsonl
SECRET_FILE = "dev-webhook-secret"
STATE_FILE = "dev.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
WORKER_GRACE_SECONDS = 15  # a running job's time to finish before the worker is killed
WORKER_START_SECONDS = 60  # how long a restarted worker may take to start listening


class DevError(Exception):
    """`dev` cannot go on; the message says why in one line."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: unwind the receiver, then stop every child."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


def dev_secret(folder: Path = DEV_DIR) -> str:
    """The local test secret: made on the first start, then read from ``var/`` (owner-only),
    so the secret exported in another shell keeps working across restarts."""
    path = folder / SECRET_FILE
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(secret + "\n")
        return secret
    try:
        parse_webhook_secrets(secret)
    except ValueError as exc:
        raise DevError(f"{path}: {exc}; delete the file for a new secret") from None
    return secret


def running_dev(folder: Path = DEV_DIR) -> str | None:
    """The webhook URL of the `dev` started from this folder, if it still runs."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        pid, url = int(state["pid"]), str(state["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # someone else's process
        return url
    return url


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Stopped`` in the main thread while inside (Ctrl-C raises
    KeyboardInterrupt as ever); the previous handlers are restored on leaving."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise Stopped(signum)

    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def ignore_stop_signals() -> None:
    """Let nothing interrupt the stopping itself (it has timeouts of its own)."""
    for number in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(number, signal.SIG_IGN)


def _fingerprint(path: Path) -> str | None:
    """A hash of the file's content, or None while it cannot be read (an editor saving)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class MappingWatch(threading.Thread):
    """Calls ``changed`` with the content's hash when the mapping file's content changes and
    then holds still for one poll (so a save in two writes is read once, whole)."""

    def __init__(
        self,
        path: Path,
        changed: Callable[[str], None],
        done: threading.Event,
        interval: float = 0.5,
    ) -> None:
        super().__init__(name="mapping-watch", daemon=True)
        self.path, self.changed, self.done, self.interval = path, changed, done, interval
        self.loaded = _fingerprint(path)

    def run(self) -> None:
        seen = self.loaded
        while not self.done.wait(self.interval):
            now = _fingerprint(self.path)
            if now is not None and now == seen and now != self.loaded:
                self.loaded = now
                self.changed(now)
            seen = now


def _stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM a process group, SIGKILL it after ``grace`` s, and leave nothing of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # what is left of it (a stuck work horse)
    process.wait()


class DevStack:
    """The processes `dev` runs beside its receiver; ``stop`` leaves none of them behind."""

    def __init__(self, env: dict[str, str], say: Callable[[str], None]) -> None:
        self.env = env
        self.say = say
        self.embedded: EmbeddedRedis | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.watch: MappingWatch | None = None
        self.running: str | None = None  # the hash of the mapping the worker runs
        self.state: Path | None = None
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def redis_url(self, folder: Path) -> str:
        """REDIS_URL, else the URL of an embedded Redis started now in ``folder``."""
        if not self.env.get("REDIS_URL"):
            self.embedded = EmbeddedRedis(folder)
            self.env["REDIS_URL"] = self.embedded.url
        return self.env["REDIS_URL"]

    def _spawn_worker(self) -> subprocess.Popen[bytes]:
        """A worker in a process group of its own: terminal signals reach `dev` only, and
        `dev` stops the whole group."""
        command = [sys.executable, "-m", "instruqt_crm.engine.worker"]
        return subprocess.Popen(command, env=self.env, start_new_session=True)

    def start_worker(self) -> None:
        """Start the worker."""
        with self._lock:
            self.worker = self._spawn_worker()

    def watch_mapping(self, path: Path, conn: redis.Redis) -> None:
        """Restart the worker whenever the mapping file changes and passes the check."""
        self.watch = MappingWatch(path, lambda now: self.reload(path, now, conn), self.stopping)
        self.running = self.watch.loaded
        self.watch.start()

    def reload(self, path: Path, content: str, conn: redis.Redis) -> None:
        """Check the changed mapping (``content``: its hash); if it passes, start a worker
        with it and stop the old one once the new one listens. Otherwise the old worker keeps
        its mapping."""
        if content == self.running:
            self.say(f"mapping {path} is back to the one the worker runs")
            return
        kept = f"mapping {path} changed, not reloaded (the worker keeps the previous one)"
        try:
            mapping = load_mapping(path)
        except MappingError as exc:
            more = len(exc.problems) - 1
            extra = f" (+{more} more: instruqt-crm check {path})" if more else ""
            self.say(f"{kept}: {exc.problems[0]}{extra}")
            return
        with self._lock:
            fresh = self._spawn_worker()
            if not _listening(conn, fresh, self.stopping):
                _stop_group(fresh, WORKER_GRACE_SECONDS)
                if not self.stopping.is_set():
                    self.say(f"{kept}: a worker with it did not start (its log above says why)")
                return
            old, self.worker, self.running = self.worker, fresh, content
        if old is not None:
            _stop_group(old, WORKER_GRACE_SECONDS)
        warnings = f", {len(mapping.warnings)} warning(s)" if mapping.warnings else ""
        self.say(
            f"mapping {path} reloaded: the worker now runs it ({len(mapping.properties)} "
            f"properties, {len(mapping.events)} rules{warnings})"
        )

    def remember(self, url: str, folder: Path = DEV_DIR) -> None:
        """Leave word in ``var/dev.json`` of the URL served, for `send-example`'s hints."""
        folder.mkdir(parents=True, exist_ok=True)
        self.state = folder / STATE_FILE
        self.state.write_text(json.dumps({"pid": os.getpid(), "url": url}) + "\n")

    def stop(self) -> None:
        """Stop the watch, the worker's group and the embedded Redis; forget the URL."""
        ignore_stop_signals()
        self.stopping.set()
        if self.watch is not None and self.watch.is_alive():
            self.watch.join()  # a reload under way ends first
        with self._lock:
            if self.worker is not None:
                _stop_group(self.worker, WORKER_GRACE_SECONDS)
        if self.embedded is not None:
            self.embedded.stop()
        if self.state is not None:
            with contextlib.suppress(FileNotFoundError):
                self.state.unlink()


def _listening(
    conn: redis.Redis, process: subprocess.Popen[bytes], stopping: threading.Event
) -> bool:
    """Wait until ``process`` is a registered RQ worker (its start-up checks passed): True;
    False when it exits first, takes longer than WORKER_START_SECONDS, or `dev` stops."""
    host = socket.gethostname()
    deadline = time.monotonic() + WORKER_START_SECONDS
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):  # Redis back in a moment: ask again
            workers = Worker.all(connection=conn)
            if any(w.pid == process.pid and w.hostname == host for w in workers):
                return True
        if stopping.wait(0.2):
            return False
    return False
