"""Requeue a recorded failure: put its work back where the engine takes it up again.

What that means depends on the failure's kind: an event goes back into the inbox under its
own id; a rejected contact or play record is marked for sending again; a failed flush runs
again. A delivery that is not an event (or a job that is not ours) cannot be requeued, only
read and purged.

Two ways in, one way of doing it (``put_back``): ``instruqt-crm failed requeue`` calls
``requeue``, which also forgets the failure; RQ's "Requeue" (the dashboard, or RQ's API)
queues the failure's own job, whose function (``jobs.requeue_failure``) puts it back.
"""

from __future__ import annotations

import redis

from instruqt_crm.journal import failures
from instruqt_crm.journal.failures import Failure, Kind

from . import inbox, ledger, plays
from .flush import schedule_flush

MEANING: dict[Kind, str] = {
    Kind.EVENT: "process the event again",
    Kind.CONTACT: "mark the contact for sending again",
    Kind.PLAY: "mark the play record for sending again (Salesforce)",
    Kind.FLUSH: "run a flush again",
    Kind.BODY: "nothing (not requeueable)",
    Kind.JOB: "nothing (not requeueable)",
}


class NotRequeueable(ValueError):
    """The failure is not work that can be done again (a delivery that was never an event)."""


def requeue(conn: redis.Redis, failure_id: str, flush_delay: float = 0.0) -> Kind:
    """Put a failure's work back in the queue and forget the failure; returns its kind."""
    failure = failures.get(conn, failure_id)
    if failure is None:
        raise KeyError(failure_id)
    return put_back(conn, failure, flush_delay, forget=True)


def put_back(
    conn: redis.Redis, failure: Failure, flush_delay: float = 0.0, forget: bool = True
) -> Kind:
    """Put a failure's work back; with ``forget``, forget the failure in the same step (its
    requeue job, being run, is no longer listed: RQ took it off the failed registry)."""
    if failure.kind in (Kind.BODY, Kind.JOB):
        what = "the payload is not an event" if failure.kind == Kind.BODY else "not our job"
        raise NotRequeueable(
            f"failure {failure.id}: {what}, cannot requeue (failed: {failure.reason})"
        )
    if failure.kind == Kind.EVENT:
        with conn.pipeline(transaction=True) as pipe:
            inbox.add(pipe, failure.message_id, failure.body())
            if forget:
                failures.forget(pipe, failure.id)
            pipe.execute()
        inbox.wake(conn)
        return failure.kind
    if failure.kind == Kind.CONTACT:
        ledger.mark_dirty(conn, [failure.message_id])
    elif failure.kind == Kind.PLAY:
        plays.mark_dirty(conn, failure.body()["participant_id"])
    if forget:
        failures.remove(conn, failure.id)
    schedule_flush(conn, flush_delay)
    return failure.kind
