"""Logs: one JSON object per line, job ids inside jobs, no secrets and no raw emails."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from rq.worker import Worker

from instruqt_crm.engine.flush import flush
from instruqt_crm.engine.runtime import current
from instruqt_crm.logs import JsonFormatter, configure_logging, mask_emails, rq_level
from instruqt_crm.ops.examples import example_event
from samples.signing import SECRET
from tests.engine_helpers import drain, engine_env, enqueue_all
from tests.processes import start_worker, wait_for


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
                    "params": {"email": "rejected@example.рф"},
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
    for secret in ("grace.hopper@example.com", "rejected@example.рф", SECRET, SECRET[6:]):
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


def _log_a_failure() -> None:
    """An exception whose text carries an email, logged with its traceback and the stack."""
    try:
        raise ValueError("bad ada.lovelace@example.com")
    except ValueError:
        logging.getLogger("instruqt_crm.test").exception(
            "failed for %s", "grace.hopper@example.com", stack_info=True
        )


def _failure_logged(fmt: str, show_emails: bool, capfd: pytest.CaptureFixture[str]) -> str:
    """What ``_log_a_failure`` writes to stderr with this format and email setting."""
    capfd.readouterr()
    configure_logging("INFO", fmt, show_emails=show_emails)
    try:
        _log_a_failure()
    finally:
        configure_logging("INFO", "text")
    return capfd.readouterr().err


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_emails_are_masked_in_every_field_exceptions_and_stacks_included(
    fmt: str, capfd: pytest.CaptureFixture[str]
) -> None:
    err = _failure_logged(fmt, False, capfd)
    assert "ValueError: bad a***@example.com" in err
    assert "failed for g***@example.com" in err
    assert "Stack (most recent call last)" in err
    for address in ("ada.lovelace@example.com", "grace.hopper@example.com"):
        assert address not in err
    if fmt == "json":
        (line,) = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
        assert "Traceback" in line["exc"] and "Stack" in line["stack"]
        for field, value in line.items():
            assert "ada.lovelace@" not in str(value), field
            assert "grace.hopper@" not in str(value), field


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_log_emails_true_shows_them_everywhere(fmt: str, capfd: pytest.CaptureFixture[str]) -> None:
    err = _failure_logged(fmt, True, capfd)
    assert "ValueError: bad ada.lovelace@example.com" in err
    assert "failed for grace.hopper@example.com" in err


def _logged_through(stream: str) -> str:
    """What a process logs with LOG_FORMAT unset when its stderr is a terminal or a pipe."""
    code = (
        "import logging; from instruqt_crm.config import Settings; "
        "from instruqt_crm.logs import configure; configure(Settings.from_env({})); "
        "logging.getLogger('x').info('hello \\x1b[33mthere\\x1b[0m')"
    )
    if stream == "pipe":
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
        return done.stderr.decode()
    leader, follower = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", code], stderr=follower)
    os.close(follower)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the child has exited and closed it
        while chunk := os.read(leader, 4096):
            chunks.append(chunk)
    child.wait(timeout=30)
    os.close(leader)
    return b"".join(chunks).decode()


def test_text_on_a_terminal_json_otherwise_and_no_colour_codes_in_json() -> None:
    on_a_terminal = _logged_through("terminal")
    assert " INFO x hello " in on_a_terminal and not on_a_terminal.startswith("{")
    (line,) = _logged_through("pipe").splitlines()
    assert json.loads(line)["msg"] == "hello there"  # colour codes dropped


def test_rq_logs_from_warning_unless_debugging() -> None:
    assert [rq_level(level) for level in ("DEBUG", "INFO", "WARNING", "ERROR")] == [
        "DEBUG",
        "WARNING",
        "WARNING",
        "ERROR",
    ]


@pytest.mark.slow
def test_an_idle_worker_logs_no_rq_housekeeping(redis_url: str, tmp_path: Path) -> None:
    conn = redis.Redis.from_url(redis_url)
    worker = start_worker(engine_env(redis_url, tmp_path))
    try:
        wait_for(lambda: _idle(conn, worker.pid), 60, "the worker to wait for jobs")
    finally:
        worker.send_signal(signal.SIGTERM)
        output = worker.communicate(timeout=30)[0].decode()
    lines = [json.loads(line) for line in output.splitlines()]  # not a terminal: JSON
    assert any("listening on" in line["msg"] for line in lines), output
    rq_info = [x for x in lines if x["logger"].startswith("rq.") and x["level"] == "INFO"]
    assert rq_info == []


def _idle(conn: redis.Redis, pid: int) -> bool:
    """Whether the worker with this pid has registered and waits for jobs (its first
    maintenance, which cleans RQ's registries, is done by then)."""
    return any(w.pid == pid and w.get_state() == "idle" for w in Worker.all(connection=conn))


def test_an_empty_flush_logs_at_debug_a_flush_that_sent_at_info(
    engine: Path, redis_conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="instruqt_crm.engine.flush")
    run = current()
    flush(redis_conn, run.adapter(redis_conn), run.mapping)
    (empty,) = [r for r in caplog.records if r.getMessage().startswith("flush: ")]
    assert empty.levelno == logging.DEBUG
    caplog.clear()
    enqueue_all(redis_conn, [("m1", example_event("track.started", email="ada@example.com"))])
    drain(redis_conn)
    sent = [r for r in caplog.records if r.getMessage().startswith("flush: 1 synced")]
    assert sent and all(r.levelno == logging.INFO for r in sent)
