"""`instruqt-crm dev` end to end: receiver, worker, embedded Redis, dry run, signed example;
every process gone after SIGTERM or SIGHUP, the secret kept, the mapping reloaded."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from instruqt_crm.cli.devstack import DevError, dev_secret
from instruqt_crm.cli.local import EXAMPLE_EMAIL, sign_body
from instruqt_crm.ops.examples import example_event
from samples.signing import SECRET
from tests.processes import descendants, gone, wait_for
from tests.redis_process import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from instruqt_crm.cli import main; main()"]


def test_dev_serves_a_signed_example_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        INSTRUQT_WEBHOOK_SECRET=SECRET,
        FLUSH_WINDOW_SECONDS="0.2",
        DRY_RUN_PATH=str(tmp_path / "dry-run.jsonl"),
        MAPPING_PATH=str(ROOT / "mappings/hubspot.yaml"),
        LOG_FORMAT="text",
    )
    cli = CLI
    dev = subprocess.Popen(
        [*cli, "dev", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url), 30, "the dev server to answer /readyz")
        sent = subprocess.run(
            [
                *cli,
                "send-example",
                "track.completed",
                "--url",
                f"{url}/webhooks/instruqt",
                "--email",
                "ada@example.com",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "track.completed: 202" in sent.stdout
        out = tmp_path / "dry-run.jsonl"
        wait_for(lambda: out.exists() and out.read_text().strip() != "", 30, "the dry-run batch")
        batch = json.loads(out.read_text().splitlines()[0])
        [record] = batch["upsert"]
        assert record["id"] == "ada@example.com"
        assert (
            record["properties"]["instruqt_tracks_completed"] == "getting-started-with-kubernetes"
        )
    finally:
        os.killpg(dev.pid, signal.SIGINT)
        try:
            output = dev.communicate(timeout=30)[0].decode()
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            output = dev.communicate()[0].decode()
    assert f"{url}/webhooks/instruqt" in output
    assert "not for production" in output


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        time.sleep(0.1)
        return False


class Dev:
    """`instruqt-crm dev` in ``folder`` as a person runs it; its output read as it comes."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [*CLI, "dev", "--port", str(self.port)],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_for(lambda: _ready(self.url), 60, "the dev server to answer /readyz")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def said(self, text: str) -> list[str]:
        """Output lines holding ``text``."""
        return [line for line in list(self.lines) if text in line]

    def value(self, label: str) -> str:
        """What the banner line ``label`` says (e.g. the Redis URL)."""
        wait_for(lambda: bool(self.said(label)), 30, f"dev to print {label!r}")
        return self.said(label)[0].split(label, 1)[1].split()[0]

    def children(self) -> list[int]:
        """Every process `dev` runs: its descendants (worker, scheduler, work horses) and the
        embedded Redis (a daemon, found by the folder of its socket)."""
        socket_dir = str(Path(self.value("Redis:").removeprefix("unix://")).parent)
        return [*descendants(self.process.pid), *processes_naming(socket_dir)]

    def post(self, event_type: str, email: str, secret: str) -> None:
        """A signed example event, as `send-example --email` builds it."""
        body = json.dumps(example_event(event_type, email=email)).encode()
        answer = requests.post(
            f"{self.url}/webhooks/instruqt", data=body, headers=sign_body(secret, body), timeout=10
        )
        assert answer.status_code == 202, answer.text

    def stop(self, signum: int) -> str:
        """Send ``signum`` to `dev` alone (not its group); its whole output once it exits."""
        os.kill(self.process.pid, signum)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise
        self.reader.join(timeout=10)
        return "\n".join(self.lines)


def processes_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
    return found


def dev_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a person trying it: no Redis, no secret, a dry run in ``tmp_path``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "INSTRUQT_WEBHOOK_SECRET", "LOG_FORMAT")
    }
    return {
        **env,
        "FLUSH_WINDOW_SECONDS": "0.2",
        "DRY_RUN_PATH": str(tmp_path / "dry-run.jsonl"),
        "MAPPING_PATH": str(ROOT / "mappings/hubspot.yaml"),
        **extra,
    }


def records(path: Path) -> dict[str, dict[str, object]]:
    """Each contact's properties as the dry run last "sent" them, merged over its batches."""
    merged: dict[str, dict[str, object]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            for record in json.loads(line)["upsert"]:
                merged.setdefault(record["id"], {}).update(record["properties"])
    return merged


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_every_child_and_the_secret_survives_a_restart(
    tmp_path: Path, signum: int
) -> None:
    env = dev_env(tmp_path)
    first = Dev(tmp_path, env)
    secret = first.value("Signing secret:")
    wait_for(lambda: len(descendants(first.process.pid)) >= 2, 30, "the worker's scheduler")
    children = first.children()
    assert len(children) >= 3  # worker, its scheduler, redis-server
    output = first.stop(signum)
    assert first.process.returncode == 0, output
    wait_for(lambda: gone(children), 10, "every process dev started to exit")
    assert f"stopped by {signal.Signals(signum).name}" in output
    assert (tmp_path / "var/dev-webhook-secret").read_text().strip() == secret
    assert f"--email {EXAMPLE_EMAIL}" in first.said("Try:")[0]

    second = Dev(tmp_path, env)
    try:
        assert second.value("Signing secret:") == secret  # the exported one still works
        second.post("track.started", "ada@example.com", secret)
    finally:
        children = second.children()
        second.stop(signal.SIGTERM)
    wait_for(lambda: gone(children), 10, "every process of the second dev to exit")


def test_dev_reloads_a_mapping_that_passes_the_check_and_keeps_it_otherwise(
    tmp_path: Path,
) -> None:
    mapping = tmp_path / "mapping.yaml"
    original = (ROOT / "mappings/hubspot.yaml").read_text()
    assert '"{{ event.score }}"' in original
    mapping.write_text(original)
    dry_run = tmp_path / "dry-run.jsonl"
    dev = Dev(tmp_path, dev_env(tmp_path, MAPPING_PATH=str(mapping)))
    try:
        secret = dev.value("Signing secret:")
        assert requests.get(f"{dev.url}/no-such-page", timeout=10).status_code == 404
        dev.post("review.created", "ada@example.com", secret)
        wait_for(lambda: "ada@example.com" in records(dry_run), 30, "ada's record")
        assert records(dry_run)["ada@example.com"]["instruqt_last_review_score"] == 5

        doubled = original.replace('"{{ event.score }}"', '"{{ event.score * 2 }}"')
        mapping.write_text(doubled)
        wait_for(lambda: bool(dev.said("reloaded: the worker")), 60, "dev to reload the mapping")
        dev.post("review.created", "grace@example.com", secret)
        wait_for(lambda: "grace@example.com" in records(dry_run), 30, "grace's record")
        assert records(dry_run)["grace@example.com"]["instruqt_last_review_score"] == 10

        mapping.write_text(original.replace("merge: union", "merge: unoin", 1))
        wait_for(lambda: bool(dev.said("not reloaded")), 30, "dev to refuse the mapping")
        (refusal,) = dev.said("not reloaded")
        assert "keeps the previous one" in refusal and "unoin" in refusal
        mapping.write_text(doubled)
        wait_for(lambda: bool(dev.said("is back to the one")), 30, "dev to see the fix")
        dev.post("review.created", "alan@example.com", secret)
        wait_for(lambda: "alan@example.com" in records(dry_run), 30, "alan's record")
        assert records(dry_run)["alan@example.com"]["instruqt_last_review_score"] == 10
    finally:
        children = dev.children()
        output = dev.stop(signal.SIGTERM)
    wait_for(lambda: gone(children), 10, "every process dev started to exit")
    logged = [line for line in output.splitlines() if line.startswith("{")]
    assert logged, output  # not a terminal: JSON lines
    assert "\x1b[" not in output  # no colour codes


def test_the_dev_secret_is_made_once_for_the_owner_only_and_checked(tmp_path: Path) -> None:
    folder = tmp_path / "var"
    secret = dev_secret(folder)
    assert secret.startswith("whsec_") and dev_secret(folder) == secret
    assert (folder / "dev-webhook-secret").stat().st_mode & 0o777 == 0o600
    (folder / "dev-webhook-secret").write_text("not-a-secret\n")
    with pytest.raises(DevError, match=r"dev-webhook-secret: .*whsec_.*delete the file"):
        dev_secret(folder)
