"""The mapping sandbox: Jinja's immutable sandbox with every render held to budgets.

An operation that would build something huge, or a render that runs too long, fails that
render at once with ``budget MAX_... exceeded`` before the big object is built (the event
becomes a mapping failure). The checks sit in the sandbox's hooks (calls, operators,
attribute access), in a wrapper around every filter, and in two internal filters the parser
puts around every ``{% for %}`` iterable and every ``~`` concatenation. ``new_sandbox``
builds the environment; ``budgeted`` and ``generate`` run code within a budget.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import operator
import textwrap
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, MappingView
from contextvars import ContextVar
from typing import Any, cast

from jinja2 import (
    ChainableUndefined,
    Environment,
    Template,
    Undefined,
    nodes,
    pass_context,
    pass_environment,
    pass_eval_context,
)
from jinja2.exceptions import SecurityError
from jinja2.filters import make_attrgetter, sync_do_join
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext, markup_join, str_join
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

# -- Budgets (read at use, so a test may patch them)
MAX_OUTPUT_CHARS = 65_536  # longest text a render outputs, and any one operation may build
MAX_RENDER_TEXT_CHARS = 16 * MAX_OUTPUT_CHARS  # all text one render builds, captured text too
MAX_WIDTH = MAX_OUTPUT_CHARS  # largest width, padding, count or precision an argument may ask
MAX_SEQUENCE_ITEMS = 10_000  # longest list or tuple that ``*`` or ``+`` may build
MAX_RANGE_ITEMS = 10_000  # longest ``range()``
MAX_INT_BITS = 1_024  # largest integer arithmetic may produce (about 308 digits)
MAX_EXPONENT = 100  # largest exponent ``**`` may take
MAX_RENDER_STEPS = 100_000  # loop iterations, calls, filters, operators, items built: per render
MAX_RENDER_SECONDS = 0.25  # CPU time one render (or one compile) may take


# -- Budget accounting


class BudgetExceeded(SecurityError):
    """A render went over a budget; ``budget`` is the constant's name."""

    def __init__(self, budget: str, detail: str) -> None:
        super().__init__(f"budget {budget} ({globals()[budget]}) exceeded: {detail}")
        self.budget = budget


class _Budget:
    """What one render (or compile) has used so far; over budget stays over budget.

    Time is the thread's CPU time, so a busy host (this process not scheduled) does not fail
    a render; reading that clock is slow, so it is read only once the cheap wall clock, which
    runs at least as fast, passes the deadline. A full garbage collection that runs during
    the render does not count: it costs in proportion to the worker's whole heap (a big batch
    of events), not to what the template did, whose allocations the other budgets bound."""

    __slots__ = ("chars", "collection_start", "cpu_start", "deadline", "steps")

    def __init__(self) -> None:
        self.cpu_start = time.thread_time()
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS
        self.steps = 0
        self.chars = 0
        self.collection_start: float | None = None

    def collection(self, phase: str) -> None:
        """A full collection starts or stops: its CPU time is taken out of the time used."""
        if phase == "start":
            self.collection_start = time.thread_time()
        elif self.collection_start is not None:
            self.cpu_start += time.thread_time() - self.collection_start
            self.collection_start = None

    def step(self, count: int = 1) -> None:
        """Count ``count`` steps, and check the clock."""
        self.steps += count
        if self.steps > MAX_RENDER_STEPS:
            raise BudgetExceeded(
                "MAX_RENDER_STEPS", "too many loop iterations, calls and operations"
            )
        if time.monotonic() >= self.deadline:
            used = time.thread_time() - self.cpu_start
            if used >= MAX_RENDER_SECONDS:
                raise BudgetExceeded("MAX_RENDER_SECONDS", "the render took too long")
            self.deadline = time.monotonic() + MAX_RENDER_SECONDS - used  # it was not running

    def text(self, chars: int) -> None:
        """Count ``chars`` characters of text built."""
        self.chars += chars
        if self.chars > MAX_RENDER_TEXT_CHARS:
            raise BudgetExceeded("MAX_RENDER_TEXT_CHARS", "the render built too much text")
        self.step()


_BUDGET: ContextVar[_Budget | None] = ContextVar("template_budget", default=None)


def _full_collection(phase: str, info: dict[str, int]) -> None:
    """The garbage collector's callback (it runs in the thread that collects): tell the
    render under way, if any, when a full collection starts and stops."""
    if info["generation"] == 2:
        budget = _BUDGET.get()
        if budget is not None:
            budget.collection(phase)


gc.callbacks.append(_full_collection)


@contextlib.contextmanager
def budgeted() -> Iterator[_Budget]:
    """A fresh budget for the code inside (a render, a compile, a load-time check)."""
    budget = _Budget()
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def _step(count: int = 1) -> None:
    """Count steps against the current budget (none outside a budget: nothing to count)."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.step(count)


def _number(value: int) -> str:
    """An integer for a message (huge ones by size: they may not even convert)."""
    return str(value) if value.bit_length() <= 64 else f"a {value.bit_length()}-bit number"


def _charge(result: Any, what: str, inputs: Iterable[Any] = ()) -> Any:
    """Bound and count what one operation built: text, a sequence or an integer."""
    if any(result is given for given in inputs):
        return result  # handed back, not built
    if isinstance(result, str | bytes):
        if len(result) > MAX_OUTPUT_CHARS:
            raise BudgetExceeded("MAX_OUTPUT_CHARS", f"{what} built {len(result)} characters")
        budget = _BUDGET.get()
        if budget is not None and result:
            budget.text(len(result))
    elif isinstance(result, int):
        if result.bit_length() > MAX_INT_BITS:
            raise BudgetExceeded("MAX_INT_BITS", f"{what} built {_number(result)}")
    elif isinstance(result, list | tuple | dict | set | frozenset):
        _step(len(result))
    return result


def _measure(value: Any, limit: int) -> tuple[int, int, int]:
    """About how long ``str(value)`` is (counting stops once past ``limit``), how many
    elements its containers hold and how deeply they nest; nothing is converted."""
    if isinstance(value, str):
        return len(value), 0, 0
    size = elements = depth = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and size <= limit:
        item, level = stack.pop()
        if isinstance(item, str | bytes | bytearray):
            size += len(item) + 3
        elif isinstance(item, int):
            size += item.bit_length() // 3 + 2
        elif isinstance(item, float) or item is None:
            size += 24
        elif isinstance(item, Undefined):
            continue
        elif isinstance(item, Namespace):
            stack.append((getattr(item, "_Namespace__attrs", {}), level))
            size += 13
        elif isinstance(item, Mapping | list | tuple | set | frozenset | MappingView):
            count = len(item)
            size += 2 + 4 * count
            elements += count
            depth = max(depth, level + 1)
            if size <= limit:
                parts: Iterable[Any] = (
                    (p for pair in item.items() for p in pair)
                    if isinstance(item, Mapping)
                    else cast(Iterable[Any], item)
                )
                stack.extend((part, level + 1) for part in parts)
        else:
            size += 64  # a short repr: a date, a range, a function, a loop
    return size, elements, depth


def _need_text(value: Any, what: str) -> None:
    """Refuse to turn a value into text when that text would be too long."""
    if not isinstance(value, str):
        size = _measure(value, MAX_OUTPUT_CHARS)[0]
        if size > MAX_OUTPUT_CHARS:
            raise BudgetExceeded(
                "MAX_OUTPUT_CHARS", f"{what} on a {type(value).__name__} of {size}+ characters"
            )


def _need_width(value: Any, what: str) -> None:
    """Refuse a width, count or precision (an integer, or a padding string) above MAX_WIDTH."""
    if isinstance(value, str):
        if len(value) > MAX_WIDTH:
            raise BudgetExceeded("MAX_WIDTH", f"{what} of {len(value)} characters")
    elif isinstance(value, int) and abs(value) > MAX_WIDTH:
        raise BudgetExceeded("MAX_WIDTH", f"{what} {_number(value)}")


def _need_size(size: int, what: str) -> None:
    """Refuse an operation that would build more than MAX_OUTPUT_CHARS characters."""
    if size > MAX_OUTPUT_CHARS:
        raise BudgetExceeded("MAX_OUTPUT_CHARS", f"{what} would build {size} characters")


def _need_items(items: int, what: str) -> None:
    """Refuse an operation that would build a list or tuple of more than MAX_SEQUENCE_ITEMS."""
    if items > MAX_SEQUENCE_ITEMS:
        raise BudgetExceeded("MAX_SEQUENCE_ITEMS", f"{what} would build {_number(items)} items")


def _check_percent(template: str | bytes, values: Any, what: str) -> None:
    """Refuse ``%``-formatting with a huge width or precision, or a huge result."""
    fmt = template.decode("latin-1") if isinstance(template, bytes) else template
    positional = values if isinstance(values, tuple) else (values,)
    mapping = values if isinstance(values, Mapping) else None
    size, index, i, end = len(fmt), 0, 0, len(fmt)
    while (i := fmt.find("%", i) + 1) > 0 and i < end:
        key = None
        if fmt[i] == "(":  # %(name)s, the name may hold balanced parentheses
            depth, j = 1, i + 1
            while j < end and depth:
                depth += {"(": 1, ")": -1}.get(fmt[j], 0)
                j += 1
            key, i = fmt[i + 1 : j - 1], j
        while i < end and fmt[i] in "-+ #0":
            i += 1
        numbers: list[Any] = []
        for part in ("width", "precision"):
            if part == "precision":
                if i >= end or fmt[i] != ".":
                    break
                i += 1
            if i < end and fmt[i] == "*":
                numbers.append(positional[index] if index < len(positional) else 0)
                index, i = index + 1, i + 1
            else:
                j = i
                while j < end and fmt[j] in "0123456789":
                    j += 1
                numbers.append(int(fmt[i:j]) if 0 < j - i <= 9 else MAX_WIDTH + 1 if j > i else 0)
                i = j
        if i < end and fmt[i] in "hlL":
            i += 1
        if i >= end:
            break
        conversion, i = fmt[i], i + 1
        if conversion == "%":
            size += 1
            continue
        for number in numbers:
            _need_width(number, f"{what} width or precision")
        if key is not None:
            lookup = key.encode("latin-1") if isinstance(template, bytes) else key
            value = mapping.get(lookup) if mapping is not None else None
        else:
            value = positional[index] if index < len(positional) else None
            index += 1
        size += sum(abs(n) for n in numbers if _is_int(n)) + _measure(value, MAX_OUTPUT_CHARS)[0]
        _need_size(size, what)


def _check_spec(spec: str, what: str) -> None:
    """Refuse a ``str.format`` spec with a width or precision above MAX_WIDTH (any run of
    digits counts, and Python reads any Unicode decimal digits there)."""
    digits = ""
    for char in f"{spec} ":
        if char.isdecimal():
            digits += char
        elif digits:
            _need_width(int(digits) if len(digits) <= 9 else MAX_WIDTH + 1, f"{what} width")
            digits = ""


class _BudgetFormatter(SandboxedFormatter):
    """The sandbox's ``str.format``, refusing huge widths and huge results."""

    def __init__(self, env: Environment, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self.size = 0

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        _need_text(value, "format()")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        _check_spec(format_spec, "format()")
        _need_text(value, "format()")
        text = super().format_field(value, format_spec)
        self.size += len(text)
        _need_size(self.size, "format()")
        return text


class _BudgetEscapeFormatter(_BudgetFormatter, SandboxedEscapeFormatter):
    """The same, for ``Markup.format`` (escapes its arguments)."""


# -- Guarded operations


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
    "**": operator.pow,
}


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (a bool counts, as in Python)."""
    return isinstance(value, int)


def _binop(symbol: str, left: Any, right: Any) -> Any:
    """``left <symbol> right``, refused before it builds something too big."""
    what = f"'{symbol}'"
    if symbol == "*":
        for sequence, count in ((left, right), (right, left)):
            if not _is_int(count):
                continue
            if isinstance(sequence, str | bytes):
                _need_size(len(sequence) * count, what)
            elif isinstance(sequence, list | tuple):
                _need_items(len(sequence) * count, what)
        too_many_bits = _is_int(left) and _is_int(right)
        if too_many_bits and left.bit_length() + right.bit_length() - 1 > MAX_INT_BITS:
            raise BudgetExceeded("MAX_INT_BITS", f"{what} of {_number(left)} and {_number(right)}")
    elif symbol == "**" and isinstance(right, int | float):
        if abs(right) > MAX_EXPONENT:
            raise BudgetExceeded("MAX_EXPONENT", f"exponent {right!r}"[:80])
        if _is_int(left) and _is_int(right) and (left.bit_length() - 1) * right + 1 > MAX_INT_BITS:
            raise BudgetExceeded("MAX_INT_BITS", f"{_number(left)} ** {right}")
    elif symbol == "+":
        if isinstance(left, str | bytes) and isinstance(right, str | bytes):
            _need_size(len(left) + len(right), what)
        elif isinstance(left, list | tuple) and isinstance(right, list | tuple):
            _need_items(len(left) + len(right), what)
    elif symbol == "%" and isinstance(left, str | bytes):
        _check_percent(left, right, what)
    return _charge(_BINOPS[symbol](left, right), what, (left, right))


def _range(*args: Any) -> range:
    """``range()``, refused beyond MAX_RANGE_ITEMS items."""
    result = range(*args)
    try:
        length = len(result)
    except OverflowError:
        length = MAX_RANGE_ITEMS + 1
    if length > MAX_RANGE_ITEMS:
        raise BudgetExceeded("MAX_RANGE_ITEMS", f"range() of {_number(length)} items")
    return result


def _guarded(iterable: Any, text_chars: int) -> Iterator[Any]:
    """The items of a loop's iterable, each a step, each the body's literal text."""
    budget = _BUDGET.get()
    for item in iterable:
        if budget is not None:
            budget.step()
            if text_chars:
                budget.text(text_chars)
        yield item


LOOP_GUARD = "budget-loop"  # internal filters: the lexer cannot read these names
CONCAT_GUARD = "budget-concat"


@pass_context
def _loop_guard(context: Context, iterable: Any, text_chars: int = 0) -> Iterator[Any]:
    """Put around every ``{% for %}`` iterable (``text_chars``: the body's literal text)."""
    return _guarded(iterable, text_chars)


@pass_context
def _concat_guard(context: Context, parts: tuple[Any, ...]) -> str:
    """Replaces every ``a ~ b``: refused before it builds more than MAX_OUTPUT_CHARS."""
    size = 0
    for part in parts:
        size += _measure(part, MAX_OUTPUT_CHARS)[0]
        _need_size(size, "'~'")
    eval_ctx = context.eval_ctx
    join = markup_join if eval_ctx.volatile or eval_ctx.autoescape else str_join
    return _charge(join(parts), "'~'")


def _check_join(items: list[Any], separator: Any, what: str) -> None:
    """Refuse a join whose result would be longer than MAX_OUTPUT_CHARS."""
    _step(len(items))
    _need_text(separator, what)
    size = len(str(separator)) * max(len(items) - 1, 0)
    for item in items:
        _need_size(size, what)
        size += _measure(item, MAX_OUTPUT_CHARS)[0]
    _need_size(size, what)


def _replace_size(text: Any, old: Any, new: Any, count: Any) -> int:
    """How long ``text.replace(old, new, count)`` would be (0 if the types do not fit)."""
    try:
        found = text.count(old) if old else len(text) + 1
        if _is_int(count) and count >= 0:
            found = min(found, count)
        return int(len(text) + found * (len(new) - len(old)))
    except TypeError:
        return 0  # the call itself will say what is wrong


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    """A call's argument, by position or by keyword (None if not given)."""
    return args[index] if len(args) > index else kwargs.get(name)


_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})


def _check_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a str/bytes/int method call that would build something huge; the arguments to
    call with (a join's items are read once, here)."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    what = f"{name}()"
    if isinstance(owner, str | bytes):
        if name in _WIDTH_METHODS:
            _need_width(_argument(args, kwargs, 0, "width"), f"{what} width")
        elif name == "expandtabs":
            size = _argument(args, kwargs, 0, "tabsize")
            _need_width(size, f"{what} tab size")
            tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
            _need_size(len(owner) + tabs * (size if _is_int(size) else 8), what)
        elif name == "replace" and len(args) >= 2:
            _need_size(
                _replace_size(owner, args[0], args[1], _argument(args, kwargs, 2, "count")), what
            )
        elif name == "join" and args:
            items = list(args[0])
            _check_join(items, owner, what)
            args = (items, *args[1:])
        elif name == "translate" and args and isinstance(args[0], Mapping):
            lengths = (len(v) for v in args[0].values() if isinstance(v, str | bytes))
            _need_size(len(owner) * max(lengths, default=1), what)
    elif isinstance(owner, int) and name == "to_bytes":
        _need_width(_argument(args, kwargs, 0, "length"), f"{what} length")
    elif isinstance(obj, LoopContext) and args:  # loop(children) in a recursive loop
        args = (_guarded(args[0], 0), *args[1:])
    return args


# -- Filters: every one is wrapped; some have argument checks, three are replaced


@pass_eval_context
def _join_filter(
    eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: str | int | None = None
) -> str:
    """Jinja's ``join``, refused before it builds more than MAX_OUTPUT_CHARS."""
    if attribute is not None:
        value = map(make_attrgetter(eval_ctx.environment, attribute), value)
    items = list(value)
    _check_join(items, d, "join()")
    return sync_do_join(eval_ctx, items, d)


@pass_environment
def _sum_filter(
    environment: Environment,
    iterable: Iterable[Any],
    attribute: str | int | None = None,
    start: Any = 0,
) -> Any:
    """Jinja's ``sum``, adding with the budgeted ``+``."""
    if isinstance(start, str | bytes):
        raise TypeError("sum() can't sum strings [use join instead]")
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    total = start
    for item in iterable:
        total = _binop("+", total, item)
    return total


@pass_environment
def _wordwrap_filter(
    environment: Environment,
    s: str,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> str:
    """Jinja's ``wordwrap``, refused before it joins more than MAX_OUTPUT_CHARS."""
    _need_width(width, "wordwrap() width")
    separator = environment.newline_sequence if wrapstring is None else wrapstring
    paragraphs = [
        textwrap.wrap(
            line,
            width=width,
            expand_tabs=False,
            replace_whitespace=False,
            break_long_words=break_long_words,
            break_on_hyphens=break_on_hyphens,
        )
        for line in s.splitlines()
    ]
    pieces = sum(max(len(lines), 1) for lines in paragraphs)
    size = sum(len(line) for lines in paragraphs for line in lines)
    _need_size(size + len(separator) * max(pieces - 1, 0), "wordwrap()")
    return separator.join(separator.join(lines) for lines in paragraphs)


def _check_indent(a: dict[str, Any]) -> None:
    width = a["width"]
    _need_width(width, "indent() width")
    pad = len(width) if isinstance(width, str) else width if _is_int(width) else 0
    text = str(a["s"])
    _need_size(len(text) + (text.count("\n") + 1) * max(pad, 0), "indent()")


def _check_truncate(a: dict[str, Any]) -> None:
    _need_width(a["length"], "truncate() length")
    _need_width(a["leeway"], "truncate() leeway")
    _need_text(a["end"], "truncate()")


def _check_replace(a: dict[str, Any]) -> None:
    for part in ("old", "new"):
        _need_text(a[part], "replace()")
    size = _replace_size(str(a["s"]), str(a["old"]), str(a["new"]), a["count"])
    _need_size(size, "replace()")


def _check_tojson(a: dict[str, Any]) -> None:
    indent = a["indent"]
    _need_width(indent, "tojson() indent")
    pad = len(indent) if isinstance(indent, str) else indent if _is_int(indent) else 0
    size, elements, depth = _measure(a["value"], MAX_OUTPUT_CHARS)
    _need_size(size + (elements + 1) * (1 + depth * max(pad, 0)) if pad else size, "tojson()")


def _check_pprint(a: dict[str, Any]) -> None:
    size, elements, _ = _measure(a["value"], MAX_OUTPUT_CHARS)
    _need_size(size + elements * size, "pprint()")  # a line may be indented by up to ``size``


def _check_urlize(a: dict[str, Any]) -> None:
    _need_width(a["trim_url_limit"], "urlize() trim_url_limit")
    for part in ("target", "rel"):
        _need_text(a[part], "urlize()")
    text = str(a["value"])
    extra = len(str(a["target"] or "")) + len(str(a["rel"] or "")) + 60
    links = sum(1 for word in text.split() if "." in word or "@" in word or ":" in word)
    _need_size(2 * len(text) + links * extra, "urlize()")


_FILTER_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "batch": lambda a: _need_width(a["linecount"], "batch() size"),
    "center": lambda a: _need_width(a["width"], "center() width"),
    "format": lambda a: _check_percent(str(a["value"]), a["kwargs"] or a["args"], "format()"),
    "indent": _check_indent,
    "pprint": _check_pprint,
    "replace": _check_replace,
    "round": lambda a: _need_width(a["precision"], "round() precision"),
    "slice": lambda a: _need_width(a["slices"], "slice() count"),
    "tojson": _check_tojson,
    "truncate": _check_truncate,
    "urlize": _check_urlize,
}
# These turn their input into text: refused when that text would be too long.
_TEXT_FILTERS = frozenset(
    {
        "capitalize", "center", "date", "e", "epoch_ms", "escape", "forceescape", "format",
        "indent", "iso", "lower", "replace", "safe", "string", "striptags", "title", "trim",
        "truncate", "upper", "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr",
    }
)  # fmt: skip
_PASS_ARGUMENTS = frozenset({"context", "eval_ctx", "environment", "env"})


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` counted as a step, its arguments checked, what it builds bounded."""
    signature = inspect.signature(func)
    parameters = list(signature.parameters)
    skip = 0 if getattr(func, "jinja_pass_arg", None) is None else 1  # context, environment...
    unbound = 0 if parameters and parameters[0] in _PASS_ARGUMENTS else skip  # ...not in signature
    check = _FILTER_CHECKS.get(name)
    text_input = name in _TEXT_FILTERS
    what = f"{name}()"

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _step()
        if text_input and len(args) > skip:
            _need_text(args[skip], what)
        if check is not None:
            try:
                bound = signature.bind(*args[unbound:], **kwargs)
            except TypeError:
                pass  # the filter itself says what is wrong
            else:
                bound.apply_defaults()
                check(bound.arguments)
        return _charge(func(*args, **kwargs), what, args)

    return guarded


# -- The parser's additions: every loop and every ``~`` goes through a guard


def _literal_text(body: list[nodes.Node]) -> int:
    """Characters of literal text in a loop body (inner loops and macros count their own)."""
    total, stack = 0, list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, nodes.TemplateData):
            total += len(node.data)
        elif not isinstance(node, nodes.For | nodes.Macro):
            stack.extend(node.iter_child_nodes())
    return total


class _Guard(NodeTransformer):
    """Wraps every ``{% for %}`` iterable and every ``~`` in the internal guard filters."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        chars = nodes.Const(_literal_text(node.body), lineno=node.lineno)
        node.iter = nodes.Filter(node.iter, LOOP_GUARD, [chars], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        parts = nodes.Tuple(node.nodes, "load", lineno=node.lineno)
        return nodes.Filter(parts, CONCAT_GUARD, [], [], None, None, lineno=node.lineno)


class MappingSandbox(ImmutableSandboxedEnvironment):
    """No mutation, no unsafe attributes (they raise), and every render within the budgets."""

    intercepted_binops = frozenset(_BINOPS)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Parse, then put the guards around loops and ``~``."""
        tree = _Guard().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Every operator, refused when its result would be huge."""
        _step()
        return _binop(operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        """``x.name``: a step (so even a loop doing nothing else counts)."""
        _step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        """``x[key]``: a step."""
        _step()
        return super().getitem(obj, argument)

    def call(
        __self,  # the sandbox's own spelling: it keeps every keyword free for the call
        __context: Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Every call: a step, its arguments checked, what it builds bounded."""
        _step()
        args = _check_call(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        what = f"{getattr(__obj, '__name__', type(__obj).__name__)}()"
        return _charge(result, what, (getattr(__obj, "__self__", None), *args))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format`` and ``format_map`` with the budgeted formatter."""
        if not callable(value) or getattr(value, "__name__", None) not in ("format", "format_map"):
            return None
        owner = getattr(value, "__self__", None)
        if not isinstance(owner, str):
            return None
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            formatter = (
                _BudgetEscapeFormatter(self, escape=owner.escape)
                if isinstance(owner, Markup)
                else _BudgetFormatter(self)
            )
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                return type(owner)(formatter.vformat(owner, (), args[0]))
            return type(owner)(formatter.vformat(owner, args, kwargs))

        return functools.update_wrapper(wrapper, value)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        """Touching an unsafe attribute is an error, not a silent empty string."""
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe"
        )


def _finalize(value: Any) -> Any:
    """``None`` renders as nothing rather than the word "None"; no value outputs more than
    MAX_OUTPUT_CHARS, and what is output counts towards MAX_RENDER_TEXT_CHARS."""
    if value is None:
        return ""
    size = len(value) if isinstance(value, str) else _measure(value, MAX_OUTPUT_CHARS)[0]
    if size > MAX_OUTPUT_CHARS:
        raise BudgetExceeded("MAX_OUTPUT_CHARS", f"a value of {size}+ characters output")
    budget = _BUDGET.get()
    if budget is not None and size:
        budget.text(size)
    return value


def new_sandbox(
    filters: Mapping[str, Callable[..., Any]], names: Mapping[str, Any]
) -> MappingSandbox:
    """The sandbox with Jinja's filters and ``filters``, every one budgeted, and Jinja's
    globals and ``names`` (no ``lipsum``, ``cycler``, ``joiner``; a bounded ``range``)."""
    env = MappingSandbox(undefined=ChainableUndefined, autoescape=False, finalize=_finalize)
    env.filters.update(filters)
    env.filters.update(join=_join_filter, sum=_sum_filter, wordwrap=_wordwrap_filter)
    env.filters.pop("random", None)  # not a function of the event: would break replay
    env.filters.update({name: _guard_filter(name, f) for name, f in env.filters.items()})
    env.filters.update({LOOP_GUARD: _loop_guard, CONCAT_GUARD: _concat_guard})
    for name in ("lipsum", "cycler", "joiner"):
        env.globals.pop(name, None)
    env.globals.update(names, range=_range)
    return env


INTERNAL_FILTERS = frozenset({LOOP_GUARD, CONCAT_GUARD})  # the parser's, not the author's


def generate(template: Template, context: dict[str, Any]) -> str:
    """Render ``template`` within a fresh budget; BudgetExceeded when it goes over one."""
    parts: list[str] = []
    token = _BUDGET.set(_Budget())  # what budgeted() does, without its cost per render
    chunks = cast(Generator[str, None, None], template.generate(context))
    try:
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise BudgetExceeded("MAX_OUTPUT_CHARS", f"output of {size}+ characters")
            parts.append(chunk)
    finally:
        chunks.close()
        _BUDGET.reset(token)
    return "".join(parts)
