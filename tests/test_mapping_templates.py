"""Templates (sandboxed Jinja2, filters) and applying a mapping to one event."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instruqt_crm.errors import MappingFailure, PermanentError
from instruqt_crm.events import parse_event
from instruqt_crm.mapping import PropertyChange, apply_event, parse_mapping
from instruqt_crm.mapping.templates import (
    RenderError,
    check_template,
    render,
    template_context,
    truthy,
)
from instruqt_crm.mapping.values import coerce
from samples.signing import track_event

BODY = track_event(
    user_id="gOGhYjyoPJhINJFOugIgiL4pdzu2",
    track_slug="Intro-K8s",
    score=4,
    params={"icp_company": "Acme", "icp_email": "Ada@Example.com"},
)
EVENT = parse_event("msg_1", BODY)
CONTEXT = template_context(EVENT, "ada@example.com")


def r(source: str) -> str:
    """Render against the sample event."""
    check_template(source)
    return render(source, CONTEXT)


def test_context_names_and_normalised_timestamp() -> None:
    assert r("{{ event.timestamp }}") == "2021-07-29T16:14:57.312Z"
    assert r("{{ type }}|{{ user_id }}|{{ email }}") == (
        "track.challenge_attempted|gOGhYjyoPJhINJFOugIgiL4pdzu2|ada@example.com"
    )
    assert r("{{ params.icp_company }}") == "Acme"
    assert EVENT.body["timestamp"] == "2021-07-29T16:14:57.31297754Z"  # body untouched


def test_missing_values_render_empty() -> None:
    assert r("{{ event.nope }}") == ""
    assert r("{{ event.nope.deeper.still }}") == ""
    assert r("{{ params.nope }}") == ""
    assert r("{{ event.invite_id }}") == ""  # None is nothing, not "None"
    assert r("{{ event.nope or event.track_id }}") == "rzwlxtp92ted"
    assert render("{{ email }}", template_context(EVENT, None)) == ""


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ event.timestamp | iso }}", "2021-07-29T16:14:57.312Z"),
        ("{{ '2021-07-29T18:14:57+02:00' | iso }}", "2021-07-29T16:14:57.000Z"),
        ("{{ 1627575297 | iso }}", "2021-07-29T16:14:57.000Z"),
        ("{{ 1627575297312 | iso }}", "2021-07-29T16:14:57.312Z"),
        ("{{ '1627575297' | iso }}", "2021-07-29T16:14:57.000Z"),
        ("{{ event.nope | iso }}", ""),
        ("{{ event.timestamp | epoch_ms }}", "1627575297312"),
        ("{{ '1970-01-01T00:00:01Z' | epoch_ms }}", "1000"),
        ("{{ event.timestamp | date }}", "2021-07-29"),
        ("{{ '2021-07-29T23:30:00-02:00' | date }}", "2021-07-30"),
        ("{{ event.track_slug | lower }}", "intro-k8s"),
        ("{{ event.nope | default('none given') }}", "none given"),
        ("{{ [event.track_id, event.challenge_id] | join('/') }}", "rzwlxtp92ted/dxhrbpuvvia9"),
        ("{{ first_of(event.nope, params.nope, event.track_slug) }}", "Intro-K8s"),
        ("{{ event.nope | first_of(event.track_id) }}", "rzwlxtp92ted"),
        ("{{ first_of(event.nope, '') }}", ""),
        ("{{ event.score * 2 }}", "8"),
        ("  {{ event.track_id }}\n", "rzwlxtp92ted"),
        ("{% if event.completed %}yes{% endif %}", "yes"),
    ],
)
def test_filters_and_helpers(source: str, expected: str) -> None:
    assert r(source) == expected


def test_filters_accept_python_dates() -> None:
    context = {"d": date(2021, 7, 29), "t": datetime(2021, 7, 29, 1, 2, 3)}
    assert render("{{ d | iso }} {{ t | date }}", context) == "2021-07-29T00:00:00.000Z 2021-07-29"


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("{{ event.score / 0 }}", "ZeroDivisionError"),
        ("{{ event.track_id | iso }}", "EventError"),
        ("{{ event.__class__ }}", "SecurityError"),
        ("{{ first_of.__globals__ }}", "SecurityError"),
        ("{{ event.update({'a': 1}) }}", "SecurityError"),
        ("{{ params.pop('icp_company') }}", "SecurityError"),
        ("{{ 'x' * 100000000 }}", "SecurityError: budget MAX_OUTPUT_CHARS "),
        ("{{ 10 ** 1000000 }}", "SecurityError: budget MAX_EXPONENT "),
        ("{{ (10 ** 100) ** 100 }}", "SecurityError: budget MAX_INT_BITS "),
        ("{{ ('x' * 60000) * 2 }}", "SecurityError: budget MAX_OUTPUT_CHARS "),
        ("{% for i in range(100000) %}xxxxxxxxxx{% endfor %}", "SecurityError: budget MAX_RANGE"),
        ("{% for i in range(7000) %}xxxxxxxxxx{% endfor %}", "SecurityError: budget MAX_OUTPUT"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ],
)
def test_failing_templates_raise_render_error(source: str, error: str) -> None:
    with pytest.raises(RenderError, match=error):
        render(source, CONTEXT)
    assert BODY["params"] == {"icp_company": "Acme", "icp_email": "Ada@Example.com"}


def test_random_filter_and_lipsum_are_not_available() -> None:
    with pytest.raises(ValueError, match="unknown filter 'random'"):
        check_template("{{ [1, 2] | random }}")
    with pytest.raises(ValueError, match="unknown variable 'lipsum'"):
        check_template("{{ lipsum() }}")


@pytest.mark.parametrize(
    ("text", "result"),
    [("True", True), ("yes", True), ("x", True), ("1", True), ("", False), ("False", False),
     ("false", False), ("0", False), ("no", False), ("None", False), ("  ", False)],
)  # fmt: skip
def test_truthy(text: str, result: bool) -> None:
    assert truthy(text) is result


@pytest.mark.parametrize(
    ("text", "value_type", "value"),
    [
        ("abc", "string", "abc"),
        ("4", "number", 4),
        (" -12 ", "number", -12),
        ("4.0", "number", 4),
        ("2.5", "number", 2.5),
        ("1e3", "number", 1000),
        ("2021-07-29T16:14:57.31297754Z", "datetime", "2021-07-29T16:14:57.312Z"),
        ("2021-07-29", "datetime", "2021-07-29T00:00:00.000Z"),
        ("1627575297", "datetime", "2021-07-29T16:14:57.000Z"),
        ("2021-07-29T23:30:00-02:00", "date", "2021-07-30"),
        ("true", "bool", True),
        ("True", "bool", True),
        ("yes", "bool", True),
        ("1", "bool", True),
        ("false", "bool", False),
        ("NO", "bool", False),
        ("0", "bool", False),
    ],
)
def test_coerce(text: str, value_type: str, value: Any) -> None:
    result = coerce(text, value_type)
    assert result == value
    assert type(result) is type(value)


@pytest.mark.parametrize(
    ("text", "value_type"),
    [("four", "number"), ("nan", "number"), ("inf", "number"), ("1e999", "number"),
     ("soon", "datetime"), ("2021-13-45", "date"), ("maybe", "bool"), ("2", "bool")],
)  # fmt: skip
def test_coerce_rejects(text: str, value_type: str) -> None:
    with pytest.raises(ValueError):
        coerce(text, value_type)


MAPPING = """\
version: 1
crm: hubspot
object: contact
properties:
  instruqt_track: {}
  instruqt_score: {type: number, merge: max}
  instruqt_done: {type: bool}
  instruqt_when: {type: datetime, merge: min}
  instruqt_day: {type: date, merge: first}
  instruqt_company: {merge: first}
events:
  "track.*":
    properties:
      instruqt_track: "{{ event.track_slug | lower }}"
      instruqt_when: "{{ event.timestamp }}"
      instruqt_day: "{{ event.timestamp }}"
  track.challenge_attempted:
    when: "{{ event.completed }}"
    properties:
      instruqt_score: "{{ event.score }}"
      instruqt_done: "{{ event.completed }}"
      instruqt_company: "{{ params.icp_company }}"
  review.created:
    properties:
      instruqt_score: "{{ event.score }}"
ignore: ["sandbox.*"]
extra_event_fields: [score]  # the sample challenge event carries one
"""


PARSED = parse_mapping(MAPPING)


def _event(**changes: Any) -> Any:
    """The sample event with some body keys changed (None deletes a key)."""
    body = {**BODY, **changes}
    return parse_event("msg", {k: v for k, v in body.items() if v is not None})


def test_apply_event_coerces_per_declared_type() -> None:
    mapping = parse_mapping(MAPPING)
    changes = apply_event(mapping, EVENT, "ada@example.com")
    stamp = EVENT.timestamp
    assert changes == [
        PropertyChange("instruqt_track", "latest", "intro-k8s", stamp),
        PropertyChange("instruqt_when", "min", "2021-07-29T16:14:57.312Z", stamp),
        PropertyChange("instruqt_day", "first", "2021-07-29", stamp),
        PropertyChange("instruqt_score", "max", 4, stamp),
        PropertyChange("instruqt_done", "latest", True, stamp),
        PropertyChange("instruqt_company", "first", "Acme", stamp),
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        changes[0].value = "x"  # type: ignore[misc]


def test_when_and_empty_values() -> None:
    mapping = parse_mapping(MAPPING)
    failed = apply_event(mapping, _event(completed=False), None)
    assert [c.name for c in failed] == ["instruqt_track", "instruqt_when", "instruqt_day"]
    no_params = apply_event(mapping, _event(params=None, track_slug=None), None)
    assert "instruqt_company" not in [c.name for c in no_params]
    assert "instruqt_track" not in [c.name for c in no_params]


def test_ignored_and_unknown_events_change_nothing() -> None:
    mapping = parse_mapping(MAPPING)
    assert apply_event(mapping, _event(type="sandbox.created"), None) == []
    assert apply_event(mapping, _event(type="user.deleted"), None) == []


def test_non_numeric_number_fails_the_event() -> None:
    mapping = parse_mapping(MAPPING)
    with pytest.raises(MappingFailure) as info:
        apply_event(mapping, _event(type="review.created", score="great"), None)
    assert isinstance(info.value, PermanentError)
    assert info.value.category == "mapping"
    assert info.value.reason == (
        "rule 'review.created', property 'instruqt_score': not a number: 'great' "
        "(declared type number)"
    )


def test_failing_template_fails_the_event_naming_rule_and_property() -> None:
    mapping = parse_mapping(MAPPING.replace('"{{ event.score }}"\n', '"{{ event.score / 0 }}"\n'))
    with pytest.raises(MappingFailure) as info:
        apply_event(mapping, _event(type="review.created"), None)
    assert info.value.category == "mapping"
    assert info.value.reason == (
        "rule 'review.created', property 'instruqt_score': template failed: "
        "ZeroDivisionError: division by zero"
    )


def test_sandbox_violation_fails_the_event() -> None:
    mapping = parse_mapping(MAPPING.replace('"{{ event.completed }}"', '"{{ event.__class__ }}"'))
    with pytest.raises(
        MappingFailure,
        match=r"rule 'track.challenge_attempted', when: template "
        r"failed: SecurityError",
    ):
        apply_event(mapping, EVENT, None)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "track_slug",
                "track_id",
                "score",
                "completed",
                "params",
                "timestamp",
                "challenge_id",
                "user_id",
                "content",
            ]
        ),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
            max_leaves=8,
        ),
    ),
    st.sampled_from(["track.started", "track.challenge_attempted", "review.created", "x.y"]),
)
def test_any_event_body_maps_or_fails_cleanly(body: dict[str, Any], event_type: str) -> None:
    body = {**body, "type": event_type}
    body.setdefault("timestamp", "2021-07-29T16:14:57Z")
    try:
        event = parse_event("m", body)
    except ValueError:
        return
    try:
        changes = apply_event(PARSED, event, None)
    except MappingFailure as exc:
        assert exc.reason.startswith("rule ")
        return
    for change in changes:
        assert change.timestamp == event.timestamp
        assert isinstance(change.value, str | int | float | bool)


def test_template_context_keeps_datetime_utc() -> None:
    event = parse_event("m", {"type": "t", "timestamp": 1627575297})
    assert template_context(event, None)["event"]["timestamp"] == "2021-07-29T16:14:57.000Z"
    assert event.timestamp == datetime(2021, 7, 29, 16, 14, 57, tzinfo=UTC)


def test_count_counts_text_values_even_though_its_type_is_number() -> None:
    text = MAPPING.replace(
        "  instruqt_company: {merge: first}\n",
        "  instruqt_company: {merge: first}\n  instruqt_n: {type: number, merge: count}\n",
    ).replace(
        '      instruqt_when: "{{ event.timestamp }}"\n',
        '      instruqt_when: "{{ event.timestamp }}"\n'
        '      instruqt_n: "{{ event.track_id }}/x"\n',
    )
    mapping = parse_mapping(text)
    assert mapping.properties["instruqt_n"].input_type == "string"
    changes = {c.name: c for c in apply_event(mapping, EVENT, None)}
    assert changes["instruqt_n"].value == "rzwlxtp92ted/x"
    assert changes["instruqt_n"].policy == "count"
