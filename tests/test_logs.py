"""Logs: one JSON object per line, job ids inside jobs, no secrets and no raw emails."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from instruqt_crm.logs import configure_logging, mask_emails
from instruqt_crm.runtime import current_runtime
from tests.engine_helpers import drain, engine_env, enqueue_all
from tests.signing import SECRET


def test_mask_emails() -> None:
    assert (
        mask_emails("to ada.lovelace@example.com and b@x.io") == "to a***@example.com and b***@x.io"
    )


def test_a_flow_logs_json_lines_without_emails_or_secrets(
    redis_url: str,
    redis_conn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    for name, value in engine_env(redis_url, tmp_path).items():
        monkeypatch.setenv(name, value)
    current_runtime.cache_clear()
    configure_logging("DEBUG", "json", show_emails=False)
    try:
        events = [
            (
                "m1",
                {
                    "type": "track.started",
                    "user_id": "u1",
                    "track_slug": "t",
                    "params": {"email": "grace.hopper@example.com"},
                    "timestamp": "2026-11-01T10:00:00Z",
                },
            ),
            (
                "m2",
                {
                    "type": "track.started",
                    "user_id": "u2",
                    "track_slug": "t",
                    "params": {"email": "not-valid@nowhere"},
                    "timestamp": "2026-11-01T10:00:00Z",
                },
            ),
        ]
        enqueue_all(redis_conn, events)
        drain(redis_conn)
    finally:
        current_runtime.cache_clear()
        configure_logging("INFO", "text")
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    ours = [r for r in records if r["logger"].startswith("instruqt_crm")]
    assert any(r.get("job_id") == "event-m1" for r in ours)
    assert any("rejected" in r["msg"] for r in ours)
    text = "\n".join(lines)
    for secret in ("grace.hopper@example.com", "not-valid@nowhere", SECRET, SECRET[6:]):
        assert secret not in text
    logging.getLogger("x").info("done")
