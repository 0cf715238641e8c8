"""Logging for the web app, the worker and the CLI: one JSON object per line, no raw emails.

Each line carries the time, level, logger, message and, inside a worker job, the job id.
Email addresses in messages are masked (``a***@example.com``) unless LOG_EMAILS is true.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings

_ADDRESS_CHAR = r"[^\s@'\"<>(),;:\[\]]"
EMAIL = re.compile(rf"({_ADDRESS_CHAR}){_ADDRESS_CHAR}*@({_ADDRESS_CHAR}+)")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def mask_emails(text: str) -> str:
    """Replace each email's local part with its first letter and ``***``."""
    return EMAIL.sub(r"\1***@\2", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; emails masked unless allowed."""

    def __init__(self, show_emails: bool = False) -> None:
        super().__init__()
        self.show_emails = show_emails

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": message if self.show_emails else mask_emails(message),
        }
        job_id = getattr(record, "job_id", None)
        if job_id:
            entry["job_id"] = job_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Plain text lines; emails masked unless allowed."""

    def __init__(self, show_emails: bool = False) -> None:
        super().__init__(TEXT_FORMAT)
        self.show_emails = show_emails

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if self.show_emails else mask_emails(line)


class JobIdFilter(logging.Filter):
    """Adds the id of the RQ job being run (if any) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        from rq import get_current_job

        job = get_current_job()
        record.job_id = job.id if job is not None else None
        return True


def configure_logging(level: str = "INFO", fmt: str = "json", show_emails: bool = False) -> None:
    """Send log lines to stderr at ``level``, as JSON or text (later calls reconfigure)."""
    handler = logging.StreamHandler()
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    handler.setFormatter(formatter(show_emails))
    handler.addFilter(JobIdFilter())
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

        sentry_sdk.init(dsn=settings.sentry_dsn.reveal(), send_default_pii=False)
