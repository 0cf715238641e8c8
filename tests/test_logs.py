"""Logs: one JSON object per line, job ids inside jobs, no secrets and no raw emails."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from instruqt_crm.logs import JsonFormatter, configure_logging, mask_emails
from samples.signing import SECRET
from tests.engine_helpers import drain, enqueue_all


def test_mask_emails() -> None:
    assert (
        mask_emails("to ada.lovelace@example.com and b@x.io") == "to a***@example.com and b***@x.io"
    )


def test_a_flow_logs_json_lines_without_emails_or_secrets(
    engine: Path, redis_conn, capfd: pytest.CaptureFixture[str]
) -> None:
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
        configure_logging("INFO", "text")
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    ours = [r for r in records if r["logger"].startswith("instruqt_crm")]
    assert any(r.get("event_id") == "m1" and r.get("job_id") for r in ours)
    assert any("rejected" in r["msg"] for r in ours)
    text = "\n".join(lines)
    for secret in ("grace.hopper@example.com", "not-valid@nowhere", SECRET, SECRET[6:]):
        assert secret not in text
    logging.getLogger("x").info("done")


def test_json_lines_carry_the_exact_utc_time_across_seconds() -> None:
    formatter = JsonFormatter()

    def stamp(created: float) -> str:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "café %s", ("ok",), None)
        record.created, record.msecs = created, (created % 1) * 1000
        line = json.loads(formatter.format(record))
        assert line["msg"] == "café ok"
        return str(line["ts"])

    assert stamp(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"
    assert stamp(1_700_000_000.999) == "2023-11-14T22:13:20.999Z"  # the cached second
    assert stamp(1_700_000_001.5) == "2023-11-14T22:13:21.500Z"
    assert stamp(1_699_999_999.0) == "2023-11-14T22:13:19.000Z"  # a late record, older second


def test_mask_emails_leaves_text_without_addresses_alone() -> None:
    text = "event msg_1 (track.started) queued; weird: a@ @b x@y"
    assert mask_emails("event msg_1 (track.started) queued") == "event msg_1 (track.started) queued"
    assert mask_emails(text) == "event msg_1 (track.started) queued; weird: a@ @b x***@y"
