"""Sandboxed Jinja2 templates: the filters mappings may use, load-time checks, safe rendering.

Templates run in the budgeted sandbox (``sandbox``): a render that would build something
huge or run too long fails at once, and the event becomes a mapping failure.
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, timedelta
from typing import Any

from jinja2 import ChainableUndefined, Template, nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.meta import find_undeclared_variables

from instruqt_crm.events import Event, EventError, format_timestamp, parse_timestamp

from .errors import suggest
from .sandbox import INTERNAL_FILTERS, budgeted, generate, new_sandbox

CONTEXT_NAMES: tuple[str, ...] = ("event", "type", "params", "user_id", "email")
EPOCH_MS_THRESHOLD = 100_000_000_000  # numbers above this are epoch milliseconds, not seconds
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TEMPLATE_CHARS = 10_000  # longest template a mapping may hold


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


ENV = new_sandbox(
    {"iso": iso_filter, "epoch_ms": epoch_ms_filter, "date": date_filter, "first_of": first_of},
    {"first_of": first_of},
)
_USER_FILTERS = frozenset(ENV.filters) - INTERNAL_FILTERS


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
    for kind, registry in ((nodes.Filter, _USER_FILTERS), (nodes.Test, ENV.tests)):
        for node in ast.find_all(kind):
            if node.name not in registry and node.name not in INTERNAL_FILTERS:
                label = "filter" if kind is nodes.Filter else "test"
                raise ValueError(f"unknown {label} {node.name!r}{suggest(node.name, registry)}")
    known = set(CONTEXT_NAMES) | set(ENV.globals)
    try:
        with budgeted():  # analysing folds constants: that runs filters
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
    """The compiled template for ``source`` (cached); compiling folds constants, which runs
    filters, so it has a budget of its own (an over-budget fold is left to render time)."""
    with budgeted():
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
    """Render a template to stripped text within the budgets; raise RenderError on any failure
    (``SecurityError: budget MAX_... exceeded: ...`` when it went over a budget)."""
    try:
        text = generate(compile_template(source), context)
    except Exception as exc:  # a template must never crash the worker
        message = str(exc).splitlines()[0] if str(exc) else ""
        label = "SecurityError" if isinstance(exc, SecurityError) else type(exc).__name__
        raise RenderError(f"{label}: {message}".rstrip(": ")) from exc
    return text.strip()


FALSY_TEXT = frozenset({"", "false", "no", "off", "0", "none", "null"})


def truthy(text: str) -> bool:
    """Whether a rendered ``when`` condition holds."""
    return text.strip().lower() not in FALSY_TEXT
