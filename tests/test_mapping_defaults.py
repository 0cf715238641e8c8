"""The shipped mappings: they load, match the schema, and produce the README's data model."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from instruqt_crm.events import Event, parse_event
from instruqt_crm.mapping import (
    Mapping,
    apply_event,
    cell_value,
    load_mapping,
    merge_cells,
    to_cell,
)
from instruqt_crm.mapping.schema import schema_text

MAPPINGS = Path(__file__).resolve().parents[1] / "mappings"
USER = "gOGhYjyoPJhINJFOugIgiL4pdzu2"

SALESFORCE_NAMES = {
    "instruqt_user_id": "Instruqt_User_Id__c",
    "instruqt_first_activity_at": "Instruqt_First_Activity_At__c",
    "instruqt_last_activity_at": "Instruqt_Last_Activity_At__c",
    "instruqt_last_track": "Instruqt_Last_Track__c",
    "instruqt_tracks_started": "Instruqt_Tracks_Started__c",
    "instruqt_tracks_completed": "Instruqt_Tracks_Completed__c",
    "instruqt_tracks_completed_count": "Instruqt_Tracks_Completed_Count__c",
    "instruqt_challenges_completed_count": "Instruqt_Challenges_Completed_Count__c",
    "instruqt_last_review_score": "Instruqt_Last_Review_Score__c",
    "instruqt_last_review_track": "Instruqt_Last_Review_Track__c",
}
DATA_MODEL = {  # name: (type, merge), as the README's data model lists them
    "instruqt_user_id": ("string", "first"),
    "instruqt_first_activity_at": ("datetime", "min"),
    "instruqt_last_activity_at": ("datetime", "max"),
    "instruqt_last_track": ("string", "latest"),
    "instruqt_tracks_started": ("string", "union"),
    "instruqt_tracks_completed": ("string", "union"),
    "instruqt_tracks_completed_count": ("number", "count"),
    "instruqt_challenges_completed_count": ("number", "count"),
    "instruqt_last_review_score": ("number", "latest"),
    "instruqt_last_review_track": ("string", "latest"),
}


def _track(kind: str, minute: int, slug: str, track_id: str, **extra: Any) -> dict[str, Any]:
    """A track event body in Instruqt's flat style."""
    return {
        "type": f"track.{kind}",
        "timestamp": f"2024-05-01T12:{minute:02d}:00.123456789Z",
        "track_id": track_id,
        "track_slug": slug,
        "organization_id": "acme",
        "participant_id": f"play-{track_id}",
        "invite_id": None,
        "user_id": USER,
        "mode": "normal",
        "params": {"icp_email": "ada@example.com"},
        **extra,
    }


HISTORY: list[dict[str, Any]] = [
    {"type": "invite.claimed", "timestamp": "2024-05-01T11:58:00Z", "invite_id": "inv1",
     "user_id": USER, "team_id": "t", "team_slug": "acme", "params": {}},
    _track("started", 0, "intro-k8s", "trk1"),
    {"type": "sandbox.created", "timestamp": "2024-05-01T12:00:30Z", "user_id": USER},
    _track("challenge_setup", 1, "intro-k8s", "trk1", challenge_id="c1"),
    _track("challenge_started", 1, "intro-k8s", "trk1", challenge_id="c1"),
    _track("challenge_attempted", 5, "intro-k8s", "trk1", challenge_id="c1", completed=False),
    _track("challenge_attempted", 7, "intro-k8s", "trk1", challenge_id="c1", completed=True),
    _track("challenge_completed", 7, "intro-k8s", "trk1", challenge_id="c1"),
    _track("challenge_attempted", 12, "intro-k8s", "trk1", challenge_id="c2", completed=True),
    _track("challenge_skipped", 13, "intro-k8s", "trk1", challenge_id="c3"),
    _track("completed", 20, "intro-k8s", "trk1"),
    _track("started", 30, "advanced-k8s", "trk2"),
    _track("challenge_attempted", 35, "advanced-k8s", "trk2", challenge_id="c1", completed=True),
    _track("challenge_cleanup", 59, "advanced-k8s", "trk2", challenge_id="c1"),
    {"type": "review.created", "timestamp": "2024-05-01T12:40:00Z", "id": "r1",
     "track_id": "trk1", "track_slug": "intro-k8s", "user_id": USER, "score": 4, "content": ""},
    {"type": "review.updated", "timestamp": "2024-05-01T12:45:00Z", "id": "r1",
     "track_id": "trk1", "track_slug": "intro-k8s", "user_id": USER, "score": 5,
     "content": "great"},
    {"type": "user.deleted", "timestamp": "2024-05-01T13:00:00Z", "user_id": USER},
]  # fmt: skip

EXPECTED = {
    "instruqt_user_id": USER,
    "instruqt_first_activity_at": "2024-05-01T11:58:00.000Z",
    "instruqt_last_activity_at": "2024-05-01T12:45:00.000Z",
    "instruqt_last_track": "advanced-k8s",
    "instruqt_tracks_started": "advanced-k8s;intro-k8s",
    "instruqt_tracks_completed": "intro-k8s",
    "instruqt_tracks_completed_count": 1,
    "instruqt_challenges_completed_count": 3,  # trk1/c1, trk1/c2, trk2/c1
    "instruqt_last_review_score": 5,
    "instruqt_last_review_track": "intro-k8s",
}


def _events(bodies: list[dict[str, Any]]) -> list[Event]:
    """Parsed events, with svix-like ids."""
    return [parse_event(f"msg_{i}", body) for i, body in enumerate(bodies)]


def _final_state(mapping: Mapping, events: list[Event]) -> dict[str, Any]:
    """What the CRM would receive after all events, merged as the ledger does."""
    cells: dict[str, dict[str, Any]] = {}
    for event in events:
        for change in apply_event(mapping, event, "ada@example.com"):
            cells[change.name] = merge_cells(change.policy, cells.get(change.name), to_cell(change))
    return {
        name: cell_value(spec.merge, cells.get(name), spec.type)
        for name, spec in mapping.properties.items()
    }


@pytest.fixture(params=["hubspot", "salesforce"])
def shipped(request: pytest.FixtureRequest) -> tuple[Mapping, dict[str, str]]:
    """A shipped mapping and its property names for the data model's names."""
    mapping = load_mapping(MAPPINGS / f"{request.param}.yaml")
    names = SALESFORCE_NAMES if request.param == "salesforce" else {n: n for n in DATA_MODEL}
    return mapping, names


def test_shipped_mappings_load_cleanly() -> None:
    hubspot = load_mapping(MAPPINGS / "hubspot.yaml")
    salesforce = load_mapping(MAPPINGS / "salesforce.yaml")
    assert (hubspot.crm, hubspot.object) == ("hubspot", "contact")
    assert (salesforce.crm, salesforce.object) == ("salesforce", "auto")
    assert hubspot.warnings == salesforce.warnings == []
    assert hubspot.identity.match_key == "instruqt_user_id"
    assert salesforce.identity.match_key == "Instruqt_User_Id__c"
    assert salesforce.salesforce is not None
    assert set(salesforce.salesforce.lead_defaults) == {"LastName", "Company"}


def test_shipped_mappings_declare_the_data_model(shipped: tuple[Mapping, dict[str, str]]) -> None:
    mapping, names = shipped
    declared = {name: (spec.type, spec.merge) for name, spec in mapping.properties.items()}
    assert declared == {names[n]: kind for n, kind in DATA_MODEL.items()}
    assert all(spec.label and spec.description for spec in mapping.properties.values())


def test_shipped_mappings_classify_event_types(shipped: tuple[Mapping, dict[str, str]]) -> None:
    mapping, _ = shipped
    for kind in ("sandbox.created", "sandbox.failed", "track.challenge_setup",
                 "track.challenge_cleanup", "track.sandbox_cleaned"):  # fmt: skip
        assert mapping.classify(kind) == "ignored"
    for kind in ("track.started", "track.completed", "track.stopped", "track.challenge_attempted",
                 "review.created", "review.updated", "invite.claimed"):  # fmt: skip
        assert mapping.classify(kind) == "mapped"
    assert mapping.classify("user.deleted") == "unknown"


def test_realistic_history_produces_the_data_model(shipped: tuple[Mapping, dict[str, str]]) -> None:
    mapping, names = shipped
    state = _final_state(mapping, _events(HISTORY))
    assert state == {names[n]: v for n, v in EXPECTED.items()}


def test_order_and_duplicates_do_not_matter(shipped: tuple[Mapping, dict[str, str]]) -> None:
    mapping, names = shipped
    rng = random.Random(1234)
    for _ in range(20):
        delivered = HISTORY + rng.sample(HISTORY, 6)
        rng.shuffle(delivered)
        state = _final_state(mapping, _events(delivered))
        assert state == {names[n]: v for n, v in EXPECTED.items()}


def test_a_late_old_review_does_not_overwrite(shipped: tuple[Mapping, dict[str, str]]) -> None:
    mapping, names = shipped
    late = {**HISTORY[-3], "timestamp": "2024-05-01T12:10:00Z", "score": 1, "track_slug": "old"}
    state = _final_state(mapping, _events([*HISTORY, late]))
    assert state[names["instruqt_last_review_score"]] == 5
    assert state[names["instruqt_last_review_track"]] == "intro-k8s"


def test_shipped_files_point_editors_at_the_schema() -> None:
    for name in ("hubspot.yaml", "salesforce.yaml"):
        first = (MAPPINGS / name).read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=./schema.json"


def test_schema_json_is_in_sync() -> None:
    committed = (MAPPINGS / "schema.json").read_text()
    hint = "run: python -m instruqt_crm.mapping.schema > mappings/schema.json"
    assert committed == schema_text(), hint
