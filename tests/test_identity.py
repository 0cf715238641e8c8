"""Identity: params, then cache, then Instruqt's API; parking, release and expiry."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import responses

from instruqt_crm.config import Settings
from instruqt_crm.crm.dryrun import dry_run_records
from instruqt_crm.engine import identity, ledger
from instruqt_crm.engine.flush import flush
from instruqt_crm.engine.handling import Retried, handle_event, retry_waiting
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.events import parse_event
from instruqt_crm.instruqt_api import InstruqtClient
from instruqt_crm.journal import failures, trail
from instruqt_crm.mapping import Identity, load_mapping
from instruqt_crm.mapping.templates import render, template_context
from instruqt_crm.ops import metrics
from samples.signing import SECRET

GRAPHQL = "https://instruqt.test/graphql"
MAPPING = load_mapping(Path("mappings/hubspot.yaml"))
DAY = 86400.0


def user_reply(email: str | None, details: dict | None = None) -> dict:
    """Instruqt's answer: the profile's email (None: an unknown user) and the team's details."""
    user = {"id": "u1", "details": details, "profile": {"email": email, "display_name": "Ada"}}
    return {"data": {"user": user if email is not None or details else None}}


@pytest.fixture
def lookup() -> InstruqtClient:
    return InstruqtClient("key-123", "acme", url=GRAPHQL, sleep=lambda s: None)


@pytest.fixture
def runtime(redis_url: str, tmp_path: Path) -> Runtime:
    env = {
        "INSTRUQT_WEBHOOK_SECRET": SECRET,
        "REDIS_URL": redis_url,
        "FLUSH_WINDOW_SECONDS": "0",
        "INSTRUQT_API_KEY": "key-123",
        "INSTRUQT_TEAM_SLUG": "acme",
        "INSTRUQT_GRAPHQL_URL": GRAPHQL,
        "DRY_RUN_PATH": str(tmp_path / "out.jsonl"),
    }
    return Runtime(Settings.from_env(env), MAPPING)


def event(user_id: str | None = "u1", email: str | None = None, kind: str = "track.started"):
    body = {
        "type": kind,
        "user_id": user_id,
        "track_slug": "t",
        "timestamp": "2026-11-01T10:00:00Z",
        "params": {"icp_email": email} if email else {},
    }
    return parse_event(f"m-{user_id}-{kind}", body)


@responses.activate
def test_a_parameter_email_is_used_while_instruqt_has_none(redis_conn: redis.Redis, lookup) -> None:
    responses.post(GRAPHQL, json=user_reply(None))
    resolver = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    found = resolver.resolve(event(email=" Ada@Example.COM "))
    assert (found.email, found.source) == ("ada@example.com", "params")
    assert resolver.resolve(event()).source == "cache"
    assert len(responses.calls) == 1  # Instruqt was asked once, and had none
    assert 0 < redis_conn.ttl("instruqt_crm:identity:u1") <= identity.PARAMS_TTL  # asked again


def test_without_lookups_a_parameter_email_is_all_there_is(redis_conn: redis.Redis) -> None:
    resolver = identity.IdentityResolver(redis_conn, MAPPING.identity, None)
    assert resolver.resolve(event(email="ada@example.com")).source == "params"
    assert resolver.resolve(event()).email == "ada@example.com"


@responses.activate
def test_the_teams_details_come_first_then_the_profile(redis_conn: redis.Redis, lookup) -> None:
    details = {"email": "Ada@Acme.io", "firstName": "Ada", "lastName": "Lovelace"}
    responses.post(GRAPHQL, json=user_reply("ada@home.example", details))
    found = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup).resolve(event())
    assert found.email == "ada@acme.io"
    assert found.learner == identity.Learner("ada@acme.io", "instruqt", "Ada", "Lovelace")
    redis_conn.flushdb()
    responses.replace(responses.POST, GRAPHQL, json=user_reply("ada@home.example"))
    profile_only = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    assert profile_only.resolve(event()).email == "ada@home.example"
    redis_conn.flushdb()
    responses.replace(responses.POST, GRAPHQL, json=user_reply(None, details))
    details_only = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    assert details_only.resolve(event()).email == "ada@acme.io"


@responses.activate
def test_instruqts_email_outranks_a_parameter_email_and_the_trail_says_so(
    redis_conn: redis.Redis, lookup
) -> None:
    """An invite link's parameters are typed by the learner: Instruqt's email wins, and it
    is never replaced by a parameter email, now or later."""
    responses.post(GRAPHQL, json=user_reply("grace@example.com"))
    resolver = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    found = resolver.resolve(event(email="colleague@example.com"))
    assert (found.email, found.source) == ("grace@example.com", "lookup")
    later = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    assert later.resolve(event(email="colleague@example.com")).email == "grace@example.com"
    assert len(responses.calls) == 1
    exposed = metrics.render(redis_conn).decode()
    assert 'instruqt_crm_identity_total{source="params-mismatch"} 2.0' in exposed
    noted = [e for e in trail.entries(redis_conn, "grace@example.com") if e["kind"] == "identity"]
    assert len(noted) == 2  # once per batch that saw the parameter email
    assert all(
        "colleague@example.com" in e["reason"] and "Instruqt's" in e["reason"] for e in noted
    )


@responses.activate
def test_a_cached_parameter_email_never_outranks_a_later_instruqt_answer(
    redis_conn: redis.Redis, lookup
) -> None:
    responses.post(GRAPHQL, status=503)  # Instruqt cannot be asked: the parameter is used
    assert (
        identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
        .resolve(event(email="typed@example.com"))
        .email
        == "typed@example.com"
    )
    assert 0 < redis_conn.ttl("instruqt_crm:identity:u1") <= identity.UNCHECKED_TTL
    redis_conn.delete("instruqt_crm:identity:u1")  # its short cache has expired
    responses.replace(responses.POST, GRAPHQL, json=user_reply("real@example.com"))
    resolver = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    assert resolver.resolve(event(email="typed@example.com")).email == "real@example.com"


@responses.activate
def test_one_users_graphql_error_does_not_stop_the_others(redis_conn: redis.Redis, lookup) -> None:
    responses.post(
        GRAPHQL,
        json={"data": None, "errors": [{"message": "resolver failed for u1", "path": ["user"]}]},
        match=[
            responses.matchers.json_params_matcher(
                {"variables": {"userID": "u1", "teamSlug": "acme"}}, strict_match=False
            )
        ],
    )
    responses.post(GRAPHQL, json=user_reply("two@example.com"))
    resolver = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    assert resolver.resolve(event("u1")).source == "lookup-failed"
    assert resolver.resolve(event("u2")).email == "two@example.com"  # still asked


@responses.activate
def test_lookup_when_not_cached_then_cache(redis_conn: redis.Redis, lookup) -> None:
    responses.post(GRAPHQL, json=user_reply("Grace@Example.com"))
    resolver = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    assert resolver.resolve(event()).email == "grace@example.com"
    assert resolver.resolve(event()).source == "cache"
    assert len(responses.calls) == 1


@responses.activate
def test_no_email_is_cached_briefly(redis_conn: redis.Redis, lookup) -> None:
    responses.post(GRAPHQL, json=user_reply(None))
    resolver = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    assert resolver.resolve(event()).source == "lookup"
    assert resolver.resolve(event()).source == "negative-cache"
    assert 0 < redis_conn.ttl("instruqt_crm:identity:u1") <= identity.NEGATIVE_TTL
    assert len(responses.calls) == 1


@responses.activate
def test_lookup_failure_is_not_an_email(redis_conn: redis.Redis, lookup) -> None:
    responses.post(GRAPHQL, status=401)
    resolver = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    assert resolver.resolve(event()) == identity.Resolution(None, "lookup-failed")
    assert resolver.resolve(event("u2")).source == "lookup-deferred"  # the key: ask no more


def test_lookup_off_in_the_mapping(redis_conn: redis.Redis, lookup) -> None:
    no_lookup = Identity(email_params=["email"], lookup=False)
    resolver = identity.IdentityResolver(redis_conn, no_lookup, lookup)
    assert resolver.resolve(event()) == identity.Resolution(None, "none")


@responses.activate
def test_parked_event_is_released_by_a_later_lookup(
    redis_conn: redis.Redis, runtime: Runtime
) -> None:
    responses.post(GRAPHQL, json=user_reply(None))
    assert handle_event(redis_conn, runtime, event()).status == "parked"
    assert identity.parked_count(redis_conn) == 1
    responses.replace(responses.POST, GRAPHQL, json=user_reply("late@example.com"))
    redis_conn.delete("instruqt_crm:identity:u1")  # the negative answer has expired
    start = identity.next_due(redis_conn)
    assert start is not None
    assert retry_waiting(redis_conn, runtime, now=start + 1) == Retried(1, 0)
    assert identity.parked_count(redis_conn) == 0
    flush(redis_conn, runtime.adapter(redis_conn), MAPPING)
    assert dry_run_records(redis_conn)["late@example.com"]["instruqt_tracks_started"] == "t"


@responses.activate
def test_parked_events_back_off_then_expire_with_a_reason(
    redis_conn: redis.Redis, runtime: Runtime
) -> None:
    responses.post(GRAPHQL, json=user_reply(None))
    handle_event(redis_conn, runtime, event())
    handle_event(redis_conn, runtime, event(kind="track.completed"))
    since = identity.parked_since(redis_conn, "u1")
    assert since is not None
    moment = since + 61
    first = retry_waiting(redis_conn, runtime, now=moment)
    assert first == Retried(0, 0)
    assert identity.next_due(redis_conn) == pytest.approx(moment + identity.BACKOFF[1])
    late = since + runtime.settings.identity_wait_days * DAY + 1
    redis_conn.delete("instruqt_crm:identity:u1")
    assert retry_waiting(redis_conn, runtime, now=late) == Retried(0, 2)
    kept = failures.recent(redis_conn)
    assert {f.category for f in kept} == {"identity"}
    assert all("within 7 days" in f.reason for f in kept)
    assert identity.parked_count(redis_conn) == 0


@responses.activate
def test_a_later_event_whose_lookup_succeeds_releases_the_waiting_ones(
    redis_conn: redis.Redis, runtime: Runtime
) -> None:
    responses.post(GRAPHQL, json=user_reply(None))
    assert handle_event(redis_conn, runtime, event()).status == "parked"
    redis_conn.delete("instruqt_crm:identity:u1")  # the negative answer has expired
    responses.replace(responses.POST, GRAPHQL, json=user_reply("found@example.com"))
    handle_event(redis_conn, runtime, event(kind="track.completed"))
    assert identity.parked_count(redis_conn) == 0
    flush(redis_conn, runtime.adapter(redis_conn), MAPPING)
    record = dry_run_records(redis_conn)["found@example.com"]
    assert record["instruqt_tracks_started"] == "t" and record["instruqt_tracks_completed"] == "t"


@responses.activate
def test_a_batch_stops_asking_instruqt_after_a_failed_lookup(
    redis_conn: redis.Redis, lookup
) -> None:
    """With Instruqt down or slow, one batch waits for one lookup, not one per learner."""
    responses.post(GRAPHQL, status=503)
    resolver = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    assert resolver.resolve(event("u1")).source == "lookup-failed"
    asked = len(responses.calls)  # the client's own attempts for u1
    assert resolver.resolve(event("u2")) == identity.Resolution(None, "lookup-deferred")
    assert len(responses.calls) == asked
    fresh = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)  # the next batch
    assert fresh.resolve(event("u2")).source == "lookup-failed"


@responses.activate
def test_a_batch_stops_asking_instruqt_when_its_lookup_time_is_spent(
    redis_conn: redis.Redis, lookup, monkeypatch: pytest.MonkeyPatch
) -> None:
    responses.post(GRAPHQL, json=user_reply("grace@example.com"))
    monkeypatch.setattr(identity, "LOOKUP_SECONDS", 0.0)
    resolver = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    assert resolver.resolve(event("u1")) == identity.Resolution(None, "lookup-deferred")
    assert len(responses.calls) == 0


@responses.activate
def test_the_name_instruqt_gave_reaches_the_ledger_and_the_templates(
    redis_conn: redis.Redis, runtime: Runtime
) -> None:
    """A learner's name (the team's details, else the display name split) is kept with the
    contact for a CRM that needs one to create a record, and templates see it as learner."""
    details = {"email": "ada@acme.io", "firstName": "Ada", "lastName": "Lovelace"}
    responses.post(GRAPHQL, json=user_reply(None, details))
    assert handle_event(redis_conn, runtime, event()).status == "merged"
    pending = ledger.pending(redis_conn, "ada@acme.io", MAPPING).change
    assert pending is not None and (pending.first_name, pending.last_name) == ("Ada", "Lovelace")
    context = template_context(event(), "ada@acme.io", ("Ada", "Lovelace"))
    assert context["learner"]["first_name"] == "Ada"
    assert render("{{ learner.first_name }} {{ learner.last_name }}", context) == "Ada Lovelace"


def test_a_parameter_email_never_replaces_instruqts_cached_meanwhile(
    redis_conn: redis.Redis,
) -> None:
    """Two batches hold the same learner: the one that read the cache before the other cached
    Instruqt's answer cannot replace it with the event's parameter email."""
    late = identity.IdentityResolver(redis_conn, MAPPING.identity, None, user_ids=["u1"])
    trusted = identity.Learner("real@example.com", "instruqt")
    identity.remember(redis_conn, "u1", trusted, identity.CACHE_TTL)  # the other batch
    assert late.resolve(event(email="typed@example.com")).email == "typed@example.com"
    assert identity.cached_learner(redis_conn, "u1") == trusted


@responses.activate
def test_an_email_cached_by_an_earlier_version_is_checked_with_instruqt(
    redis_conn: redis.Redis, lookup
) -> None:
    redis_conn.set("instruqt_crm:identity:u1", "typed@example.com", ex=3600)  # a bare email
    responses.post(GRAPHQL, json=user_reply("real@example.com"))
    resolver = identity.IdentityResolver(redis_conn, MAPPING.identity, lookup)
    assert resolver.resolve(event()).email == "real@example.com"
    assert len(responses.calls) == 1
