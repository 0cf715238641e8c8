"""Failures in RQ's failed registry of the failed queue: one list with ``failed``; RQ's
"Requeue" does what ``instruqt-crm failed requeue`` does, run by a real worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from rq.job import Job, JobStatus, requeue_job
from rq.serializers import JSONSerializer

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.crm import hubspot_setup
from instruqt_crm.crm.hubspot import HubSpotAdapter
from instruqt_crm.engine import requeue
from instruqt_crm.engine.inbox import enqueue_event
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.errors import Category
from instruqt_crm.journal import failures
from instruqt_crm.journal.failures import FAILED_QUEUE, Kind
from instruqt_crm.receiver.app import create_app
from tests.engine_helpers import drain, engine_env, installed
from tests.fakes.hubspot import FakeHubSpot
from tests.test_fake_hubspot import create_property

ROOT = Path(__file__).resolve().parent.parent
LOGIN = {"RQ_DASHBOARD_USERNAME": "ops", "RQ_DASHBOARD_PASSWORD": "correct-horse-battery"}


def write_mapping(path: Path, score: str, first_activity_type: str) -> Path:
    """The default mapping with the review score's template and the first activity's type."""
    text = (ROOT / "mappings" / "hubspot.yaml").read_text()
    text = text.replace(
        'instruqt_last_review_score: "{{ event.score }}"', f"instruqt_last_review_score: {score!r}"
    )
    old = "instruqt_first_activity_at:\n    type: datetime"
    assert old in text
    text = text.replace(old, f"instruqt_first_activity_at:\n    type: {first_activity_type}")
    path.write_text(text)
    return path


def event(event_type: str, user_id: str, email: str, **extra: object) -> dict[str, object]:
    """An Instruqt event of a learner whose email is in the play's parameters."""
    return {
        "type": event_type,
        "user_id": user_id,
        "timestamp": "2026-03-04T10:11:12.123456789Z",
        "track_id": "trk1",
        "track_slug": "intro",
        "participant_id": f"p-{user_id}",
        "custom_parameters": {"email": email},
        **extra,
    }


def failed_job(conn: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)


def test_failures_appear_in_rqs_failed_registry_and_rqs_requeue_syncs_them_after_a_fix(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """A failing template and a contact HubSpot rejects are each one failed job of the failed
    queue with its reason; once the mapping is fixed, RQ's requeue syncs both."""
    with FakeHubSpot() as fake:
        env = engine_env(
            redis_url,
            tmp_path,
            HUBSPOT_ACCESS_TOKEN=fake.token,
            HUBSPOT_API_BASE=fake.url,
            MAPPING_PATH=str(
                write_mapping(tmp_path / "m.yaml", "{{ 100 // event.score }}", "datetime")
            ),
        )
        broken = Runtime.from_settings(Settings.from_env(env))
        adapter = HubSpotAdapter(fake.token, fake.url)
        create_property(adapter.client, "instruqt_first_activity_at", "date", "date")  # by hand
        hubspot_setup.apply(adapter, broken.mapping, hubspot_setup.plan(adapter, broken.mapping))
        enqueue_event(redis_conn, "msg_track", event("track.started", "u1", "ann@example.com"), 60)
        review = event("review.created", "u2", "bob@example.com", score=0, review_id="r1")
        enqueue_event(redis_conn, "msg_review", review, 60)
        with installed(broken):
            drain(redis_conn)

        registry = failures.registry(redis_conn)
        ids = registry.get_job_ids()
        assert len(ids) == 2
        jobs = {
            failed_job(redis_conn, job_id).description: failed_job(redis_conn, job_id)
            for job_id in ids
        }
        template = next(job for text, job in jobs.items() if text.startswith("event"))
        contact = next(job for text, job in jobs.items() if text.startswith("contact"))
        assert template.description == (
            "event review.created of user u2 at 2026-03-04T10:11:12.123456789Z (msg_review)"
        )
        assert "ann@example.com" in contact.description
        for job in (template, contact):
            assert job.origin == FAILED_QUEUE and job.get_status() == JobStatus.FAILED
        template_reason = template.latest_result().exc_string
        assert "property 'instruqt_last_review_score': template failed" in template_reason
        assert "ZeroDivisionError" in template_reason
        assert "not midnight UTC" in contact.latest_result().exc_string
        listed = {f.id: f for f in failures.every(redis_conn)}  # the same list, read by the app
        assert set(listed) == set(ids)
        assert listed[template.id].reason == template_reason
        assert (listed[contact.id].kind, listed[contact.id].category) == (
            Kind.CONTACT,
            Category.VALIDATION,
        )
        assert fake.contacts == {}

        env["MAPPING_PATH"] = str(
            write_mapping(tmp_path / "fixed.yaml", "{{ event.score }}", "date")
        )
        fixed = Runtime.from_settings(Settings.from_env(env))
        for job_id in ids:
            requeue_job(job_id, connection=redis_conn, serializer=JSONSerializer)  # RQ's API
        assert failures.every(redis_conn) == []  # requeued: off the list at once
        with installed(fixed):
            drain(redis_conn)

        assert registry.get_job_ids() == []
        assert fake.contacts["ann@example.com"]["instruqt_first_activity_at"] == "2026-03-04"
        assert fake.contacts["bob@example.com"]["instruqt_last_review_score"] == "0"
        done = failed_job(redis_conn, template.id)
        assert done.get_status() == JobStatus.FINISHED
        assert done.description.startswith("requeued event review.created of user u2")


def dashboard(redis_url: str, redis_conn: redis.Redis, tmp_path: Path) -> FlaskClient:
    settings = Settings.from_env({**engine_env(redis_url, tmp_path), **LOGIN})
    return create_app(settings, conn=redis_conn).test_client()


def dashboard_post(client: FlaskClient, path: str) -> dict[str, object]:
    """POST to the dashboard as its own pages do (logged in, same origin)."""
    answer = client.post(
        f"/rq{path}", headers={"Origin": "http://localhost"}, auth=tuple(LOGIN.values())
    )
    return answer.get_json()


def test_the_dashboard_lists_the_failed_queue_with_each_failure_and_its_reason(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    body = json.dumps(event("track.completed", "u7", "ann@example.com"))
    failures.record(redis_conn, Kind.EVENT, Category.MAPPING, "rule 'x': failed", "msg_7", body)
    client = dashboard(redis_url, redis_conn, tmp_path)
    login = {"auth": tuple(LOGIN.values())}
    queues = client.get("/rq/0/data/queues.json", **login).get_json()["queues"]
    [listed] = [q for q in queues if q["name"] == FAILED_QUEUE]
    assert (listed["count"], listed["failed_job_registry_count"]) == (0, 1)
    jobs = client.get(f"/rq/0/data/jobs/{FAILED_QUEUE}/failed/8/asc/1.json", **login).get_json()
    [job] = jobs["jobs"]
    assert job["exc_info"] == "rule 'x': failed"
    assert job["description"] == (
        "event track.completed of user u7 at 2026-03-04T10:11:12.123456789Z (msg_7)"
    )


def test_requeue_in_the_dashboard_does_what_failed_requeue_does(
    redis_url: str, redis_conn: redis.Redis, engine_run: Runtime, tmp_path: Path
) -> None:
    body = event("track.started", "u1", "ann@example.com")
    in_rq = failures.record(
        redis_conn, Kind.EVENT, Category.OTHER, "boom", "msg_1", json.dumps(body)
    )
    in_cli = failures.record(
        redis_conn, Kind.EVENT, Category.OTHER, "boom", "msg_2", json.dumps(body)
    )
    client = dashboard(redis_url, redis_conn, tmp_path)
    assert dashboard_post(client, f"/job/{in_rq.id}/requeue") == {"status": "OK"}
    assert requeue.requeue(redis_conn, in_cli.id) == Kind.EVENT
    assert failures.every(redis_conn) == []
    with installed(engine_run):
        drain(redis_conn)
    assert redis_conn.hget(keys.STATS, "events:merged:track.started") == b"2"
    assert failures.every(redis_conn) == [] and failures.registry(redis_conn).count == 0


def test_deleting_in_either_place_deletes_in_both(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    first, second, third = (
        failures.record(redis_conn, Kind.CONTACT, Category.VALIDATION, "bad", f"{n}@b.co", "{}")
        for n in "abc"
    )
    client = dashboard(redis_url, redis_conn, tmp_path)
    assert dashboard_post(client, f"/job/{first.id}/delete") == {"status": "OK"}
    assert [f.id for f in failures.every(redis_conn)] == [third.id, second.id]
    assert failures.remove(redis_conn, second.id)
    assert failures.registry(redis_conn).get_job_ids() == [third.id]
    assert not Job.exists(second.id, redis_conn)
    assert failures.purge(redis_conn) == 1
    assert failures.registry(redis_conn).count == 0 and not Job.exists(third.id, redis_conn)


def test_a_delivery_that_is_not_an_event_requeued_in_rq_fails_again_with_its_record(
    redis_conn: redis.Redis, engine_run: Runtime
) -> None:
    kept = failures.record(redis_conn, Kind.BODY, Category.INVALID_BODY, "not JSON", "m1", b"{oops")
    requeue_job(kept.id, connection=redis_conn, serializer=JSONSerializer)
    with installed(engine_run):
        drain(redis_conn)
    assert failures.every(redis_conn) == [kept]  # back, its reason and payload kept
    exc = failed_job(redis_conn, kept.id).latest_result().exc_string
    assert "NotRequeueable: failure" in exc and "cannot requeue (failed: not JSON)" in exc


def test_a_job_in_the_failed_queue_that_is_not_a_failure_is_listed_not_requeued(
    redis_conn: redis.Redis, engine_run: Runtime
) -> None:
    foreign = failures.failed_queue(redis_conn).enqueue("os.getcwd")
    with installed(engine_run):
        drain(redis_conn)
    [listed] = failures.every(redis_conn)
    assert (listed.id, listed.kind, listed.category) == (foreign.id, Kind.JOB, Category.OTHER)
    assert "not one of our job functions" in listed.reason
    with pytest.raises(requeue.NotRequeueable):
        requeue.requeue(redis_conn, foreign.id)


def test_failures_recorded_by_earlier_versions_move_into_the_registry_readable(
    redis_conn: redis.Redis,
) -> None:
    fields = {"id": "0123abcd", "kind": "contact", "category": "validation", "reason": "bad"}
    more = {"message_id": "a@b.co", "at": "5.0", "payload": '{"email": "a@b.co"}'}
    redis_conn.hset(keys.legacy_failure("0123abcd"), mapping={**fields, **more})
    redis_conn.zadd(keys.LEGACY_FAILURES, {"0123abcd": 5.0})
    assert failures.get(redis_conn, "0123abcd") == failures.Failure(
        "0123abcd", Kind.CONTACT, Category.VALIDATION, "bad", "a@b.co", 5.0, '{"email": "a@b.co"}'
    )
    assert failed_job(redis_conn, "0123abcd").latest_result().exc_string == "bad"
