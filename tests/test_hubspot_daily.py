"""HubSpot's daily limit: the pause ends at the account's midnight (``resetsAt``), the usage
warning fires at the configured share, and status, the status page and /metrics show both."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from datetime import time as clock_time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from instruqt_crm.config import Settings, SettingsError
from instruqt_crm.crm import hubspot_daily
from instruqt_crm.crm.adapters import build_adapter
from instruqt_crm.crm.base import ContactChange
from instruqt_crm.crm.hubspot import HubSpotAdapter, hubspot_budget
from instruqt_crm.errors import RateLimited
from instruqt_crm.mapping import load_mapping
from instruqt_crm.ops import metrics, status
from instruqt_crm.ratelimit import RequestBudget
from instruqt_crm.receiver.app import create_app
from samples.signing import SECRET
from tests.fakes.hubspot import FakeHubSpot
from tests.test_admin import LOGGED_IN, LOGIN
from tests.test_ratelimit import FakeClock

ROOT = Path(__file__).resolve().parent.parent
NEW_YORK = ZoneInfo("America/New_York")
START = datetime(2026, 12, 7, 22, 30, tzinfo=UTC).timestamp()  # 17:30 in New York
DAILY_RULE = {"status": "error", "message": "You have reached your daily limit.",
              "errorType": "RATE_LIMIT", "policyName": "DAILY"}  # fmt: skip


@pytest.fixture
def clock() -> FakeClock:
    """One clock for the fake (its day and window), the budget and the adapter."""
    return FakeClock(START)


@pytest.fixture
def fake(clock: FakeClock) -> Iterator[FakeHubSpot]:
    with FakeHubSpot(
        daily_limit=6,
        time_zone="America/New_York",
        clock=clock,
        wall_clock=lambda: datetime.fromtimestamp(clock(), UTC),
    ) as server:
        yield server


def adapter_for(
    fake: FakeHubSpot, clock: FakeClock, conn: redis.Redis, warn_percent: float = 80.0
) -> HubSpotAdapter:
    budget = RequestBudget(conn, "hubspot", 100, 1.0, clock=clock, sleep=clock.sleep)
    return HubSpotAdapter(
        fake.token, fake.url, budget, sleep=clock.sleep, daily_warn_percent=warn_percent
    )


def change(number: int) -> ContactChange:
    email = f"learner{number}@example.com"
    return ContactChange(email, email, {"firstname": f"L{number}"})


def samples(exposition: str) -> dict[tuple[str, str, str], float]:
    """Gauge values by (name, adapter, policy) in a Prometheus exposition."""
    return {
        (s.name, s.labels.get("adapter", ""), s.labels.get("policy", "")): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def spend_the_day(hub: HubSpotAdapter) -> RateLimited:
    """Upsert until HubSpot answers the DAILY 429; the error the adapter raised."""
    for number in range(20):
        try:
            hub.upsert([change(number)])
        except RateLimited as exc:
            return exc
    raise AssertionError("the daily limit was never reached")


def test_the_pause_ends_at_the_accounts_midnight_read_from_resets_at(
    fake: FakeHubSpot, clock: FakeClock, redis_conn: redis.Redis
) -> None:
    hub = adapter_for(fake, clock, redis_conn)
    limited = spend_the_day(hub)
    resets = fake.daily_resets_at().timestamp()
    assert datetime.fromtimestamp(resets, NEW_YORK).time() == clock_time(0)
    assert resets != hubspot_daily.next_utc_midnight(clock())  # New York's, not UTC's
    assert limited.policy == "DAILY" and limited.wait == pytest.approx(resets - clock())
    assert hub.budget is not None
    until, reason, policy = hub.budget.pause() or (0.0, "", "")
    assert (until, policy) == (resets, "DAILY") and "resetsAt" in reason
    sent = len(fake.requests)
    clock.now = resets - 3600  # an hour before: still paused, nothing sent
    with pytest.raises(RateLimited, match="paused"):
        hub.upsert([change(90)])
    assert len(fake.requests) == sent
    clock.now = resets - 30  # the budget waits out the last seconds, then HubSpot takes it
    assert [o.status for o in hub.upsert([change(91)])] == ["synced"]
    first_after = fake.requests[sent]
    assert first_after.time >= resets and first_after.status == 200
    assert hub.budget.pause() is None


def test_without_resets_at_the_pause_lasts_to_the_next_utc_midnight_and_says_so(
    fake: FakeHubSpot, clock: FakeClock, redis_conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    fake.inject_errors(429, body=DAILY_RULE)  # the upsert: the daily limit is spent
    fake.inject_errors(503)  # the usage read that follows fails
    hub = adapter_for(fake, clock, redis_conn)
    with caplog.at_level(logging.WARNING), pytest.raises(RateLimited) as caught:
        hub.upsert([change(1)])
    fallback = hubspot_daily.next_utc_midnight(clock())
    assert fallback == datetime(2026, 12, 8, 0, 1, tzinfo=UTC).timestamp()  # plus a margin
    assert hub.budget is not None and hub.budget.paused_until() == fallback
    assert caught.value.wait == pytest.approx(fallback - clock())
    [said] = [r.getMessage() for r in caplog.records if "daily API limit" in r.getMessage()]
    assert "next UTC midnight plus a margin" in said and "503" in said


def test_a_failed_read_falls_back_to_the_last_resets_at_read(
    fake: FakeHubSpot, clock: FakeClock, redis_conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    hub = adapter_for(fake, clock, redis_conn)
    hub.upsert([change(1)])  # its turn to note the day's usage: resetsAt is kept
    fake.inject_errors(429, body=DAILY_RULE)
    fake.inject_errors(503)
    with caplog.at_level(logging.WARNING), pytest.raises(RateLimited):
        hub.upsert([change(2)])
    assert hub.budget is not None
    assert hub.budget.paused_until() == fake.daily_resets_at().timestamp()
    assert any("the last resetsAt read" in r.getMessage() for r in caplog.records)


def test_the_usage_warning_fires_once_when_the_share_is_passed(
    fake: FakeHubSpot, clock: FakeClock, redis_conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Usage is read at most every CHECK_SECONDS: each round below is one upsert and one read
    (2 of the fake's 10 daily requests), and the warning is set at 50 %."""
    fake.set_daily_limit(10)
    hub = adapter_for(fake, clock, redis_conn, warn_percent=50)
    seen = []
    with caplog.at_level(logging.WARNING):
        for number in range(4):
            hub.upsert([change(number)])
            clock.sleep(hubspot_daily.CHECK_SECONDS)
            reading = hubspot_daily.reading(redis_conn, "hubspot") or {}
            warned = [r for r in caplog.records if "HUBSPOT_DAILY_WARN_PERCENT" in r.getMessage()]
            seen.append((reading["used"], reading["warning"], len(warned)))
    assert seen == [(2, False, 0), (4, False, 0), (6, True, 1), (8, True, 1)]
    reads = [r for r in fake.requests if r.path.startswith("/account-info/")]
    assert len(reads) == 4  # one per CHECK_SECONDS, not one per request
    gauges = samples(metrics.render(redis_conn).decode())
    assert gauges["instruqt_crm_crm_daily_usage_warning", "hubspot", ""] == 1
    assert gauges["instruqt_crm_crm_daily_usage_ratio", "hubspot", ""] == 0.8
    assert gauges["instruqt_crm_crm_paused_until_seconds", "hubspot", ""] == 0


def test_daily_headers_are_read_instead_of_the_endpoint_when_hubspot_sends_them(
    fake: FakeHubSpot, clock: FakeClock, redis_conn: redis.Redis
) -> None:
    fake.daily_headers = True
    hub = adapter_for(fake, clock, redis_conn)
    hub.upsert([change(1)])
    assert not [r for r in fake.requests if r.path.startswith("/account-info/")]
    assert (hubspot_daily.reading(redis_conn, "hubspot") or {})["used"] == 1


def test_status_the_status_page_and_metrics_show_the_pause_and_the_daily_use(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    """On real time, as the operator sees it: the fake's account is in Los Angeles."""
    with FakeHubSpot(daily_limit=4, time_zone="America/Los_Angeles") as fake:
        budget = hubspot_budget(redis_conn, 90)
        hub = HubSpotAdapter(fake.token, fake.url, budget, daily_warn_percent=50)
        spend_the_day(hub)
        resets = fake.daily_resets_at().timestamp()
        env = {"HUBSPOT_ACCESS_TOKEN": fake.token, "HUBSPOT_API_BASE": fake.url}
        settings = Settings.from_env({"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url,
                                      **LOGIN, **env})  # fmt: skip
        figures = status.collect(redis_conn, settings)
        page = create_app(settings, conn=redis_conn).test_client().get("/status", headers=LOGGED_IN)
        exposition = metrics.render(redis_conn).decode()
    shown = figures["crm"]
    assert shown["budget"]["paused_until"] == resets
    assert shown["budget"]["pause_policy"] == "DAILY"
    assert shown["daily"]["warning"] is True and shown["daily"]["limit"] == 4
    lines = "\n".join(status.render(figures))
    when = datetime.fromtimestamp(resets, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    assert (
        f"paused until {when}: HubSpot's daily API limit is spent; resuming at HubSpot's" in lines
    )
    assert "Daily limit   " in lines and f"resets at {when}" in lines and "WARNING" in lines
    html = page.get_data(as_text=True)
    assert f"paused until {when}" in html and "Daily limit" in html
    gauges = samples(exposition)
    assert gauges["instruqt_crm_crm_paused_until_seconds", "hubspot", "DAILY"] == resets
    assert gauges["instruqt_crm_crm_daily_limit", "hubspot", ""] == 4
    assert gauges["instruqt_crm_crm_daily_resets_at_seconds", "hubspot", ""] == resets


def test_the_warning_share_is_a_setting_with_a_clear_error(redis_conn: redis.Redis) -> None:
    assert Settings.from_env({}).hubspot_daily_warn_percent == 80
    with pytest.raises(SettingsError, match=r"^HUBSPOT_DAILY_WARN_PERCENT: expected at most"):
        Settings.from_env({"HUBSPOT_DAILY_WARN_PERCENT": "120"})
    settings = Settings.from_env({"HUBSPOT_ACCESS_TOKEN": "t", "HUBSPOT_DAILY_WARN_PERCENT": "65"})
    built = build_adapter(settings, load_mapping(ROOT / "mappings" / "hubspot.yaml"), redis_conn)
    assert isinstance(built, HubSpotAdapter) and built.daily is not None
    assert built.daily.warn_percent == 65


def test_usage_answers_are_read_in_either_shape_and_old_resets_move_on() -> None:
    item = {"name": "private-apps-api-calls-daily", "usageLimit": 500000, "currentUsage": 7,
            "collectedAt": "2026-12-08T06:46:40.789Z", "fetchStatus": "SUCCESS",
            "resetsAt": "2026-12-08T05:00:00Z"}  # fmt: skip
    reset = datetime(2026, 12, 8, 5, tzinfo=UTC).timestamp()
    expected = hubspot_daily.DailyUsage(7, 500000, reset)
    assert hubspot_daily.parse_usage({"results": [item]}) == expected
    assert hubspot_daily.parse_usage([item]) == expected
    with pytest.raises(ValueError, match="no daily usage"):
        hubspot_daily.parse_usage({"results": [{"usageLimit": "many"}]})
    later = datetime(2026, 12, 8, 6, 46, tzinfo=UTC).timestamp()  # read after that reset
    assert hubspot_daily.ahead(reset, later) == reset + 86400
    assert hubspot_daily.usage_from_headers({"X-HubSpot-RateLimit-Daily": "x"}) is None
