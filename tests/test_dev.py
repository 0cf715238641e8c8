"""`instruqt-crm dev` end to end: receiver, worker, embedded Redis, dry run, signed example."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from samples.signing import SECRET
from tests.processes import wait_for
from tests.redis_process import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


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
    cli = [sys.executable, "-c", "from instruqt_crm.cli import main; main()"]
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
