"""Loading and validating mapping files: every problem as ``file:LINE: key.path: message``."""

from __future__ import annotations

from pathlib import Path

import pytest

from instruqt_crm.mapping import Mapping, MappingError, load_mapping, parse_mapping
from instruqt_crm.mapping.__main__ import main as validate_main

VALID = """\
version: 1
crm: hubspot
object: contact
identity:
  email_params: [email]
  lookup: true
  match_key: instruqt_user_id
properties:
  instruqt_user_id:
    type: string
    merge: set_once
  instruqt_tracks_completed:
    type: string
    merge: union
events:
  track.completed:
    properties:
      instruqt_user_id: "{{ user_id }}"
      instruqt_tracks_completed:
        value: "{{ event.track_slug }}"
        merge: union
ignore: ["sandbox.*"]
"""

SALESFORCE = """\
version: 1
crm: salesforce
object: auto
properties:
  Instruqt_User_Id__c: {merge: first}
events:
  track.started:
    properties:
      Instruqt_User_Id__c: "{{ user_id }}"
salesforce:
  lead_defaults: {LastName: "[not provided]", Company: "[not provided]"}
"""


def _problems(tmp_path: Path, text: str, name: str = "mapping.yaml") -> tuple[str, list[str]]:
    """Write ``text`` to a file, load it, and return (path, problem lines)."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return str(path), info.value.problems


def _edit(old: str, new: str, text: str = VALID) -> str:
    """``text`` with exactly one occurrence of ``old`` replaced."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_valid_mapping_loads_with_its_source(tmp_path: Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_text(VALID)
    mapping = load_mapping(path)
    assert isinstance(mapping, Mapping)
    assert mapping.source == str(path)
    assert mapping.crm == "hubspot"
    assert mapping.object == "contact"
    assert mapping.identity.match_key == "instruqt_user_id"
    assert mapping.identity.email_params == ["email"]
    assert mapping.properties["instruqt_user_id"].merge == "first"  # set_once is an alias
    assert mapping.properties["instruqt_tracks_completed"].label == "Instruqt tracks completed"
    assert mapping.warnings == []


def test_defaults_and_empty_sections() -> None:
    text = "version: 1\ncrm: hubspot\nobject: contact\nidentity:\nproperties: {x: {}}\nevents:\n"
    mapping = parse_mapping(text)
    assert mapping.identity.lookup is True
    assert mapping.identity.email_params == ["email"]
    assert mapping.properties["x"].type == "string"
    assert mapping.properties["x"].merge == "latest"
    assert mapping.events == {}
    assert mapping.ignore == []
    assert mapping.source == "<string>"


def test_classify_checks_ignore_first() -> None:
    mapping = parse_mapping(VALID)
    assert mapping.classify("track.completed") == "mapped"
    assert mapping.classify("sandbox.created") == "ignored"
    assert mapping.classify("track.started") == "unknown"
    assert mapping.classify("TRACK.COMPLETED") == "unknown"  # case-sensitive
    text = _edit('ignore: ["sandbox.*"]', 'ignore: ["track.c*"]')
    text = _edit("  track.completed:", '  "track.*":', text)
    mapping = parse_mapping(text)
    assert mapping.classify("track.completed") == "ignored"
    assert mapping.classify("track.started") == "mapped"
    assert [p for p, _ in mapping.rules_for("track.started")] == ["track.*"]


def test_salesforce_mapping_with_lead_defaults() -> None:
    mapping = parse_mapping(SALESFORCE)
    assert mapping.object == "auto"
    assert mapping.salesforce is not None
    assert mapping.salesforce.lead_defaults["Company"] == "[not provided]"


def test_direct_model_validation_also_checks_cross_references() -> None:
    data = {
        "version": 1,
        "crm": "hubspot",
        "object": "contact",
        "properties": {"a": {}},
        "events": {"track.started": {"properties": {"b": "x"}}},
    }
    with pytest.raises(ValueError, match="property 'b' is not declared"):
        Mapping.model_validate(data)


BAD_FILES = [
    pytest.param(
        ("string\n    merge: union\n", "string\n    merge: unoin\n"),
        14,
        "properties.instruqt_tracks_completed.merge: "
        "unknown policy 'unoin' (did you mean 'union'?)",
        id="unknown-policy",
    ),
    pytest.param(
        ("        merge: union\n", "        merge: unoin\n"),
        21,
        "events.track.completed.properties.instruqt_tracks_completed.merge: "
        "unknown policy 'unoin' (did you mean 'union'?)",
        id="unknown-policy-in-rule",
    ),
    pytest.param(
        ("        merge: union\n", "        merge: max\n"),
        21,
        "events.track.completed.properties.instruqt_tracks_completed.merge: merge 'max' "
        "conflicts with the declared merge 'union' "
        "(properties.instruqt_tracks_completed.merge, line 14)",
        id="conflicting-policy",
    ),
    pytest.param(
        ("    type: string\n    merge: set_once", "    typ: string\n    merge: set_once"),
        10,
        "properties.instruqt_user_id.typ: unknown key 'typ' (did you mean 'type'?)",
        id="unknown-key",
    ),
    pytest.param(
        ("  lookup: true\n", "  lookup: true\n  colour: red\n"),
        7,
        "identity.colour: unknown key 'colour'; allowed keys: email_params, lookup, match_key",
        id="unknown-key-no-suggestion",
    ),
    pytest.param(
        ('      instruqt_user_id: "{{ user_id }}"', '      instruqt_userid: "{{ user_id }}"'),
        18,
        "events.track.completed.properties.instruqt_userid: property 'instruqt_userid' is not "
        "declared under properties (did you mean 'instruqt_user_id'?)",
        id="undeclared-property",
    ),
    pytest.param(
        ('"{{ user_id }}"', '"{{ user_id }"'),
        18,
        "events.track.completed.properties.instruqt_user_id: "
        "template syntax error: unexpected '}' (template line 1)",
        id="template-syntax-short-form",
    ),
    pytest.param(
        ('"{{ event.track_slug }}"', '"{% if event.x %}yes"'),
        20,
        "events.track.completed.properties.instruqt_tracks_completed.value: template syntax "
        "error: Unexpected end of template. Jinja was looking for the following tags: 'elif' "
        "or 'else' or 'endif'. The innermost block that needs to be closed is 'if'. "
        "(template line 1)",
        id="template-syntax-long-form",
    ),
    pytest.param(
        ('"{{ user_id }}"', '"{{ evnt.user_id }}"'),
        18,
        "events.track.completed.properties.instruqt_user_id: unknown variable 'evnt' "
        "(did you mean 'event'?); templates can use event, type, params, user_id, email",
        id="template-unknown-variable",
    ),
    pytest.param(
        ('"{{ user_id }}"', '"{{ user_id | lowr }}"'),
        18,
        "events.track.completed.properties.instruqt_user_id: "
        "unknown filter 'lowr' (did you mean 'lower'?)",
        id="template-unknown-filter",
    ),
    pytest.param(
        (
            "    properties:\n      instruqt_user_id",
            '    when: "{{ event.completed"\n    properties:\n      instruqt_user_id',
        ),
        17,
        "events.track.completed.when: template syntax error: unexpected end of template, "
        "expected 'end of print statement'. (template line 1)",
        id="template-syntax-when",
    ),
    pytest.param(
        ("  lookup: true\n", "  lookup: maybe\n"),
        6,
        "identity.lookup: expected true or false, not 'maybe'",
        id="wrong-type-bool",
    ),
    pytest.param(
        ("  email_params: [email]\n", "  email_params: email\n"),
        5,
        "identity.email_params: expected a list, not 'email'",
        id="wrong-type-list",
    ),
    pytest.param(
        ("    type: string\n    merge: union", "    type: [string]\n    merge: union"),
        13,
        "properties.instruqt_tracks_completed.type: type must be one of string, number, "
        "datetime, date, bool, not ['string']",
        id="wrong-type-type",
    ),
    pytest.param(
        ("    type: string\n    merge: union", "    type: strng\n    merge: union"),
        13,
        "properties.instruqt_tracks_completed.type: unknown type 'strng' (did you mean 'string'?)",
        id="unknown-type",
    ),
    pytest.param(
        ("    type: string\n    merge: union", "    type: number\n    merge: union"),
        13,
        "properties.instruqt_tracks_completed.type: merge 'union' needs type string",
        id="union-needs-string",
    ),
    pytest.param(
        ("version: 1\n", "version: 2\n"),
        1,
        "version: unsupported version 2; this release reads version 1",
        id="bad-version",
    ),
    pytest.param(
        ("crm: hubspot\n", "crm: hubspt\n"),
        2,
        "crm: unknown crm 'hubspt' (did you mean 'hubspot'?)",
        id="unknown-crm",
    ),
    pytest.param(
        ("object: contact\n", "object: Lead\n"),
        3,
        "object: unknown hubspot object 'Lead'; hubspot supports contact",
        id="object-for-crm",
    ),
    pytest.param(
        ('ignore: ["sandbox.*"]', 'ignore: ["sandbox.(created|failed)"]'),
        22,
        "ignore.0: 'sandbox.(created|failed)' is not a glob: use letters, digits, '.', '_', "
        "'-' and the glob characters * ? [abc] (regular expressions and spaces are not "
        "supported)",
        id="glob-regex",
    ),
    pytest.param(
        ("  track.completed:", '  "track.[cs":'),
        16,
        "events.track.[cs: 'track.[cs': '[' is never closed",
        id="glob-unclosed",
    ),
    pytest.param(
        ("  track.completed:", '  "track. completed":'),
        16,
        "events.track. completed: 'track. completed' is not a glob: use letters, digits, '.', "
        "'_', '-' and the glob characters * ? [abc] (regular expressions and spaces are not "
        "supported)",
        id="glob-space",
    ),
    pytest.param(
        ("  track.completed:", "  sandbox.created:"),
        16,
        "events.sandbox.created: this rule never applies: ignore pattern 'sandbox.*' matches "
        "it first (ignore.0, line 22)",
        id="rule-shadowed-by-ignore",
    ),
    pytest.param(
        ("  match_key: instruqt_user_id\n", "  match_key: instruqt_email\n"),
        7,
        "identity.match_key: match_key 'instruqt_email' is not declared under properties "
        "(did you mean 'instruqt_user_id'?)",
        id="match-key-undeclared",
    ),
    pytest.param(
        ("  email_params: [email]\n  lookup: true\n", "  email_params: []\n  lookup: false\n"),
        4,
        "identity: no way to find an email: add email_params or lookup: true",
        id="no-email-source",
    ),
    pytest.param(
        ("crm: hubspot\n", "crm: hubspot\ncrm: salesforce\n"),
        3,
        "crm: duplicate key 'crm' (first at line 2)",
        id="duplicate-key",
    ),
    pytest.param(
        ('      instruqt_user_id: "{{ user_id }}"\n', "      instruqt_user_id:\n"),
        18,
        "events.track.completed.properties.instruqt_user_id: "
        "expected a template or a mapping with 'value', not None",
        id="missing-template",
    ),
    pytest.param(
        ('        value: "{{ event.track_slug }}"\n', ""),
        19,
        "events.track.completed.properties.instruqt_tracks_completed: missing required key 'value'",
        id="missing-value",
    ),
    pytest.param(
        ("version: 1\n", ""),
        1,
        "missing required key 'version'",
        id="missing-version",
    ),
    pytest.param(
        ("  instruqt_user_id:\n    type", "  Instruqt-User:\n    type"),
        9,
        "properties.Instruqt-User: not a hubspot property name: lowercase letters, digits and _, "
        "at most 100 characters",
        id="bad-property-name",
    ),
    pytest.param(
        (
            VALID[VALID.index("    properties:\n      instruqt_user_id") : VALID.index("ignore")],
            "    properties: {}\n",
        ),
        17,
        "events.track.completed.properties: a rule needs at least one property "
        "(to skip an event type, use ignore)",
        id="empty-rule",
    ),
]


@pytest.mark.parametrize(("edit", "line", "message"), BAD_FILES)
def test_bad_file_names_file_line_and_key(
    tmp_path: Path, edit: tuple[str, str], line: int, message: str
) -> None:
    path, problems = _problems(tmp_path, _edit(*edit))
    assert f"{path}:{line}: {message}" in problems, problems


def test_bad_yaml_syntax_has_a_line(tmp_path: Path) -> None:
    path, problems = _problems(tmp_path, _edit("  lookup: true\n", "  lookup: true: false\n"))
    assert problems == [f"{path}:6: mapping values are not allowed here"]


def test_unclosed_quote_has_a_line(tmp_path: Path) -> None:
    path, problems = _problems(tmp_path, _edit('["sandbox.*"]', '["sandbox.*]'))
    assert problems == [
        f"{path}:23: found unexpected end of stream (while scanning a quoted scalar, line 22)"
    ]


def test_tab_indentation(tmp_path: Path) -> None:
    path, problems = _problems(tmp_path, _edit("  lookup: true", "\tlookup: true"))
    assert problems[0].startswith(f"{path}:6: found character '\\t' that cannot start any token")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_bytes(b"version: 1\ncrm: \xff\n")
    with pytest.raises(MappingError, match=r"m.yaml:2: not UTF-8 text"):
        load_mapping(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="cannot read the mapping"):
        load_mapping(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "1: the top level must be a mapping (version, crm, object, ...), not empty"),
        ("# only a comment\n", "1: the top level must be a mapping"),
        ("- a\n- b\n", "1: the top level must be a mapping (version, crm, object, ...), not a"),
        ("a: 1\n---\nb: 2\n", "2: but found another document"),
        ("a: &x [*x]\n", "1: a.0: an alias refers to a node that contains it"),
        ("a: !!python/object:os.system x\n", "1: a: cannot read value 'x'"),
        ("? [a, b]\n: 1\n", "1: keys must be plain text"),
    ],
)
def test_odd_documents(text: str, message: str) -> None:
    with pytest.raises(MappingError) as info:
        parse_mapping(text, "f.yaml")
    assert any(p.startswith(f"f.yaml:{message}") for p in info.value.problems), info.value.problems


def test_all_problems_are_reported_sorted_by_line(tmp_path: Path) -> None:
    text = _edit("string\n    merge: union\n", "string\n    merge: unoin\n")
    text = _edit("  lookup: true\n", "  lookup: maybe\n", text)
    text = _edit("crm: hubspot\n", "crm: hubspot\ncrm: hubspot\n", text)
    _, problems = _problems(tmp_path, text)
    assert [p.split(":")[1] for p in problems] == ["3", "7", "15"]


def test_yaml_anchors_and_merge_keys_work() -> None:
    text = """\
version: 1
crm: hubspot
object: contact
properties:
  a: &common {type: number, merge: max}
  b:
    <<: *common
    merge: min
events:
  track.*:
    properties: {a: "{{ event.duration }}", b: "{{ event.duration }}"}
"""
    mapping = parse_mapping(text)
    assert mapping.properties["b"].type == "number"
    assert mapping.properties["b"].merge == "min"


def test_salesforce_section_checks() -> None:
    with pytest.raises(MappingError, match=r"salesforce\.lead_defaults: Company is required"):
        parse_mapping(SALESFORCE.replace(', Company: "[not provided]"', ""), "s.yaml")
    contact_only = SALESFORCE.replace(', Company: "[not provided]"', "").replace("auto", "Contact")
    assert parse_mapping(contact_only).object == "Contact"
    with pytest.raises(
        MappingError,
        match=r"s.yaml:3: object: unknown salesforce object "
        r"'contact' \(did you mean 'Contact'\?\)",
    ):
        parse_mapping(SALESFORCE.replace("auto", "contact"), "s.yaml")
    with pytest.raises(MappingError, match="not a salesforce property name"):
        parse_mapping(SALESFORCE.replace("Instruqt_User_Id__c", "Instruqt__User_Id__c"))


def test_constant_values_are_checked_against_the_type() -> None:
    text = _edit("    type: string\n    merge: union", "    type: number\n    merge: max")
    text = _edit('value: "{{ event.track_slug }}"', "value: lots", text)
    text = _edit("        merge: union\n", "", text)
    with pytest.raises(MappingError, match="constant does not fit type number: not a number"):
        parse_mapping(text)
    assert parse_mapping(text.replace("value: lots", "value: 3")).properties


def test_undocumented_event_type_is_a_warning_not_an_error() -> None:
    mapping = parse_mapping(_edit("  track.completed:", "  track.complted:"), "w.yaml")
    assert mapping.warnings == [
        "w.yaml:16: events.track.complted: 'track.complted' is not a documented Instruqt "
        "event type (did you mean 'track.completed'?)"
    ]
    assert mapping.classify("track.complted") == "mapped"


def test_validate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(VALID)
    bad.write_text(_edit("crm: hubspot\n", "crm: hubspt\n"))
    assert validate_main([str(good)]) == 0
    assert validate_main([str(good), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "good.yaml: ok (2 properties, 1 rules)" in out
    assert f"{bad}:2: crm: unknown crm 'hubspt'" in err
    assert validate_main([]) == 2


def test_hubspot_upsert_by_checks() -> None:
    keyed = VALID + "hubspot:\n  upsert_by: match_key\n"
    assert parse_mapping(keyed).upsert_key == "instruqt_user_id"
    assert parse_mapping(VALID).upsert_key == "email"
    assert parse_mapping(VALID + "hubspot: {upsert_by: email}\n").upsert_key == "email"
    with pytest.raises(MappingError, match=r"hubspot\.upsert_by: match_key needs identity"):
        parse_mapping(_edit("  match_key: instruqt_user_id\n", "", keyed), "h.yaml")
    numeric = _edit(
        "    type: string\n    merge: set_once", "    type: number\n    merge: first", keyed
    )
    with pytest.raises(MappingError, match="upserts only on unique string properties"):
        parse_mapping(numeric)
    with pytest.raises(MappingError, match=r"hubspot: only allowed when crm is hubspot"):
        parse_mapping(SALESFORCE + "hubspot: {upsert_by: email}\n")
    with pytest.raises(MappingError, match=r"upsert_by"):
        parse_mapping(VALID + "hubspot: {upsert_by: phone}\n")
