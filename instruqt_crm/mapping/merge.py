"""Merge policies as a semilattice join over JSON-serialisable cells (order- and repeat-proof).

A *cell* is what the ledger stores for one property of one contact:

- ``latest`` / ``first``: ``{"p", "t": epoch microseconds, "v": value}``; the greatest / least
  ``(t, canonical JSON of v)`` wins, so a late, older event never overwrites a newer one.
- ``min`` / ``max``: ``{"p", "v": value}``; compared by value (numbers numerically, normalised
  datetimes and dates chronologically, strings lexicographically).
- ``union`` / ``count``: ``{"p", "s": [distinct values, sorted]}``; sent as the sorted
  ``;``-joined values, or as how many there are.

``merge_cells`` is commutative, associative and idempotent, so the merged cell (and what the
CRM receives) depends only on the set of events, never on their order or repetition.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from .values import PropertyChange, Value, fit, value_text

POLICIES: tuple[str, ...] = ("latest", "first", "min", "max", "union", "count")
ALIASES: dict[str, str] = {"set_once": "first"}
MERGE_POLICIES: tuple[str, ...] = ("latest", "first", "set_once", "min", "max", "union", "count")
Cell = dict[str, Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def canonical_policy(policy: str) -> str:
    """The policy's canonical name (``set_once`` is ``first``); ValueError if unknown."""
    name = ALIASES.get(policy, policy)
    if name not in POLICIES:
        raise ValueError(f"unknown merge policy {policy!r}")
    return name


def _canon(value: Value) -> str:
    """The canonical JSON text of a value: the final tie-break."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _order(value: Value) -> tuple[int, Any, str]:
    """A total order over values: bools, then numbers, then strings; canonical JSON breaks ties."""
    if isinstance(value, bool):
        return (0, int(value), _canon(value))
    if isinstance(value, int | float):
        return (1, value, _canon(value))
    return (2, value, _canon(value))


def _is_value(value: Any) -> bool:
    """Whether ``value`` is a storable scalar (finite numbers only)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str | int | bool)


def _micros(moment: datetime) -> int:
    """Microseconds since 1970 (UTC)."""
    return (moment.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)


def _sorted_set(values: Iterable[Value]) -> list[Value]:
    """Distinct values in their total order."""
    unique = {_canon(v): v for v in values}
    return sorted(unique.values(), key=_order)


def _normalise(policy: str, cell: Any) -> Cell | None:
    """A fresh, well-formed copy of ``cell`` for ``policy``, or None if it does not fit."""
    if not isinstance(cell, dict) or cell.get("p") != policy:
        return None
    if policy in ("latest", "first"):
        stamp, value = cell.get("t"), cell.get("v")
        if isinstance(stamp, bool) or not isinstance(stamp, int) or not _is_value(value):
            return None
        return {"p": policy, "t": stamp, "v": value}
    if policy in ("min", "max"):
        value = cell.get("v")
        return {"p": policy, "v": value} if _is_value(value) else None
    items = cell.get("s")
    if not isinstance(items, list) or not all(_is_value(v) for v in items):
        return None
    return {"p": policy, "s": _sorted_set(items)}


def to_cell(change: PropertyChange) -> Cell:
    """The cell holding just this one change."""
    policy = canonical_policy(change.policy)
    if not _is_value(change.value):
        raise ValueError(f"{change.name}: cannot store {change.value!r}")
    if policy in ("latest", "first"):
        return {"p": policy, "t": _micros(change.timestamp), "v": change.value}
    if policy in ("min", "max"):
        return {"p": policy, "v": change.value}
    return {"p": policy, "s": [change.value]}


def merge_cells(policy: str, current: Cell | None, incoming: Cell) -> Cell:
    """Join two cells; a ``current`` cell from another policy (mapping changed) is dropped."""
    policy = canonical_policy(policy)
    new = _normalise(policy, incoming)
    if new is None:
        raise ValueError(f"not a {policy!r} cell: {incoming!r}")
    old = _normalise(policy, current)
    if old is None:
        return new
    if policy in ("latest", "first"):
        pick = max if policy == "latest" else min
        return pick(old, new, key=lambda c: (c["t"], _canon(c["v"])))
    if policy in ("min", "max"):
        pick = max if policy == "max" else min
        return pick(old, new, key=lambda c: _order(c["v"]))
    return {"p": policy, "s": _sorted_set([*old["s"], *new["s"]])}


def fold(policy: str, cells: Iterable[Cell]) -> Cell | None:
    """Join any number of cells (None for none)."""
    result: Cell | None = None
    for cell in cells:
        result = merge_cells(policy, result, cell)
    return result


def cell_value(policy: str, cell: Cell | None, value_type: str) -> Value | None:
    """The value to send to the CRM for a cell, as ``value_type`` (None: nothing to send)."""
    policy = canonical_policy(policy)
    normal = _normalise(policy, cell)
    if normal is None:
        return None
    if policy == "union":
        return (
            fit(";".join(value_text(v) for v in normal["s"]), value_type) if normal["s"] else None
        )
    if policy == "count":
        return fit(len(normal["s"]), value_type)
    return fit(normal["v"], value_type)


_RESTARTED = {  # what a property's value becomes, once stored values were dropped
    "latest": "the value of the newest event merged after the change",
    "first": "the value of the oldest event merged after the change",
    "min": "the smallest value merged after the change",
    "max": "the largest value merged after the change",
    "union": "the list of the values merged after the change only",
    "count": "the count of the values merged after the change only",
}


def change_effect(before: tuple[str, str], after: tuple[str, str]) -> str | None:
    """What happens to a property's stored values when its (merge policy, type) changes from
    ``before`` to ``after``, in a sentence; None when nothing happens to them."""
    (old_policy, old_type), (new_policy, new_type) = before, after
    if canonical_policy(old_policy) != canonical_policy(new_policy):
        return (
            f"its merge changes from {old_policy!r} to {new_policy!r}: values stored under "
            f"{old_policy!r} are dropped, not converted. Each contact keeps its CRM value "
            f"until an event writes the property again; that sends "
            f"{_RESTARTED[canonical_policy(new_policy)]} (earlier events no longer count)"
        )
    if old_type != new_type:
        return (
            f"its type changes from {old_type} to {new_type}: stored values are read as "
            f"{new_type} and sent with each contact's next change; a value that is not a "
            f"{new_type} is not sent (the CRM keeps what it has until an event writes one)"
        )
    return None
