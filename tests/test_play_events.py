"""A play report row becomes the events its webhooks sent: ids, times, challenges, reviews."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from instruqt_crm.events import EventError, parse_event
from instruqt_crm.instruqt_report_items import Challenge, PlayReport, PlayReview
from instruqt_crm.ops.play_events import events_of, play_end

STARTED = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)
CHALLENGES = [Challenge(f"ch{n}", f"step-{n}", n) for n in (1, 2, 3, 4)]


def play(**changes: object) -> PlayReport:
    base = PlayReport(
        id="play1",
        track_id="trk1",
        track_slug="intro-k8s",
        invite_id="inv1",
        user_id="u1",
        profile=None,
        completion_percent=100.0,
        total_challenges=4,
        completed_challenges=4,
        time_spent=1800,
        stopped_reason=None,
        mode="NORMAL",
        started_at=STARTED,
        review=PlayReview("rev1", 5, "great"),
        custom_parameters={"icp_company": "Acme"},
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_completed_play_with_a_review() -> None:
    made = events_of(play(), CHALLENGES)
    assert [e.body["type"] for e in made] == [
        "track.started",
        *["track.challenge_completed"] * 4,
        "track.completed",
        "review.created",
    ]
    assert [e.id for e in made] == [
        "backfill:play1:track.started",
        *[f"backfill:play1:challenge:{n}" for n in (1, 2, 3, 4)],
        "backfill:play1:track.completed",
        "backfill:play1:review.created",
    ]
    started, *challenges, completed, review = (e.body for e in made)
    assert started["timestamp"] == "2025-03-04T10:00:00.000Z"
    assert completed["timestamp"] == review["timestamp"] == "2025-03-04T10:30:00.000Z"
    assert completed["duration"] == 1800
    assert [c["challenge_id"] for c in challenges] == ["ch1", "ch2", "ch3", "ch4"]
    assert {c["total_challenges"] for c in challenges} == {4}
    assert review["score"] == 5 and review["content"] == "great" and review["review_id"] == "rev1"
    assert all("track_slug" not in c for c in challenges)  # as Instruqt's own example
    assert started["track_slug"] == completed["track_slug"] == "intro-k8s"
    for body in (started, completed, review, *challenges):
        assert body["participant_id"] == "play1" and body["user_id"] == "u1"
        assert body["custom_parameters"] == {"icp_company": "Acme"}
        assert body["is_developer_play"] is False and body["track_id"] == "trk1"


def test_a_stopped_play_names_its_reason_and_only_its_completed_challenges() -> None:
    stopped = play(
        completion_percent=50.0, completed_challenges=2, stopped_reason="expired", review=None
    )
    made = events_of(stopped, CHALLENGES)
    assert [e.body["type"] for e in made] == [
        "track.started",
        "track.challenge_completed",
        "track.challenge_completed",
        "track.stopped",
    ]
    assert made[-1].body["reason"] == "expired"
    assert [e.body["challenge_id"] for e in made[1:3]] == ["ch1", "ch2"]


def test_a_running_play_has_no_end_event() -> None:
    running = play(completion_percent=25.0, completed_challenges=1, review=None)
    assert [e.body["type"] for e in events_of(running, CHALLENGES)] == [
        "track.started",
        "track.challenge_completed",
    ]


def test_unknown_challenges_get_stable_stand_ins() -> None:
    made = events_of(play(review=None), [])
    ids = [e.body["challenge_id"] for e in made if e.body["type"] == "track.challenge_completed"]
    assert ids == ["#1", "#2", "#3", "#4"]
    assert [e.body["challenge_index"] for e in made[1:5]] == [1, 2, 3, 4]
    assert events_of(play(review=None), []) == made  # the same on every run


def test_empty_fields_are_left_out_and_developer_plays_are_marked() -> None:
    bare = play(track_slug=None, invite_id=None, custom_parameters={}, mode="DEVELOPER")
    body = events_of(bare, CHALLENGES)[0].body
    assert "track_slug" not in body and "invite_id" not in body
    assert "custom_parameters" not in body
    assert body["is_developer_play"] is True


def test_text_no_stage_could_store_is_refused() -> None:
    with pytest.raises(EventError):
        events_of(play(review=PlayReview("r", 4, "bad \ud800 text")), CHALLENGES)


@given(
    completed=st.integers(min_value=0, max_value=12),
    total=st.integers(min_value=0, max_value=12),
    spent=st.integers(min_value=-5, max_value=10**6),
    percent=st.floats(min_value=0, max_value=100),
    known=st.integers(min_value=0, max_value=12),
)
def test_every_event_is_valid_and_inside_the_play(
    completed: int, total: int, spent: int, percent: float, known: int
) -> None:
    """Whatever the counts: every event parses, lies between start and end, ids are unique,
    and as many challenges complete as the report says (never more than the track has)."""
    report = play(
        completed_challenges=completed,
        total_challenges=total,
        time_spent=spent,
        completion_percent=percent,
        stopped_reason="stopped",
    )
    challenges = [Challenge(f"c{n}", None, n) for n in range(known)]
    made = events_of(report, challenges)
    assert len({e.id for e in made}) == len(made)
    end = play_end(report)
    for item in made:
        event = parse_event(item.id, item.body)
        assert STARTED <= event.timestamp <= end + timedelta(milliseconds=1)
    done = [e for e in made if e.body["type"] == "track.challenge_completed"]
    assert len(done) == (min(completed, total) if total else completed)


@pytest.mark.parametrize(
    "changes",
    [
        {"time_spent": 10**15},  # past any date
        {"time_spent": 10**9},  # ends 31 years on: its last activity would outrank every event
        {"started_at": datetime(9999, 12, 31, 23, 0, tzinfo=UTC)},
        {"completed_challenges": 10**9, "total_challenges": 10**9},
        {"completed_challenges": 10**9, "total_challenges": 0},
    ],
)
def test_absurd_times_and_counts_are_refused_not_expanded(changes: dict[str, object]) -> None:
    """A row no play can have (an end after the report was read, more challenges than any
    track holds) is unreadable: an EventError, without building its events first."""
    with pytest.raises(EventError):
        events_of(play(**changes), CHALLENGES)
