"""Template budgets: a template that would build something huge, or run long, fails its render
at once, naming the budget; it never stalls the worker. No timing assertions: a failure that
names a size budget (not MAX_RENDER_SECONDS) was caught before the work was done."""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instruqt_crm.errors import MappingFailure
from instruqt_crm.events import parse_event
from instruqt_crm.mapping import apply_event, parse_mapping, sandbox
from instruqt_crm.mapping.sandbox import (
    MAX_EXPONENT,
    MAX_INT_BITS,
    MAX_OUTPUT_CHARS,
    MAX_RANGE_ITEMS,
    MAX_RENDER_STEPS,
    MAX_RENDER_TEXT_CHARS,
    MAX_SEQUENCE_ITEMS,
    MAX_WIDTH,
    BudgetExceeded,
)
from instruqt_crm.mapping.templates import RenderError, check_template, render, template_context
from samples.signing import track_event

EVENT = parse_event("msg_1", track_event(user_id="u1", track_slug="Intro-K8s", score=4))
CONTEXT = template_context(EVENT, "ada@example.com")
BUDGETS = (
    "MAX_OUTPUT_CHARS", "MAX_RENDER_TEXT_CHARS", "MAX_WIDTH", "MAX_SEQUENCE_ITEMS",
    "MAX_RANGE_ITEMS", "MAX_INT_BITS", "MAX_EXPONENT", "MAX_RENDER_STEPS", "MAX_RENDER_SECONDS",
)  # fmt: skip
REASON = re.compile(rf"^SecurityError: budget ({'|'.join(BUDGETS)}) \([0-9.]+\) exceeded: \S")


def fails(source: str, *budgets: str) -> str:
    """Render ``source``: it must fail over one of ``budgets``; the reason."""
    with pytest.raises(RenderError) as info:
        render(source, CONTEXT)
    reason = str(info.value)
    match = REASON.match(reason)
    assert match, reason
    assert match[1] in budgets, reason
    assert isinstance(info.value.__cause__, BudgetExceeded)
    assert info.value.__cause__.budget == match[1]
    return reason


def test_the_budgets_are_what_the_readme_says() -> None:
    assert (MAX_OUTPUT_CHARS, MAX_WIDTH, MAX_SEQUENCE_ITEMS, MAX_RANGE_ITEMS) == (
        65_536,
        65_536,
        10_000,
        10_000,
    )
    assert (MAX_INT_BITS, MAX_EXPONENT, MAX_RENDER_STEPS) == (1_024, 100, 100_000)
    assert MAX_RENDER_TEXT_CHARS == 16 * MAX_OUTPUT_CHARS
    assert sandbox.MAX_RENDER_SECONDS == 0.25


# -- Widths and counts


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x'|center(10**8) }}",
        "{{ 'x'|center(100000000) }}",  # a constant: folded at compile time, refused there too
        f"{{{{ 'x'|center({MAX_WIDTH + 1}) }}}}",
        "{{ ['x']|map('center', 10**8)|join }}",
        "{{ 'x'.center(10**8) }}",
        "{{ 'x'.ljust(10**8) }} ",
        "{{ ('x'|attr('rjust'))(10**8) }}",
        "{{ '7'.zfill(10**8) }}",
    ],
)
def test_center_and_padding_widths(source: str) -> None:
    fails(source, "MAX_WIDTH")


def test_a_width_up_to_the_budget_renders() -> None:
    assert len(render(f"{{{{ 'x'|center({MAX_WIDTH}) }}}}", CONTEXT)) == 1
    assert render(f"{{{{ ('x'|center({MAX_WIDTH}))|length }}}}", CONTEXT) == str(MAX_WIDTH)


@pytest.mark.parametrize(
    "source",
    [
        "{{ '{:>100000000}'.format(1) }}",
        "{{ '{:>{}}'.format(1, 10**8) }}",
        "{{ '{:.100000000f}'.format(1.5) }}",
        "{{ '{:>\u0661\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660}'.format(1) }}",
        "{{ '{x:>100000000}'.format_map({'x': 1}) }}",
        "{{ ('{:>100000000}'|attr('format'))(1) }}",
    ],
)
def test_str_format_widths(source: str) -> None:
    fails(source, "MAX_WIDTH")


@pytest.mark.parametrize(
    "source",
    [
        "{{ '%100000000d' % 1 }}",
        "{{ '%.100000000f' % 1.0 }}",
        "{{ '%-100000000s' % 'x' }}",
        "{{ '%*d' % (10**8, 1) }}",
        "{{ '%.*f' % (10**8, 1.0) }}",
        "{{ '%(a)100000000s' % {'a': 1} }}",
        "{{ '%100000000s'|format('x') }}",
        "{{ '%(a)100000000s'|format(a='x') }}",
    ],
)
def test_percent_formatting_widths(source: str) -> None:
    fails(source, "MAX_WIDTH")


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x'|wordwrap(10**8) }}",
        "{{ 'x'|indent(10**8) }}",
        "{{ 'x'|truncate(10**8) }}",
        "{{ 'x'|truncate(10, leeway=10**8) }}",
        "{{ [1]|batch(10**8, 'x')|list }}",
        "{{ [1]|slice(10**8)|list }}",
        "{{ 5|round(-10**8) }}",
        "{{ (1).to_bytes(10**8, 'big') }}",
        "{{ ('\t' * 10).expandtabs(10**8) }}",
        "{{ [1]|tojson(10**8) }}",
    ],
)
def test_other_width_and_count_arguments(source: str) -> None:
    fails(source, "MAX_WIDTH")


# -- Text: no operation builds more than MAX_OUTPUT_CHARS


@pytest.mark.parametrize(
    "source",
    [
        "{{ (['a' * 65536] * 1000)|join }}",
        "{{ ''.join(['a' * 65536] * 1000) }}",
        "{{ ['a' * 65536] * 1000 }}",  # printing the list
        "{{ (['a' * 65536] * 1000)|string|length }}",
        "{{ ['a' * 65536] * 1000 ~ '' }}",
        "{{ 'x' * 10**8 }}",
        f"{{{{ 'x' * {MAX_OUTPUT_CHARS + 1} }}}}",
        "{{ ('x' * 60000) + ('x' * 60000) }}",
        "{{ ('x' * 60000)|replace('x', 'y' * 60000) }}",
        "{{ ('x' * 60000).replace('x', 'y' * 60000) }}",
        "{{ ('\t' * 60000).expandtabs(60000) }}",
        "{{ 'ab'.translate({97: 'x' * 60000, 98: 'y' * 60000}) }}",
        "{{ ('a\n' * 30000)|indent(60000) }}",
        "{{ ('a b ' * 15000)|wordwrap(1, wrapstring='x' * 1000) }}",
        "{{ '{0}{0}{0}'.format('a' * 60000) }}",
        "{{ '%(a)s%(a)s%(a)s' % {'a': 'a' * 60000} }}",
        "{{ '%s%s'|format('a' * 60000, 'b' * 60000) }}",
        "{{ (['a' * 65536] * 1000)|pprint }}",
        "{% set ns = namespace(x=[]) %}{% for i in range(900) %}{% set ns.x = [ns.x] %}"
        "{% endfor %}{{ ns.x|tojson(60000) }}",
        "{{ (['<' * 60000]|join)|e }}",
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}{{ ns.s|length }}",
        "{% for i in range(7) %}{{ 'x' * 10000 }}{% endfor %}",  # the output as a whole
    ],
)
def test_text_bombs(source: str) -> None:
    fails(source, "MAX_OUTPUT_CHARS")


def test_text_up_to_the_budget_renders() -> None:
    source = f"{{{{ 'x' * {MAX_OUTPUT_CHARS} }}}}"
    assert render(source, CONTEXT) == "x" * MAX_OUTPUT_CHARS
    joined = f"{{{{ (['ab' * 8] * {MAX_OUTPUT_CHARS // 16})|join }}}}"
    assert len(render(joined, CONTEXT)) == MAX_OUTPUT_CHARS


def test_text_captured_in_loops_and_macros_counts() -> None:
    fails(
        "{% set s %}{% for i in range(10000) %}" + "x" * 1000 + "{% endfor %}{% endset %}"
        "{{ s|length }}",
        "MAX_RENDER_TEXT_CHARS",
    )
    fails(
        "{% macro m() %}" + "x" * 9000 + "{{ caller() }}{% endmacro %}"
        "{% set s %}{% for i in range(10000) %}{% call m() %}{% endcall %}{% endfor %}{% endset %}"
        "{{ s|length }}",
        "MAX_RENDER_TEXT_CHARS",
    )
    fails(
        "{% for i in range(10000) %}{% set x = 'y' * 60000 %}{% endfor %}",
        "MAX_RENDER_TEXT_CHARS",
    )


# -- Sequences, ranges, integers


@pytest.mark.parametrize(
    ("source", "budget"),
    [
        ("{{ [1] * 10**8 }}", "MAX_SEQUENCE_ITEMS"),
        ("{{ (1, 2) * 10**8 }}", "MAX_SEQUENCE_ITEMS"),
        (f"{{{{ [1] * {MAX_SEQUENCE_ITEMS + 1} }}}}", "MAX_SEQUENCE_ITEMS"),
        ("{{ ([1] * 10000) + ([1] * 10000) }}", "MAX_SEQUENCE_ITEMS"),
        ("{{ ([[0] * 10000] * 1000)|sum(start=[]) }}", "MAX_SEQUENCE_ITEMS"),
        ("{{ range(10**9)|list }}", "MAX_RANGE_ITEMS"),
        ("{{ range(10**30)|length }}", "MAX_RANGE_ITEMS"),
        (f"{{{{ range({MAX_RANGE_ITEMS + 1})|list|length }}}}", "MAX_RANGE_ITEMS"),
    ],
)
def test_sequence_and_range_bombs(source: str, budget: str) -> None:
    fails(source, budget)


def test_sequences_and_ranges_up_to_the_budget_render() -> None:
    assert render(f"{{{{ ([1] * {MAX_SEQUENCE_ITEMS})|length }}}}", CONTEXT) == "10000"
    assert render(f"{{{{ range({MAX_RANGE_ITEMS})|list|length }}}}", CONTEXT) == "10000"


@pytest.mark.parametrize(
    ("source", "budget"),
    [
        (
            "{% set ns = namespace(n=10) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
            "{% endfor %}{{ ns.n }}",
            "MAX_INT_BITS",
        ),
        ("{% set n = 10 %}" + "{% set n = n * n %}" * 40 + "{{ n }}", "MAX_INT_BITS"),
        (
            "{% set ns = namespace(n=10) %}{% for i in range(40) %}{% set ns.n = ns.n ** 2 %}"
            "{% endfor %}{{ ns.n }}",
            "MAX_INT_BITS",
        ),
        ("{{ (2 ** 100) ** 100 }}", "MAX_INT_BITS"),
        ("{{ (2 ** 100) ** 11 }}", "MAX_INT_BITS"),
        ("{{ 10 ** 1000000 }}", "MAX_EXPONENT"),
        (f"{{{{ 2 ** {MAX_EXPONENT + 1} }}}}", "MAX_EXPONENT"),
        ("{{ 1.5 ** (10 ** 9) }}", "MAX_EXPONENT"),
        ("{{ ('f' * 60000)|int(base=16) }}", "MAX_INT_BITS"),
        ("{{ (2 ** 100) ** 10 * (2 ** 100) }}", "MAX_INT_BITS"),
    ],
)
def test_integer_bombs(source: str, budget: str) -> None:
    fails(source, budget)


def test_integers_up_to_the_budget_render() -> None:
    assert render(f"{{{{ 2 ** {MAX_EXPONENT} }}}}", CONTEXT) == str(2**MAX_EXPONENT)
    assert render("{{ (2 ** 100) ** 10 }}", CONTEXT) == str(2**1000)
    assert render("{{ event.score * 1627575297312 }}", CONTEXT) == str(4 * 1627575297312)


# -- Time: steps (deterministic) and the wall clock (the backstop)


@pytest.mark.parametrize(
    "source",
    [
        "{% for a in range(10**4) %}{% for b in range(10**4) %}{% endfor %}{% endfor %}",
        "{% for a in range(10**4) %}{% for b in range(10**4) if b < 0 %}x{% endfor %}{% endfor %}",
        "{% set l = range(10**4)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}",
        "{% for x in range(10000) recursive %}{% if loop.depth < 3 %}"
        "{{ loop(range(10000)) }}{% endif %}{% endfor %}",
    ],
)
def test_nested_loops(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the steps must stop them, however slow the machine: the clock is only the backstop
    monkeypatch.setattr(sandbox, "MAX_RENDER_SECONDS", 60.0)
    fails(source, "MAX_RENDER_STEPS")


def test_exponential_macro_recursion() -> None:
    fails(
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(40) }}",
        "MAX_RENDER_STEPS",
        "MAX_RENDER_SECONDS",
    )


def test_a_render_that_runs_long_stops_at_the_deadline() -> None:
    # each step is cheap to count but slow to do (10 ** 65536): only the clock catches it
    fails(
        f"{{% for i in range({MAX_RANGE_ITEMS}) %}}{{{{ i|round(-{MAX_WIDTH}) }}}}{{% endfor %}}",
        "MAX_RENDER_SECONDS",
    )


def test_the_deadline_is_checked_at_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "MAX_RENDER_SECONDS", 0.0)
    reason = fails("{{ event.track_slug }}", "MAX_RENDER_SECONDS")
    assert reason == (
        "SecurityError: budget MAX_RENDER_SECONDS (0.0) exceeded: the render took too long"
    )


def test_time_not_running_does_not_count() -> None:
    # a host too busy to run the worker stalls a render, but does not fail it: CPU time counts
    nap = {**CONTEXT, "nap": lambda: time.sleep(sandbox.MAX_RENDER_SECONDS + 0.05) or ""}
    assert render("{{ nap() }}{{ event.track_slug }}", nap) == "Intro-K8s"


def test_a_full_collection_during_a_render_does_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # a worker holding a big batch may collect for longer than a render may run
    def slow_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:  # after the sandbox's own callback
            started = time.thread_time()
            while time.thread_time() - started < 2 * sandbox.MAX_RENDER_SECONDS:
                pass

    monkeypatch.setattr(sandbox, "MAX_RENDER_SECONDS", 0.05)
    collect = {**CONTEXT, "collect": lambda: str(gc.collect())[:0]}
    gc.callbacks.append(slow_collection)  # the collector holds this list: patching cannot do
    try:
        assert render("{{ collect() }}{{ event.track_slug }}", collect) == "Intro-K8s"
    finally:
        gc.callbacks.remove(slow_collection)
    # the CPU time spent outside collections still counts
    spin = {**CONTEXT, "spin": lambda: slow_collection("start", {"generation": 2}) or ""}
    with pytest.raises(RenderError, match="MAX_RENDER_SECONDS"):
        render("{{ spin() }}{{ event.track_slug }}", spin)


def test_steps_are_per_render() -> None:
    loop = f"{{% for i in range({MAX_RANGE_ITEMS}) %}}{{% endfor %}}ok"
    for _ in range(20):  # 20 renders: far more steps in all than one render may take
        assert render(loop, CONTEXT) == "ok"


# -- Load time, and the path to a failed event


def test_load_time_check_does_not_run_the_bomb() -> None:
    check_template("{{ 'x'|center(100000000) }}")  # compiles (the fold is left to render time)
    check_template("{% for a in range(10**4) %}{% for b in range(10**4) %}{% endfor %}{% endfor %}")
    with pytest.raises(ValueError, match="unknown filter 'budget'"):
        check_template("{{ [1]|budget-loop }}")  # the guards cannot be named in a template


def test_a_bomb_in_a_mapping_fails_that_event_only() -> None:
    mapping = parse_mapping(
        "version: 1\ncrm: hubspot\nobject: contact\n"
        "properties:\n  instruqt_track: {}\n  instruqt_note: {}\n"
        "events:\n  'track.*':\n    properties:\n"
        '      instruqt_track: "{{ event.track_slug }}"\n'
        "      instruqt_note: \"{{ 'x'|center(10**8) }}\"\n"
    )
    with pytest.raises(MappingFailure) as info:
        apply_event(mapping, EVENT, None)
    assert info.value.category == "mapping"
    assert info.value.reason == (
        "rule 'track.*', property 'instruqt_note': template failed: "
        "SecurityError: budget MAX_WIDTH (65536) exceeded: center() width 100000000"
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ email and email.endswith('@example.com') }}", "True"),
        ("{{ '%05.1f|%-4s|%(x)s' % (3.14159, 'ab', 1) if false else '%05.1f' % 3.14159 }}",
         "003.1"),
        ("{{ '%-4s|%(a)s' % 'ab' if false else '%-4s|' % 'ab' }}", "ab  |"),
        ("{{ '[{:>6}|{:.2f}]'.format(event.score, 2.5) }}", "[     4|2.50]"),
        ("{{ [event.track_slug, user_id]|join('/') }}", "Intro-K8s/u1"),
        ("{{ event.track_slug ~ '-' ~ event.score }}", "Intro-K8s-4"),
        ("{% for k in ['a', 'b'] %}{{ loop.index }}{{ k }}{% endfor %}", "1a2b"),
        ("{{ range(3)|map('string')|join(',') }}", "0,1,2"),
        ("{{ [1, 2, 3]|sum }}|{{ [[1], [2]]|sum(start=[]) }}", "6|[1, 2]"),
        ("{{ 'a b c'|wordwrap(3) }}", "a b\nc"),
        ("{{ 'a\nb'|indent(2, true) }}", "a\n  b"),
        ("{{ 'hello world'|truncate(8, leeway=0) }}", "hello..."),
        ("{{ 'abc'|replace('b', 'x') }}|{{ 'abc'.replace('b', 'yy') }}", "axc|ayyc"),
        ("{{ {'b': 1, 'a': [1, 2]}|tojson }}", '{"a": [1, 2], "b": 1}'),
        ("{{ 'x'|center(5) }}|", "x  |"),
        ("{{ 2 ** 10 }} {{ 7 // 2 }} {{ 7 % 4 }} {{ 7 - 9 }} {{ 1 / 4 }}", "1024 3 3 -2 0.25"),
        ("{{ [1, 2] + [3] }} {{ 'ab' * 2 }} {{ (1,) * 2 }}", "[1, 2, 3] abab (1, 1)"),
        ("{% set ns = namespace(n=0) %}{% for i in range(5) %}{% set ns.n = ns.n + i %}"
         "{% endfor %}{{ ns.n }}", "10"),
        ("{% for x in [[1, [2]], 3] recursive %}{% if x is iterable %}{{ loop(x) }}"
         "{% else %}{{ x }}{% endif %}{% endfor %}", "123"),
        ("{{ event.nope ~ 'x' }}{{ event.nope|upper }}{{ event.nope|join }}", "x"),
    ],
)  # fmt: skip
def test_ordinary_templates_still_render(source: str, expected: str) -> None:
    assert render(source, CONTEXT) == expected


# -- Random combinations: they render, or fail over a budget; nothing else


def _width(low: int = 0) -> st.SearchStrategy[int]:
    """Small, huge and boundary widths."""
    return st.one_of(
        st.integers(low, 80),
        st.integers(low, 10**12),
        st.sampled_from([MAX_WIDTH - 1, MAX_WIDTH, MAX_WIDTH + 1, MAX_OUTPUT_CHARS // 3]),
    )


TEXT = st.sampled_from(
    ["''", "'-'", "'ab'", "' '", "'\\n'", "'x' * 1000", "event.track_slug", "'a.b@c.io <i>'"]
)
COUNT = st.one_of(st.integers(0, 10), st.integers(0, 10**12), st.just(MAX_SEQUENCE_ITEMS))
Step = Callable[[str], str]


def _step(template: str, *arguments: st.SearchStrategy[object]) -> st.SearchStrategy[Step]:
    """A step ``t -> template`` where ``{t}`` is the expression so far and ``{0}``... the
    arguments (``\u00ab``/``\u00bb`` stand for literal braces)."""

    def build(values: tuple[object, ...]) -> Step:
        def apply(t: str) -> str:
            text = template.replace("\u00ab", "{").replace("\u00bb", "}")
            for index, value in enumerate(values):
                text = text.replace(f"{{{index}}}", str(value))
            return text.replace("{t}", t)

        return apply

    return st.tuples(*arguments).map(build)


WHOLE_TEXT_FILTERS = [
    "upper", "title", "urlize", "tojson", "pprint", "e", "striptags", "trim", "reverse",
    "wordcount|string", "list|string", "list|unique|join", "list|sort|join",
]  # fmt: skip
STEPS = st.one_of(
    _step("({t})|center({0})", _width()),
    _step("({t})|indent({0}, true, true)", _width()),
    _step("({t})|wordwrap({0})", _width(1)),
    _step("({t})|wordwrap({0}, wrapstring={1})", _width(1), TEXT),
    _step("({t})|truncate({0})", _width(3)),
    _step("({t})|replace({0}, {1})", TEXT, TEXT),
    _step("({t})|replace('a', {t})"),
    _step("'%{0}s'|format({t})", _width()),
    _step("'%.{0}f %s' % ({1}, {t})", _width(), st.integers(0, 10**6)),
    _step("'\u00ab:>{0}\u00bb'.format({t})", _width()),
    _step("'\u00ab:^\u00abw\u00bb\u00bb'.format({t}, w={0})", _width()),
    _step("({t}) ~ ({t})"),
    _step("({t}) + ({t})"),
    _step("({t}) * {0}", COUNT),
    _step("([{t}] * {0})|join({1})", COUNT, TEXT),
    _step("({t}).{0}({1})", st.sampled_from(["center", "ljust", "rjust", "zfill"]), _width()),
    _step("({t}).expandtabs({0})", _width()),
    _step("({t})|list|batch({0})|map('join')|join({1})", _width(1), TEXT),
    _step("({t})|list|slice({0})|map('join')|join", _width(1)),
    _step("((({t})|length + {0}) ** {1})|string", COUNT, st.integers(0, 2 * MAX_EXPONENT)),
    _step("((({t})|length) * {0} * {0})|string", COUNT),
    _step("((({t})|length)|round(-{0}))|string", _width()),
    _step("[{t}, [{t}]]|tojson({0})", _width()),
    _step("({t})|{0}", st.sampled_from(WHOLE_TEXT_FILTERS)),
)
WRAPPERS = st.one_of(
    st.just("{{ {e} }}"),
    st.integers(0, 2 * MAX_RANGE_ITEMS).map(
        lambda n: f"{{% for i in range({n}) %}}{{{{ {{e}} }}}}{{% endfor %}}"
    ),
    st.just("{% set s %}{% for i in range(100) %}{{ {e} }}{% endfor %}{% endset %}{{ s|length }}"),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXT, st.lists(STEPS, min_size=1, max_size=4), WRAPPERS)
def test_random_filter_chains_render_or_fail_over_a_budget(
    start: str, steps: list[Step], wrapper: str
) -> None:
    expression = start
    for step in steps:
        expression = step(expression)
    source = wrapper.replace("{e}", expression)
    try:
        text = render(source, CONTEXT)
    except RenderError as exc:
        assert REASON.match(str(exc)), f"{source}\n{exc}"
    else:
        assert len(text) <= MAX_OUTPUT_CHARS
