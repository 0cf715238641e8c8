"""The event fields templates read, checked against the fields the events of their rules carry."""

from __future__ import annotations

import pytest

from instruqt_crm.events import EVENT_FIELDS, KNOWN_TYPES
from instruqt_crm.mapping import MappingError, parse_mapping
from instruqt_crm.mapping.fields import carried, documented_types, fields_read
from instruqt_crm.ops.examples import example_event


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ("{{ event.track_slug or event.track_id }}", ["track_id", "track_slug"]),
        ("{{ event['score'] }}{{ event.get('content') }}", ["content", "score"]),
        ("{{ event.custom_parameters.company }}", ["custom_parameters"]),
        ("{% if event.completed %}{{ params.x }}{% endif %}", ["completed"]),
        ("{{ event.items() }}{{ event.__class__ }}{{ learner.email }}", []),
        ("{{ event.", []),  # a syntax error is reported by the template check
    ],
)
def test_fields_read(source: str, fields: list[str]) -> None:
    assert fields_read(source) == fields


def test_every_example_event_carries_only_fields_its_type_lists() -> None:
    """The examples `send-example` posts and the field list `check` uses agree."""
    for event_type in KNOWN_TYPES:
        body = example_event(event_type, email="ann@example.com")
        assert set(body) <= EVENT_FIELDS[event_type], event_type


def test_a_glob_carries_what_any_of_its_types_carries() -> None:
    assert documented_types("review.*") == ["review.created", "review.updated"]
    assert "score" in carried(documented_types("review.*"))
    assert "score" not in carried(documented_types("track.*"))
    assert "score" in carried(documented_types("track.*"), ["score"])
    assert documented_types("course.*") == []


MAPPING = """\
version: 1
crm: hubspot
object: contact
properties:
  instruqt_score: {type: number}
events:
  RULE:
    properties:
      instruqt_score: "TEMPLATE"
"""


def parsed(rule: str, template: str, extra: str = "") -> object:
    return parse_mapping(MAPPING.replace("RULE", rule).replace("TEMPLATE", template) + extra)


def test_only_documented_types_and_mapped_events_are_held_to_the_list() -> None:
    assert parsed("review.created", "{{ event.score }}")
    assert parsed("course.completed", "{{ event.grade }}")  # undocumented: not checked
    with pytest.raises(MappingError, match=r"event\.grade: no 'track\.\*' event carries it"):
        parsed('"track.*"', "{{ event.grade }}")
    with pytest.raises(MappingError, match=r"skip\.staff: event\.grade: no mapped event"):
        parsed("review.created", "{{ event.score }}", 'skip:\n  staff: "{{ event.grade }}"\n')
    assert parsed('"track.*"', "{{ event.grade }}", "extra_event_fields: [grade]\n")
    with pytest.raises(MappingError, match=r"extra_event_fields\.0: empty field name"):
        parsed("review.created", "{{ event.score }}", 'extra_event_fields: [" "]\n')
