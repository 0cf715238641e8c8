"""Play reports, challenges and tracks against the fake Instruqt API over real HTTP."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from instruqt_crm.errors import PermanentError, RateLimited, RetryableError
from instruqt_crm.instruqt_api import InstruqtClient, Profile
from instruqt_crm.instruqt_report_items import Challenge, PlayReport, PlayReview
from instruqt_crm.instruqt_reports import PlayReports
from tests.fakes.instruqt import FakeInstruqt, report_item

KEY = "iq-reports-secret-7781"
TEAM = "acme"
SINCE = datetime(2024, 5, 1, tzinfo=UTC)
UNTIL = datetime(2024, 5, 2, tzinfo=UTC)
NOON = SINCE + timedelta(hours=12)


class Clock:
    """A monotonic clock that only moves when slept on (or moved by the test)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake():
    emails = {"u-ada": "Ada@Home.example", "u-bob": "bob@home.example"}
    details = {"u-ada": {"email": "ada@acme.example", "firstName": "Ada", "lastName": "L"}}
    with FakeInstruqt(key=KEY, team=TEAM, emails=emails, details=details) as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


def client_for(fake: FakeInstruqt, key: str = KEY, attempts: int = 4) -> InstruqtClient:
    return InstruqtClient(key, TEAM, url=fake.url, timeout=5.0, attempts=attempts)


def reports_for(fake: FakeInstruqt, clock: Clock, rps: float = 2.0, **kwargs) -> PlayReports:
    return PlayReports(client_for(fake, **kwargs), rps, sleep=clock.sleep, clock=clock)


def test_pages_through_250_plays_in_3_pages(fake, clock):
    fake.plays = [
        report_item(f"p{n:03d}", "u-bob", NOON + timedelta(seconds=n), time_spent=n % 7)
        for n in range(250)
    ]
    reports = reports_for(fake, clock)
    pages = [reports.page(SINCE, UNTIL, skip) for skip in (0, 100, 200)]
    assert [len(page.items) for page in pages] == [100, 100, 50]
    assert {page.total for page in pages} == {250}
    ids = [play.id for page in pages for play in page.items]
    assert sorted(ids) == sorted(item["id"] for item in fake.plays)
    spent = [play.time_spent for page in pages for play in page.items]
    assert spent == sorted(spent)  # one ordering across the pages
    assert fake.reports_calls == 3
    assert reports.page(SINCE, UNTIL, 250).items == []


def test_date_range_is_from_inclusive_to_exclusive(fake, clock):
    fake.plays = [
        report_item("before", "u-bob", SINCE - timedelta(milliseconds=1)),
        report_item("first", "u-bob", SINCE),
        report_item("last", "u-bob", UNTIL - timedelta(milliseconds=1)),
        report_item("after", "u-bob", UNTIL),
    ]
    page = reports_for(fake, clock).page(SINCE, UNTIL, 0)
    assert sorted(play.id for play in page.items) == ["first", "last"]
    assert page.total == 2


def test_play_types(fake, clock):
    fake.plays = [
        report_item("learner", "u-bob", NOON, mode="NORMAL"),
        report_item("dev", "u-bob", NOON, mode="DEVELOPER"),
    ]
    reports = reports_for(fake, clock)
    by_type = {
        play_type: [play.id for play in reports.page(SINCE, UNTIL, 0, play_type=play_type).items]
        for play_type in ("ALL", "NORMAL", "DEVELOPER")
    }
    assert by_type == {"ALL": ["dev", "learner"], "NORMAL": ["learner"], "DEVELOPER": ["dev"]}
    assert [play.is_developer for play in reports.page(SINCE, UNTIL, 0).items] == [True, False]
    with pytest.raises(ValueError):
        reports.page(SINCE, UNTIL, 0, play_type="SOME")


def test_track_filter(fake, clock):
    fake.plays = [
        report_item("a1", "u-bob", NOON, track_id="t-a"),
        report_item("b1", "u-bob", NOON, track_id="t-b"),
        report_item("c1", "u-bob", NOON, track_id="t-c"),
    ]
    page = reports_for(fake, clock).page(SINCE, UNTIL, 0, track_ids=["t-a", "t-c"])
    assert [play.id for play in page.items] == ["a1", "c1"]
    assert page.total == 2


def test_a_full_report_is_parsed_and_agrees_with_the_user_lookup(fake, clock):
    fake.plays = [
        report_item(
            "p1",
            "u-ada",
            "2024-05-01T10:00:00.123456789Z",
            track_id="t-1",
            track_slug="intro",
            invite_id="inv-1",
            completion_percent=62.5,
            total_challenges=8,
            completed_challenges=5,
            time_spent=1234,
            stopped_reason="stopped",
            review=(4, "nice"),
            custom_parameters={"utm_source": "mail", "empty": ""},
        )
    ]
    reports = reports_for(fake, clock)
    [play] = reports.page(SINCE, UNTIL, 0).items
    assert play == PlayReport(
        id="p1",
        track_id="t-1",
        track_slug="intro",
        invite_id="inv-1",
        user_id="u-ada",
        profile=Profile("u-ada", "ada@acme.example", "u-ada", "Ada", "L", "details"),
        completion_percent=62.5,
        total_challenges=8,
        completed_challenges=5,
        time_spent=1234,
        stopped_reason="stopped",
        mode="NORMAL",
        started_at=datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC),
        review=PlayReview("review-p1", 4, "nice"),
        custom_parameters={"utm_source": "mail", "empty": ""},
    )
    assert play.profile == reports.client.lookup_profile("u-ada")


def test_nulls_everywhere(fake, clock):
    fake.plays = [
        report_item("p1", "u-bob", NOON, track_slug=None),  # no review, invite, details
        report_item("p2", "u-nobody", NOON),  # no email anywhere
    ]
    fake.plays[0]["customParameters"] = None
    fake.plays[1]["playReview"] = {"id": None, "score": None, "content": None}
    bob, nobody = reports_for(fake, clock).page(SINCE, UNTIL, 0).items
    assert bob.review is None and bob.invite_id is None
    assert bob.track_slug is None and bob.stopped_reason is None
    assert bob.custom_parameters == {}
    assert bob.profile == Profile("u-bob", "bob@home.example", "u-bob", None, "u-bob", "profile")
    assert nobody.review is None
    assert nobody.profile is not None and nobody.profile.email is None


def test_malformed_items_are_skipped_counted_and_named(fake, clock, caplog):
    fake.plays = [report_item("good1", "u-bob", NOON), report_item("good2", "u-bob", NOON)]
    broken: dict[str, dict[str, Any]] = {
        "no-start": {"startedAt": "yesterday"},
        "bad-count": {"totalChallenges": "four"},
        "no-percent": {"completionPercent": None},
        "bool-time": {"timeSpent": True},
        "no-user": {"user": None},
    }
    for play_id, change in broken.items():
        fake.plays.append({**report_item(play_id, "u-bob", NOON), **change})
    fake.plays.append({**report_item("x", "u-bob", NOON), "id": None})
    with caplog.at_level(logging.WARNING, logger="instruqt_crm"):
        page = reports_for(fake, clock).page(SINCE, UNTIL, 0)
    assert [play.id for play in page.items] == ["good1", "good2"]
    assert (page.malformed, page.total) == (6, 8)
    for play_id in broken:
        assert f"play {play_id} skipped" in caplog.text


def test_challenges_sorted_by_index(fake, clock):
    fake.challenges["t-1"] = [
        {"id": "c3", "slug": "third", "index": 2},
        {"id": "c1", "slug": "first", "index": 0},
        {"id": "c2", "slug": None, "index": 1},
    ]
    assert reports_for(fake, clock).challenges("t-1") == [
        Challenge("c1", "first", 0),
        Challenge("c2", None, 1),
        Challenge("c3", "third", 2),
    ]
    assert fake.challenge_calls == 1


def test_unknown_track_has_no_challenges_and_no_id(fake, clock):
    reports = reports_for(fake, clock)
    assert reports.challenges("deleted-track") == []
    assert reports.track_id("no-such-slug") is None
    assert (fake.challenge_calls, fake.track_calls) == (1, 1)  # a "not found" is not retried


def test_track_id_by_slug(fake, clock):
    fake.tracks["intro"] = "t-1"
    assert reports_for(fake, clock).track_id("intro") == "t-1"


def test_429_then_success_honours_retry_after(fake, clock):
    fake.plays = [report_item("p1", "u-bob", NOON)]
    fake.fail_next = [429]
    page = reports_for(fake, clock).page(SINCE, UNTIL, 0)
    assert [play.id for play in page.items] == ["p1"]
    assert fake.statuses == [429, 200]
    assert clock.sleeps == [1.0]  # the Retry-After; it also covered the pacing interval


def test_server_errors_back_off_a_bounded_number_of_times(fake, clock):
    fake.fail_next = [500, 502, 503, 500, 500]
    with pytest.raises(RetryableError) as info:
        reports_for(fake, clock, attempts=4).page(SINCE, UNTIL, 0)
    assert not isinstance(info.value, RateLimited)
    assert fake.reports_calls == 4 and fake.fail_next == [500]
    assert len(clock.sleeps) == 3
    assert all(wait >= 0.5 * 2**n for n, wait in enumerate(clock.sleeps))  # exponential
    assert KEY not in info.value.reason


def test_connection_errors_are_retried_then_raised(clock):
    with FakeInstruqt(key=KEY) as gone:
        url = gone.url
    client = InstruqtClient(KEY, TEAM, url=url, timeout=2.0, attempts=3)
    with pytest.raises(RetryableError) as info:
        PlayReports(client, sleep=clock.sleep, clock=clock).track_id("intro")
    assert isinstance(info.value.__cause__, requests.exceptions.ConnectionError)
    assert len(clock.sleeps) == 2
    assert KEY not in str(info.value)


def test_pacing_sleeps_between_requests(fake, clock):
    fake.tracks["intro"] = "t-1"
    reports = reports_for(fake, clock, rps=2.0)
    for _ in range(5):
        reports.track_id("intro")
    assert clock.sleeps == [0.5] * 4
    clock.sleeps.clear()
    for _ in range(3):
        clock.now += 0.2  # time the caller spent between requests counts
        reports.track_id("intro")
    assert clock.sleeps == pytest.approx([0.3] * 3)
    clock.now += 5.0
    reports.track_id("intro")
    assert clock.sleeps == pytest.approx([0.3] * 3)  # long idle: no wait


def test_pacing_keeps_under_the_fakes_rate_limit(fake):
    fake.tracks["intro"] = "t-1"
    fake.max_per_second = 5
    reports = PlayReports(client_for(fake), requests_per_second=4)
    for _ in range(7):
        assert reports.track_id("intro") == "t-1"
    assert fake.limited_calls == 0


def test_the_fakes_rate_limit_answers_429_with_retry_after(fake, clock):
    fake.tracks["intro"] = "t-1"
    fake.max_per_second = 2
    reports = PlayReports(client_for(fake, attempts=2), 1000.0, sleep=clock.sleep)
    with pytest.raises(RateLimited) as info:
        for _ in range(5):
            reports.track_id("intro")
    assert info.value.wait == 1.0
    assert fake.limited_calls == 2 and 1.0 in clock.sleeps


def test_wrong_key_is_a_permanent_auth_error(fake, clock, caplog):
    with caplog.at_level(logging.DEBUG), pytest.raises(PermanentError) as info:
        reports_for(fake, clock, key="wrong-key").page(SINCE, UNTIL, 0)
    assert info.value.category == "auth"
    assert fake.statuses == [401] and clock.sleeps == []
    assert "wrong-key" not in caplog.text


def test_take_over_100_is_refused_before_any_request(fake, clock):
    reports = reports_for(fake, clock)
    with pytest.raises(ValueError):
        reports.page(SINCE, UNTIL, 0, take=101)
    with pytest.raises(ValueError):
        reports.page(SINCE.replace(tzinfo=None), UNTIL, 0)
    assert fake.statuses == []


def test_a_page_limit_error_is_a_config_error_with_the_message(fake, clock):
    fake.max_take = 50
    with pytest.raises(PermanentError) as info:
        reports_for(fake, clock).page(SINCE, UNTIL, 0, take=80)
    assert info.value.category == "config"
    assert "take must be at most 50" in info.value.reason
    assert fake.reports_calls == 1


def test_another_teams_reports_are_a_config_error(fake, clock):
    client = InstruqtClient(KEY, "other-team", url=fake.url, attempts=4)
    with pytest.raises(PermanentError) as info:
        PlayReports(client, sleep=clock.sleep, clock=clock).page(SINCE, UNTIL, 0)
    assert info.value.category == "config"
    assert "INSTRUQT_TEAM_SLUG" in info.value.reason


def test_no_email_or_key_logged_at_info(fake, clock, caplog):
    fake.plays = [report_item("p1", "u-ada", NOON), report_item("p2", "u-bob", NOON)]
    with caplog.at_level(logging.INFO, logger="instruqt_crm"):
        page = reports_for(fake, clock).page(SINCE, UNTIL, 0)
    assert len(page.items) == 2 and "2 plays of 2" in caplog.text
    text = caplog.text.lower()
    assert "@" not in text and KEY not in caplog.text


def test_the_fake_refuses_what_it_does_not_understand(fake):
    headers = {"Authorization": f"Bearer {KEY}"}
    unknown = requests.post(fake.url, json={"query": "{ teams { id } }"}, headers=headers)
    assert unknown.status_code == 400 and unknown.json()["errors"]
    assert requests.post(fake.url, data=b"not json", headers=headers).status_code == 400
