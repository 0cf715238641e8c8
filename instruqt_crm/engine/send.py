"""One batch of changes through a CRM adapter, and the tally of what came of a flush.

``send`` upserts a batch; when the CRM refuses the whole batch because of some records in it,
those records are set aside (or, when the answer names none, the batch is split in halves)
and the others are sent again, so one bad record never fails its batch-mates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from instruqt_crm.crm.base import ContactChange, CrmAdapter, Outcome
from instruqt_crm.errors import BatchRejected


@dataclass(frozen=True)
class Sent:
    """The outcome of every change in a batch, and how many requests it took."""

    outcomes: list[Outcome]
    requests: int


@dataclass(frozen=True)
class Tally:
    """What a flush (or one batch of it) did with the records it read."""

    synced: int = 0
    rejected: int = 0
    retry: int = 0
    unchanged: int = 0
    waiting: int = 0  # play records whose learner was not written yet
    requests: int = 0

    def __add__(self, other: Tally) -> Tally:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return Tally(*(a + b for a, b in pairs))


def send(adapter: CrmAdapter, changes: Sequence[ContactChange]) -> Sent:
    """Upsert a batch; records the CRM names in a whole-batch refusal are rejected alone."""
    try:
        return Sent(adapter.upsert(changes), 1)
    except BatchRejected as exc:
        named = [c for c in changes if c.key in exc.culprits]
        if named:
            rest = [c for c in changes if c.key not in exc.culprits]
            rejected = [Outcome(c.key, "rejected", exc.reason, exc.category) for c in named]
            return _joined(Sent(rejected, 1), send(adapter, rest) if rest else Sent([], 0))
        if len(changes) == 1:
            return Sent([Outcome(changes[0].key, "rejected", exc.reason, exc.category)], 1)
        middle = len(changes) // 2
        halves = _joined(send(adapter, changes[:middle]), send(adapter, changes[middle:]))
        return _joined(Sent([], 1), halves)


def _joined(first: Sent, second: Sent) -> Sent:
    """Two sends as one."""
    return Sent(first.outcomes + second.outcomes, first.requests + second.requests)
