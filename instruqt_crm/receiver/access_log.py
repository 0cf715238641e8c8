"""gunicorn's access log, one line per request whatever the request holds.

gunicorn writes the path decoded, so ``/x%0Afake`` would start a second, forged line;
this logger escapes control characters, quotes and backslashes in every field. The
Procfile names it with ``--logger-class``.
"""

from __future__ import annotations

import re
from typing import Any

from gunicorn.glogging import Logger

_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\]')


def escaped(value: str) -> str:
    """``value`` with control characters, quotes and backslashes written as ``\\xNN``."""
    return _UNSAFE.sub(lambda found: f"\\x{ord(found.group()):02x}", value)


class AccessLogger(Logger):
    """gunicorn's logger with every access-log field escaped."""

    def atoms(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> Any:
        found = super().atoms(resp, req, environ, request_time)
        return {name: escaped(v) if isinstance(v, str) else v for name, v in found.items()}
