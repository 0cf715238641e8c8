"""gunicorn's own logs in ours: its error log and (when on) its access log as our lines.

The Procfile names ``AccessLogger`` with ``--logger-class``. Both of gunicorn's logs get the
app's format (JSON, or text on a terminal, as LOG_FORMAT says; emails masked unless
LOG_EMAILS), so a platform's log drain reads one format. The access log is off unless
WEB_ACCESS_LOG is true (or gunicorn is given ``--access-logfile``): platform routers log
every request already, and each line costs the receiver time. When it is on, every field is
escaped: gunicorn writes the path decoded, so ``/x%0Afake`` would otherwise start a second,
forged line in text format.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from gunicorn.glogging import Logger

from instruqt_crm.config import Settings, SettingsError
from instruqt_crm.logs import formatter_for

_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\]')


def escaped(value: str) -> str:
    """``value`` with control characters, quotes and backslashes written as ``\\xNN``."""
    return _UNSAFE.sub(lambda found: f"\\x{ord(found.group()):02x}", value)


def _settings() -> Settings:
    """The settings, or the defaults while they are malformed (the app then stops at start
    with the one-line error)."""
    try:
        return Settings.from_env()
    except SettingsError:
        return Settings.from_env({})


class AccessLogger(Logger):
    """gunicorn's logger: our line format for its error and access logs, the access log on
    only with WEB_ACCESS_LOG (or ``--access-logfile``), every access-log field escaped."""

    def setup(self, cfg: Any) -> None:
        settings = _settings()
        if settings.web_access_log and cfg.accesslog is None:
            cfg.set("accesslog", "-")
        super().setup(cfg)
        formatter = formatter_for(settings.log_format, settings.log_emails, sys.stderr)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False):
                    handler.setFormatter(formatter)

    def atoms(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> Any:
        found = super().atoms(resp, req, environ, request_time)
        return {name: escaped(v) if isinstance(v, str) else v for name, v in found.items()}
