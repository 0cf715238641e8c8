"""Garbage in, MappingError out: the loader never raises anything else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instruqt_crm.mapping import Mapping, MappingError, parse_mapping

SHIPPED = (Path(__file__).resolve().parents[1] / "mappings" / "hubspot.yaml").read_text()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = [
    "version", "crm", "object", "identity", "properties", "events", "ignore", "salesforce",
    "email_params", "lookup", "match_key", "type", "label", "description", "merge", "value",
    "when", "lead_defaults", "track.*", "track.completed", "instruqt_x", "<<",
]  # fmt: skip
WORDS = [
    "hubspot", "salesforce", "contact", "Contact", "auto", "union", "count", "latest",
    "set_once", "min", "max", "string", "number", "datetime", "bool", "date", "track.*",
    "{{ event.track_slug }}", "{{ event.score / 0 }}", "{% if %}", "{{ params.x | iso }}",
    "instruqt_x", "[", "*", "", "1", "true",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(WORDS),
)
plain = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=25,
)
shaped = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS + WORDS), children, max_size=6)
    ),
    max_leaves=40,
)


def _accepts_or_explains(data: str | bytes) -> None:
    """parse_mapping returns a Mapping or raises MappingError with file:line lines."""
    try:
        result = parse_mapping(data, "fuzz.yaml")
    except MappingError as exc:
        assert exc.problems
        assert all(line.startswith("fuzz.yaml:") for line in exc.problems)
    else:
        assert isinstance(result, Mapping)


@FUZZ
@given(st.text())
def test_random_text(text: str) -> None:
    _accepts_or_explains(text)


@FUZZ
@given(st.binary())
def test_random_bytes(data: bytes) -> None:
    _accepts_or_explains(data)


@FUZZ
@given(st.one_of(plain, shaped))
def test_random_structures(data: Any) -> None:
    _accepts_or_explains(yaml.safe_dump(data, allow_unicode=True))


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), shaped, max_size=8))
def test_random_top_level_mappings(data: dict[str, Any]) -> None:
    base = {"version": 1, "crm": "hubspot", "object": "contact", "properties": {"x": {}}}
    _accepts_or_explains(yaml.safe_dump({**base, **data}, allow_unicode=True))


@FUZZ
@given(st.data())
def test_mutated_shipped_mapping(data: st.DataObject) -> None:
    text = SHIPPED
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 12))
        insert = data.draw(st.text(alphabet=":{}[]-*&!|>'\"#%\n\t abc12", max_size=6))
        text = text[:at] + insert + text[at + cut :]
    _accepts_or_explains(text)


def test_pathological_documents() -> None:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)
    )
    for text in (
        "[" * 5000,
        "a: " + "{b: " * 2000,
        "- " * 3000 + "x",
        laughs,
        "a: &a {<<: *a}\n",
        "a: !!binary zz\n",
        "a: !!timestamp nope\n",
        "a: !!int x\n",
        "a: !custom x\n",
        "b: !custom {x: 1}\n",
        "\x00",
        "version: 1\ncrm: hubspot\nobject: contact\nproperties: {x: {}}\n"
        "events: {'*': {properties: {x: \"{{ ((((((((((((((((((((((((((((1" + ")" * 28 + '}}"}}}',
    ):
        _accepts_or_explains(text)
