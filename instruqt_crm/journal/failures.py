"""The failure registry operators look at: what failed for good, why, and what it concerned.

Each failure is an RQ job in the failed registry of the ``instruqt-failed`` queue: the RQ
dashboard lists it there, with the reason as its exception text and what it concerns in its
description, and RQ's "Requeue" runs its function, ``REQUEUE_JOB``, which does the work
again exactly as ``instruqt-crm failed requeue`` does (``engine.requeue``). There is no second
list: this module reads and writes the failures through those jobs (their ``meta`` holds the
record), so a failure requeued or deleted in the dashboard is gone here too, and one
requeued or purged here is gone from the dashboard.

Each failure is recorded with its ``Kind`` (an event, a contact or play record the CRM
rejected, a flush, or a delivery that is not an event: what requeueing it means) and its
``Category`` (why, for grouping). Both are enums, so a failure is never filed under a name
nobody lists.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis
from rq.executions import ExecutionRegistry
from rq.job import JOB_ID_PATTERN, Job, JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from instruqt_crm import keys
from instruqt_crm.errors import Category

from . import legacy_failures

FAILED_QUEUE = "instruqt-failed"
REQUEUE_JOB = "instruqt_crm.engine.jobs.requeue_failure"  # allowlisted in engine.queueing
KEEP_SECONDS = 10 * 365 * 86400  # until requeued or purged (RQ scores its registry by expiry)
REQUEUED_RESULT_SECONDS = 86400  # a requeue job, once run, stays among RQ's finished jobs
META_FIELD = "instruqt_failure"  # the job's meta field holding the record
CATEGORY_FIELD = "instruqt_category"  # the record's category again, in a field of the job's own


class Kind(StrEnum):
    """What a failure concerns."""

    EVENT = "event"  # an accepted event that could not be handled: handled again on requeue
    CONTACT = "contact"  # a contact the CRM rejected: sent again on requeue
    PLAY = "play"  # a play record the CRM rejected: sent again on requeue
    FLUSH = "flush"  # a flush that failed for every contact: run again on requeue
    BODY = "body"  # a signed delivery that is not a usable event: kept to read, not requeued
    JOB = "job"  # a job in the failed queue that is not ours: kept to read, not requeued


@dataclass(frozen=True)
class Failure:
    """One failed or rejected item, with everything needed to understand and requeue it."""

    id: str
    kind: Kind
    category: Category
    reason: str
    message_id: str  # the event's delivery id, the contact's key, play:<participant>, or flush
    at: float
    payload: str  # the raw body or the JSON the failure concerns, as text

    def body(self) -> Any:
        """The payload decoded as JSON, or the raw text if it is not JSON (or too deep)."""
        try:
            return json.loads(self.payload)
        except (ValueError, RecursionError):
            return self.payload

    def summary(self) -> str:
        """What the failure concerns, in a line: the RQ job's description."""
        body = self.body()
        found = body if isinstance(body, dict) else {}
        if self.kind == Kind.EVENT:
            user = found.get("user_id")
            learner = f"user {user}" if user not in (None, "") else "no user id"
            return (
                f"event {found.get('type', '?')} of {learner} at {found.get('timestamp', '?')} "
                f"({self.message_id})"
            )
        if self.kind == Kind.CONTACT:
            return f"contact {found.get('email', self.message_id)}: {_properties(found)} rejected"
        if self.kind == Kind.PLAY:
            participant = found.get("participant_id", self.message_id)
            return f"play {participant} of {found.get('email', '?')}: play record rejected"
        if self.kind == Kind.FLUSH:
            return "flush: failed for every contact"
        if self.kind == Kind.BODY:
            return f"delivery {self.message_id}: not a usable event"
        return f"job {self.message_id}: not a failure record"


def _properties(payload: dict[str, Any]) -> str:
    """``3 properties`` of a contact payload."""
    count = len(payload.get("properties") or {})
    return f"{count} propert{'y' if count == 1 else 'ies'}"


def registry(conn: redis.Redis) -> FailedJobRegistry:
    """RQ's failed registry of the failed queue: the list of open failures."""
    return FailedJobRegistry(FAILED_QUEUE, connection=conn, serializer=JSONSerializer)


def record(
    conn: redis.Redis,
    kind: Kind,
    category: Category,
    reason: str,
    message_id: str,
    payload: str | bytes,
) -> Failure:
    """Store a failure for operators (a failed RQ job, see the module) and count it by category."""
    text = payload.decode("utf-8", "backslashreplace") if isinstance(payload, bytes) else payload
    failure = Failure(
        uuid.uuid4().hex[:16],
        Kind(kind),
        Category(category),
        _storable(reason),
        _storable(message_id),
        time.time(),
        _storable(text),
    )
    with conn.pipeline(transaction=True) as pipe:
        file(conn, pipe, failure)
        pipe.hincrby(keys.FAILURE_COUNTS, failure.category, 1)
        pipe.execute()
    return failure


def file(conn: redis.Redis, pipe: Any, failure: Failure) -> None:
    """Queue the commands that file ``failure`` as a failed job of the failed queue, as RQ's
    worker files a job that raised: the job, its failed result, its registry entry."""
    fields = {name: value for name, value in asdict(failure).items() if name != "id"}
    job = Job.create(
        REQUEUE_JOB,
        connection=conn,
        serializer=JSONSerializer,
        id=failure.id,
        origin=FAILED_QUEUE,
        description=_storable(failure.summary())[:300],
        meta={META_FIELD: fields},
        result_ttl=REQUEUED_RESULT_SECONDS,
        failure_ttl=KEEP_SECONDS,
    )
    job.created_at = job.ended_at = datetime.fromtimestamp(failure.at, UTC)
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    job.save(pipeline=pipe)  # with its meta: the record
    pipe.hset(job.key, CATEGORY_FIELD, failure.category)  # counted without reading the record
    registry(conn).add(job, ttl=KEEP_SECONDS, exc_string=failure.reason, pipeline=pipe)
    Result.create_failure(job, KEEP_SECONDS, exc_string=failure.reason, pipeline=pipe)
    pipe.sadd(Queue.redis_queues_keys, failed_queue(conn).key)  # listed on the dashboard


def failed_queue(conn: redis.Redis) -> Queue:
    """The failed queue: failures requeued through RQ wait there for a worker."""
    return Queue(FAILED_QUEUE, connection=conn, serializer=JSONSerializer)


def _storable(value: str) -> str:
    """Text Redis can store: anything UTF-8 cannot encode (lone surrogates) escaped."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _from_fields(failure_id: str, fields: Any) -> Failure | None:
    """A failure from the record a job's meta holds; None if it holds none (or a broken one)."""
    if not isinstance(fields, dict):
        return None
    try:
        return Failure(
            id=failure_id,
            kind=Kind(fields["kind"]),
            category=Category(fields["category"]),
            reason=str(fields["reason"]),
            message_id=str(fields["message_id"]),
            at=float(fields["at"]),
            payload=str(fields["payload"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def of_job(job: Job) -> Failure | None:
    """The failure a job is the handle of (the requeue job being run), or None."""
    return _from_fields(job.id, job.meta.get(META_FIELD))


def _read(conn: redis.Redis, failure_ids: list[str]) -> list[Failure]:
    """The failures of these ids, read in one round trip (a job of the failed queue that holds
    no record, e.g. one not written by us, as a ``JOB`` failure; one gone meanwhile skipped)."""
    with conn.pipeline(transaction=False) as pipe:
        for failure_id in failure_ids:
            pipe.hget(Job.key_for(failure_id), "meta")
        metas = pipe.execute()
    found = []
    for failure_id, raw in zip(failure_ids, metas, strict=True):
        try:
            meta = json.loads(raw) if raw is not None else {}
        except ValueError:
            meta = {}
        failure = _from_fields(failure_id, meta.get(META_FIELD) if isinstance(meta, dict) else None)
        if failure is None:
            failure = _foreign(conn, failure_id)
        if failure is not None:
            found.append(failure)
    return found


def _foreign(conn: redis.Redis, job_id: str) -> Failure | None:
    """A failed job of the failed queue that is no failure record, as operators see it in RQ:
    its function and its exception's last line (read with JSON, never pickle)."""
    try:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
        latest = job.latest_result()
        name = job.func_name
    except Exception:  # gone, or not a job RQ can read: nothing to show
        return None
    lines = (latest.exc_string or "").strip().splitlines() if latest is not None else []
    ended = job.ended_at or job.created_at
    return Failure(
        id=job_id,
        kind=Kind.JOB,
        category=Category.OTHER,
        reason=lines[-1] if lines else "failed (no reason recorded)",
        message_id=job_id,
        at=ended.timestamp() if ended else 0.0,
        payload=json.dumps({"function": str(name)[:200]}),
    )


def get(conn: redis.Redis, failure_id: str) -> Failure | None:
    """One open failure by id (None if there is none, or if it was requeued meanwhile)."""
    migrate_legacy(conn)
    if conn.zscore(registry(conn).key, failure_id) is None:
        return None
    found = _read(conn, [failure_id])
    return found[0] if found else None


def recent(conn: redis.Redis, limit: int = 100) -> list[Failure]:
    """The newest failures first (RQ scores its registry in whole seconds: the times recorded
    order those of one second)."""
    migrate_legacy(conn)
    ids = conn.zrevrange(registry(conn).key, 0, limit - 1)
    return sorted(_read(conn, [keys.text(raw) for raw in ids]), key=lambda f: -f.at)


def counts(conn: redis.Redis) -> dict[str, int]:
    """How many failures were recorded, by category."""
    return {keys.text(k): int(v) for k, v in conn.hgetall(keys.FAILURE_COUNTS).items()}


def every(conn: redis.Redis, category: Category | None = None) -> list[Failure]:
    """Every open failure (newest first), optionally of one category."""
    found = recent(conn, limit=int(conn.zcard(registry(conn).key)) or 1)
    return [f for f in found if category is None or f.category == category]


def by_category(conn: redis.Redis) -> dict[str, list[Failure]]:
    """Open failures grouped by category (newest first within each)."""
    groups: dict[str, list[Failure]] = {}
    for failure in every(conn):
        groups.setdefault(failure.category, []).append(failure)
    return groups


def open_counts(conn: redis.Redis) -> dict[str, int]:
    """How many failures are open now (not yet requeued or purged), by category.

    Read on every ``/metrics`` scrape: each failure's category field, not its record (which
    holds the event's body); only failures filed before that field existed, or failed jobs
    not filed by us, are read whole."""
    migrate_legacy(conn)
    ids = [keys.text(raw) for raw in conn.zrange(registry(conn).key, 0, -1)]
    with conn.pipeline(transaction=False) as pipe:
        for failure_id in ids:
            pipe.hget(Job.key_for(failure_id), CATEGORY_FIELD)
        fields = pipe.execute()
    found = Counter(keys.text(field) for field in fields if field is not None)
    unmarked = [failure_id for failure_id, field in zip(ids, fields, strict=True) if field is None]
    found.update(failure.category for failure in _read(conn, unmarked))
    return dict(found)


def forget(pipe: redis.Redis | Any, failure_id: str) -> None:
    """Queue the commands that forget one failure (on a pipeline, with what it does): its
    entry in the failed registry, its job, the job's results and executions."""
    pipe.zrem(FailedJobRegistry.key_template.format(FAILED_QUEUE), failure_id)
    executions = ExecutionRegistry.key_template.format(failure_id)  # a requeue that ran has some
    pipe.delete(Job.key_for(failure_id), Result.get_key(failure_id), executions)


def remove(conn: redis.Redis, failure_id: str) -> bool:
    """Forget one failure (its count by category stays); False if there was none."""
    with conn.pipeline(transaction=True) as pipe:
        forget(pipe, failure_id)
        unlisted, deleted = pipe.execute()
    return bool(unlisted or deleted)


def purge(conn: redis.Redis, category: Category | None = None) -> int:
    """Forget every failure (or those of one category); returns how many."""
    return sum(remove(conn, failure.id) for failure in every(conn, category))


def migrate_legacy(conn: redis.Redis) -> int:
    """Move failures an earlier version kept in its own keys (``legacy_failures``) into the
    failed registry, their ids and times kept; how many."""
    moved = 0
    for old_id, fields in legacy_failures.stored(conn):
        valid_id = JOB_ID_PATTERN.fullmatch(old_id) is not None
        failure = _from_fields(old_id if valid_id else uuid.uuid4().hex[:16], fields)
        with conn.pipeline(transaction=True) as pipe:
            if failure is not None:
                file(conn, pipe, failure)
                moved += 1
            legacy_failures.forget(pipe, old_id)
            pipe.execute()
    return moved
