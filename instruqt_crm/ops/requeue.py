"""Requeue a recorded failure: put its work back where the engine takes it up again.

What that means depends on the failure's kind: an event goes back into the inbox under its
own id; a rejected contact or play record is marked for sending again; a failed flush runs
again. A delivery that is not an event cannot be requeued, only read and purged.
"""

from __future__ import annotations

import redis

from instruqt_crm.engine import inbox, ledger, plays
from instruqt_crm.engine.flush import schedule_flush
from instruqt_crm.journal import failures
from instruqt_crm.journal.failures import Kind

MEANING: dict[Kind, str] = {
    Kind.EVENT: "process the event again",
    Kind.CONTACT: "mark the contact for sending again",
    Kind.PLAY: "mark the play record for sending again (Salesforce)",
    Kind.FLUSH: "run a flush again",
    Kind.BODY: "nothing (not requeueable)",
}


class NotRequeueable(ValueError):
    """The failure is a delivery that was never an event: there is nothing to do again."""


def requeue(conn: redis.Redis, failure_id: str, flush_delay: float = 0.0) -> Kind:
    """Put a failure's work back in the queue and forget the failure; returns its kind."""
    failure = failures.get(conn, failure_id)
    if failure is None:
        raise KeyError(failure_id)
    if failure.kind == Kind.BODY:
        raise NotRequeueable(f"failure {failure_id}: the payload is not an event, cannot requeue")
    if failure.kind == Kind.EVENT:
        with conn.pipeline(transaction=True) as pipe:
            inbox.add(pipe, failure.message_id, failure.body())
            failures.forget(pipe, failure.id)
            pipe.execute()
        inbox.wake(conn)
        return failure.kind
    if failure.kind == Kind.CONTACT:
        ledger.mark_dirty(conn, [failure.message_id])
    elif failure.kind == Kind.PLAY:
        plays.mark_dirty(conn, failure.body()["participant_id"])
    failures.remove(conn, failure.id)
    schedule_flush(conn, flush_delay)
    return failure.kind
