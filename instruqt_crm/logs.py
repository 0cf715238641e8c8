"""Logging for the web app, the worker and the CLI: one JSON object per line, no raw emails.

Each line carries the time, level, logger, message and, inside a worker job, the job id and
the id of the event being handled. On a terminal the lines are text instead (LOG_FORMAT
chooses either way); colour codes that libraries put in messages never reach a JSON line.
Email addresses are masked (``a***@example.com``) unless LOG_EMAILS is true, wherever a line
carries text: the message, the ids, the exception with its traceback, and the stack.
RQ's own loggers stay at WARNING (their INFO lines are housekeeping: registries cleaned every
15 s, jobs taken and finished) unless LOG_LEVEL is DEBUG.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextvars import ContextVar
from typing import TextIO

from rq import get_current_job

from .config import Settings

_ADDRESS_CHAR = r"[^\s@'\"<>(),;:\[\]]"
EMAIL = re.compile(rf"({_ADDRESS_CHAR}){_ADDRESS_CHAR}*@({_ADDRESS_CHAR}+)")
CURRENT_EVENT: ContextVar[str | None] = ContextVar("current_event", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colours (werkzeug's status codes, rq's)
RQ_LOGGERS = ("rq.worker", "rq.job", "rq.scheduler", "rq.queue")


def mask_emails(text: str) -> str:
    """Replace each email's local part with its first letter and ``***``."""
    if "@" not in text:  # the common case, and a tenth of the regex's cost
        return text
    return EMAIL.sub(r"\1***@\2", text)


def _keep(text: str) -> str:
    """Text as it is (LOG_EMAILS=true)."""
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record (``exc``: the traceback, ``stack``: the stack when asked for);
    emails masked in the message, ids, exc and stack unless allowed."""

    def __init__(self, show_emails: bool = False) -> None:
        super().__init__()
        self.show_emails = show_emails
        self._encode = json.JSONEncoder(ensure_ascii=False).encode
        self._second: tuple[int, str] = (-1, "")  # one tuple: threads see a matching pair

    def _timestamp(self, record: logging.LogRecord) -> str:
        """ISO 8601 UTC with milliseconds (the seconds part formatted once a second)."""
        second, text = self._second
        if second != int(record.created):
            second = int(record.created)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return f"{text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        mask = _keep if self.show_emails else mask_emails  # cheap: no "@", no regex
        message = record.getMessage()
        if "\x1b" in message:
            message = ANSI_CODE.sub("", message)
        entry = {
            "ts": self._timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": mask(message),
        }
        for field in ("job_id", "event_id"):
            value = getattr(record, field, None)
            if value:
                entry[field] = mask(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = mask(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exc"] = mask(record.exc_text)
        if record.stack_info:
            entry["stack"] = mask(self.formatStack(record.stack_info))
        return self._encode(entry)


class TextFormatter(logging.Formatter):
    """Plain text lines; emails masked unless allowed, in all of the text (the message, and the
    traceback and stack that follow it)."""

    def __init__(self, show_emails: bool = False) -> None:
        super().__init__(TEXT_FORMAT)
        self.show_emails = show_emails

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if self.show_emails else mask_emails(line)


class JobIdFilter(logging.Filter):
    """Adds the ids of the RQ job and of the event being handled (if any) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = get_current_job()
        record.job_id = job.id if job is not None else None
        record.event_id = CURRENT_EVENT.get()
        return True


def formatter_for(fmt: str, show_emails: bool, stream: TextIO) -> logging.Formatter:
    """The formatter for ``fmt`` (``json``, ``text``, or ``auto``: text when ``stream`` is a
    terminal, JSON otherwise)."""
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    return JsonFormatter(show_emails) if fmt == "json" else TextFormatter(show_emails)


def rq_level(level: str) -> str:
    """The level of RQ's loggers for LOG_LEVEL ``level``: at least WARNING, unless DEBUG."""
    if level == "DEBUG":
        return level
    return max(level, "WARNING", key=logging.getLevelName)


def configure_logging(level: str = "INFO", fmt: str = "json", show_emails: bool = False) -> None:
    """Send log lines to stderr at ``level``, as JSON, text or ``auto`` (text on a terminal),
    RQ's loggers at ``rq_level`` (later calls reconfigure)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter_for(fmt, show_emails, handler.stream))
    handler.addFilter(JobIdFilter())
    for name in RQ_LOGGERS:
        logging.getLogger(name).setLevel(rq_level(level))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "instruqt_crm", False)]:
        root.removeHandler(old)
    handler.instruqt_crm = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


def configure(settings: Settings) -> None:
    """Logging per the settings, and Sentry when SENTRY_DSN is set."""
    configure_logging(settings.log_level, settings.log_format, settings.log_emails)
    if settings.sentry_dsn is not None:
        import sentry_sdk

        sentry_sdk.init(dsn=settings.sentry_dsn.get_secret_value(), send_default_pii=False)
