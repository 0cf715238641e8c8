"""Sandboxed Jinja2 templates: the filters mappings may use, load-time checks, safe rendering."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from jinja2 import ChainableUndefined, Template, nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.meta import find_undeclared_variables
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from instruqt_crm.events import Event, EventError, format_timestamp, parse_timestamp

from .errors import suggest

CONTEXT_NAMES: tuple[str, ...] = ("event", "type", "params", "user_id", "email")
MAX_TEMPLATE_CHARS = 10_000
MAX_OUTPUT_CHARS = 65_536
MAX_EXPONENT = 100
MAX_POWER_BITS = 4096
EPOCH_MS_THRESHOLD = 100_000_000_000  # numbers above this are epoch milliseconds, not seconds
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BINOPS: dict[str, Callable[[Any, Any], Any]] = {"*": operator.mul, "**": operator.pow}


def _is_empty(value: Any) -> bool:
    """Whether a template value means "nothing": undefined, None or an empty string."""
    return value is None or isinstance(value, ChainableUndefined) or value == ""


def to_datetime(value: Any) -> datetime:
    """Any timestamp (ISO text, epoch seconds or milliseconds, datetime, date) as UTC datetime."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return parse_timestamp(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if abs(value) >= EPOCH_MS_THRESHOLD else value
        return parse_timestamp(seconds)
    raise EventError(f"not a timestamp: {value!r}")


def iso_filter(value: Any) -> str:
    """``{{ x | iso }}``: ISO 8601 UTC with milliseconds (empty stays empty)."""
    return "" if _is_empty(value) else format_timestamp(to_datetime(value))


def epoch_ms_filter(value: Any) -> int | str:
    """``{{ x | epoch_ms }}``: milliseconds since 1970 (empty stays empty)."""
    if _is_empty(value):
        return ""
    return (to_datetime(value) - EPOCH) // timedelta(milliseconds=1)


def date_filter(value: Any) -> str:
    """``{{ x | date }}``: the UTC calendar day, YYYY-MM-DD (empty stays empty)."""
    return "" if _is_empty(value) else to_datetime(value).date().isoformat()


def first_of(value: Any, *others: Any) -> Any:
    """The first non-empty argument: ``first_of(a, b)`` or ``a | first_of(b)``."""
    for candidate in (value, *others):
        if not _is_empty(candidate):
            return candidate
    return ""


class MappingSandbox(ImmutableSandboxedEnvironment):
    """No mutation, no unsafe attributes (they raise), bounded repetition and powers."""

    intercepted_binops = frozenset(_BINOPS)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Refuse ``*`` and ``**`` whose results would be huge."""
        if operator == "**" and isinstance(right, int | float):
            bits = left.bit_length() if isinstance(left, int) else 1
            if abs(right) > MAX_EXPONENT or bits * abs(right) > MAX_POWER_BITS:
                raise SecurityError("power too large")
        if operator == "*":
            sequence, count = (
                (left, right) if isinstance(left, str | list | tuple) else (right, left)
            )
            sized = isinstance(sequence, str | list | tuple) and isinstance(count, int)
            if sized and len(sequence) * count > MAX_OUTPUT_CHARS:
                raise SecurityError("repetition too large")
        return _BINOPS[operator](left, right)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        """Touching an unsafe attribute is an error, not a silent empty string."""
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe"
        )


def _finalize(value: Any) -> Any:
    """``None`` renders as nothing rather than the word "None"."""
    return "" if value is None else value


ENV = MappingSandbox(undefined=ChainableUndefined, autoescape=False, finalize=_finalize)
ENV.filters.update(iso=iso_filter, epoch_ms=epoch_ms_filter, date=date_filter, first_of=first_of)
ENV.filters.pop("random", None)  # not a function of the event: would break replay
for _name in ("lipsum", "cycler", "joiner"):
    ENV.globals.pop(_name, None)
ENV.globals["first_of"] = first_of


def _syntax(exc: TemplateSyntaxError) -> ValueError:
    """A one-line ValueError for a Jinja syntax error."""
    return ValueError(f"template syntax error: {exc.message} (template line {exc.lineno})")


def check_template(source: str) -> None:
    """Raise ValueError (one line) if ``source`` cannot compile or names unknown things."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"template longer than {MAX_TEMPLATE_CHARS} characters")
    try:
        ast = ENV.parse(source)
    except TemplateSyntaxError as exc:
        raise _syntax(exc) from None
    except Exception as exc:  # parser recursion on absurd nesting, and the like
        raise ValueError(f"template cannot be parsed: {type(exc).__name__}") from None
    for kind, registry in ((nodes.Filter, ENV.filters), (nodes.Test, ENV.tests)):
        for node in ast.find_all(kind):
            if node.name not in registry:
                label = "filter" if kind is nodes.Filter else "test"
                raise ValueError(f"unknown {label} {node.name!r}{suggest(node.name, registry)}")
    known = set(CONTEXT_NAMES) | set(ENV.globals)
    try:
        unknown = sorted(find_undeclared_variables(ast) - known)
    except TemplateSyntaxError as exc:
        raise _syntax(exc) from None
    if unknown:
        name = unknown[0]
        raise ValueError(
            f"unknown variable {name!r}{suggest(name, known)}; "
            f"templates can use {', '.join(CONTEXT_NAMES)}"
        )
    try:
        compile_template(source)
    except TemplateSyntaxError as exc:
        raise _syntax(exc) from None
    except Exception as exc:
        raise ValueError(f"template cannot be compiled: {type(exc).__name__}") from None


@functools.lru_cache(maxsize=4096)
def compile_template(source: str) -> Template:
    """The compiled template for ``source`` (cached)."""
    return ENV.from_string(source)


def template_context(
    event: Event, email: str | None, names: tuple[str | None, str | None] = (None, None)
) -> dict[str, Any]:
    """The names a template sees: event (timestamp normalised), type, params, user_id, email,
    and learner (email, first_name, last_name: the name Instruqt gave, when it gave one)."""
    body = dict(event.body)
    body["timestamp"] = format_timestamp(event.timestamp)
    first_name, last_name = names
    return {
        "event": body,
        "type": event.type,
        "params": event.params,
        "user_id": event.user_id,
        "email": email,
        "learner": {"email": email, "first_name": first_name, "last_name": last_name},
    }


class RenderError(Exception):
    """A template raised while rendering (any cause, sandbox violations included)."""


def render(source: str, context: dict[str, Any]) -> str:
    """Render a template to stripped text; raise RenderError on any failure."""
    try:
        parts: list[str] = []
        size = 0
        for chunk in compile_template(source).generate(context):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise SecurityError(f"output longer than {MAX_OUTPUT_CHARS} characters")
            parts.append(chunk)
    except Exception as exc:  # a template must never crash the worker
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise RenderError(f"{type(exc).__name__}: {message}".rstrip(": ")) from exc
    return "".join(parts).strip()


FALSY_TEXT = frozenset({"", "false", "no", "off", "0", "none", "null"})


def truthy(text: str) -> bool:
    """Whether a rendered ``when`` condition holds."""
    return text.strip().lower() not in FALSY_TEXT
