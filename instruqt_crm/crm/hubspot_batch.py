"""One HubSpot batch upsert: its inputs, each with a trace id, and what the answer says of each.

HubSpot names a failed input of a 207 by the ``objectWriteTraceId`` the client put on it
(``errors[].context.objectWriteTraceId``); an error may name no input at all, and an input
may, rarely, be in neither ``results`` nor ``errors``. So an input counts as written only
when a result is its own: the result carries the input's trace id, or (when results carry
none) the value of the property the batch is keyed on. Results come in any order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hubspot.crm.contacts import (
    BatchInputSimplePublicObjectBatchInputUpsert,
    SimplePublicObjectBatchInputUpsert,
)

from instruqt_crm.errors import Category

from .base import ContactChange, Outcome


@dataclass(frozen=True)
class Entry:
    """One input of a batch: the change, the id value it is upserted on, its trace id."""

    change: ContactChange
    record_id: str
    trace: str


@dataclass(frozen=True)
class Answer:
    """What one answer says: outcomes for the inputs it names, the inputs it does not, and
    the errors it attributes to no input (their text, for the reason)."""

    outcomes: list[Outcome]
    missing: list[Entry]
    unattributed: list[str]

    def missing_reason(self, sends: int) -> str:
        """Why an input still missing after ``sends`` requests is rejected: the answer's words."""
        said = "; ".join(self.unattributed) or "none"
        return (
            f"HubSpot's answer named this contact in neither results nor errors ({sends} "
            f"requests); its errors naming no contact: {said}"
        )


def same_id(value: str, id_property: str) -> str:
    """An id value as HubSpot compares it (emails ignore case and outer spaces)."""
    return value.strip().lower() if id_property == "email" else value


def entries(keyed: Sequence[tuple[ContactChange, str]]) -> list[Entry]:
    """The batch's inputs, traced by their position in this request (never the email)."""
    return [Entry(change, record_id, str(n)) for n, (change, record_id) in enumerate(keyed)]


def request(
    batch: Sequence[Entry], id_property: str, values: Callable[[ContactChange], dict[str, str]]
) -> BatchInputSimplePublicObjectBatchInputUpsert:
    """The SDK's request body; ``values``: an input's properties as HubSpot wants them."""
    inputs = [
        SimplePublicObjectBatchInputUpsert(
            id=entry.record_id,
            id_property=id_property,
            object_write_trace_id=entry.trace,
            properties=values(entry.change),
        )
        for entry in batch
    ]
    return BatchInputSimplePublicObjectBatchInputUpsert(inputs=inputs)


def _reason(error: dict[str, Any]) -> str:
    """``CATEGORY: message`` of one error."""
    return f"{error.get('category', '')}: {error.get('message', '')}".strip(": ")


def _traces(error: dict[str, Any]) -> list[str]:
    """The trace ids an error names (none when its context has no ``objectWriteTraceId``)."""
    context = error.get("context")
    named = context.get("objectWriteTraceId") if isinstance(context, dict) else None
    return [str(trace) for trace in named] if isinstance(named, list) else []


def read(data: dict[str, Any], batch: Sequence[Entry], id_property: str) -> Answer:
    """Each input's fate in a 200 or 207 answer: rejected when an error names its trace id,
    synced when a result is its own, else missing (whatever else the answer holds)."""
    by_trace = {entry.trace: entry for entry in batch}
    rejected: dict[str, str] = {}
    unattributed: list[str] = []
    for error in data.get("errors") or []:
        if not isinstance(error, dict):
            continue
        named = [trace for trace in _traces(error) if trace in by_trace]
        for trace in named:
            rejected.setdefault(trace, _reason(error))
        if not named:
            unattributed.append(_reason(error) or "an error without a message")
    written = _written(data.get("results") or [], batch, id_property)
    outcomes, missing = [], []
    for entry in batch:
        if entry.trace in rejected:
            reason = rejected[entry.trace]
            outcomes.append(Outcome(entry.change.key, "rejected", reason, Category.VALIDATION))
        elif entry.trace in written:
            outcomes.append(Outcome(entry.change.key, "synced", record_id=written[entry.trace]))
        else:
            missing.append(entry)
    return Answer(outcomes, missing, unattributed)


def _written(results: list[Any], batch: Sequence[Entry], id_property: str) -> dict[str, str | None]:
    """HubSpot's record ids, by the trace id of the input each result belongs to."""
    by_trace = {entry.trace: entry for entry in batch}
    by_value = {same_id(entry.record_id, id_property): entry.trace for entry in batch}
    written: dict[str, str | None] = {}
    for result in results:
        if not isinstance(result, dict):
            continue
        trace: str | None = str(result.get("objectWriteTraceId") or "")
        if trace not in by_trace:  # no trace id (or not one of ours): the upsert key's value
            value = (result.get("properties") or {}).get(id_property)
            trace = by_value.get(same_id(str(value), id_property)) if value else None
        if trace is not None:
            written[trace] = str(result["id"]) if result.get("id") else None
    return written


def culprits(answer: str, by_id: dict[str, ContactChange]) -> frozenset[str]:
    """Keys of the changes a whole-batch 400 names: by their id (email) or a property they set."""
    named = set()
    for record_id, change in by_id.items():
        words = [record_id, *change.properties]
        if any(re.search(rf"(?<![\w.@-]){re.escape(w)}(?![\w.@-])", answer) for w in words):
            named.add(change.key)
    return frozenset(named)
