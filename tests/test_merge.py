"""Merge policies: semantics of each, and the semilattice laws that make order irrelevant."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instruqt_crm.events import format_timestamp
from instruqt_crm.mapping import PropertyChange, cell_value, fold, merge_cells, to_cell
from instruqt_crm.mapping.merge import POLICIES, canonical_policy

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    """T0 plus some minutes."""
    return T0 + timedelta(minutes=minutes)


def merged(policy: str, *pairs: tuple[Any, datetime], value_type: str = "string") -> Any:
    """The value sent to the CRM after merging (value, timestamp) changes in the given order."""
    cells = [to_cell(PropertyChange("p", policy, v, t)) for v, t in pairs]
    return cell_value(policy, fold(policy, cells), value_type)


def same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Equal as stored JSON (so True and 1 are different)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_latest_is_by_event_time_not_arrival() -> None:
    assert merged("latest", ("new", at(10)), ("old", at(1))) == "new"
    assert merged("latest", ("old", at(1)), ("new", at(10))) == "new"


def test_first_and_set_once_keep_the_earliest() -> None:
    for policy in ("first", "set_once"):
        assert merged(policy, ("later", at(5)), ("earliest", at(1)), ("last", at(9))) == "earliest"
    assert canonical_policy("set_once") == "first"
    assert to_cell(PropertyChange("p", "set_once", "x", T0))["p"] == "first"


def test_ties_on_time_break_on_value() -> None:
    assert merged("latest", ("b", T0), ("a", T0)) == merged("latest", ("a", T0), ("b", T0)) == "b"
    assert merged("first", ("b", T0), ("a", T0)) == "a"


def test_min_max_compare_numbers_numerically() -> None:
    assert merged("max", (9, at(0)), (10, at(1)), (2.5, at(2)), value_type="number") == 10
    assert merged("min", (9, at(0)), (10, at(1)), (2.5, at(2)), value_type="number") == 2.5


def test_min_max_compare_datetimes_and_dates_chronologically() -> None:
    times = [format_timestamp(at(m)) for m in (30, -600, 5)]
    pairs = [(t, at(i)) for i, t in enumerate(times)]
    assert merged("min", *pairs, value_type="datetime") == format_timestamp(at(-600))
    assert merged("max", *pairs, value_type="datetime") == format_timestamp(at(30))
    days = [("2024-12-01", T0), ("2023-01-31", T0), ("2024-02-29", T0)]
    assert merged("max", *days, value_type="date") == "2024-12-01"


def test_min_max_compare_strings_lexicographically() -> None:
    assert merged("max", ("apple", T0), ("banana", T0), ("Cherry", T0)) == "banana"
    assert merged("min", ("apple", T0), ("banana", T0), ("Cherry", T0)) == "Cherry"


def test_union_is_sorted_distinct_and_joined() -> None:
    pairs = [("k8s", at(3)), ("docker", at(1)), ("k8s", at(2)), ("ansible", at(9))]
    assert merged("union", *pairs) == "ansible;docker;k8s"


def test_count_counts_distinct_values() -> None:
    pairs = [("t/c1", at(1)), ("t/c2", at(2)), ("t/c1", at(3))]
    assert merged("count", *pairs, value_type="number") == 2
    assert merged("count", *pairs, value_type="string") == "2"


def test_cell_value_of_nothing_is_none() -> None:
    for policy in POLICIES:
        assert cell_value(policy, None, "string") is None
    assert cell_value("union", {"p": "union", "s": []}, "string") is None


def test_cell_value_converts_to_the_declared_type() -> None:
    assert cell_value("latest", to_cell(PropertyChange("p", "latest", 4, T0)), "number") == 4
    assert cell_value("latest", to_cell(PropertyChange("p", "latest", True, T0)), "bool") is True
    assert cell_value("latest", to_cell(PropertyChange("p", "latest", "x", T0)), "number") is None


def test_cells_survive_json_round_trips() -> None:
    a = to_cell(PropertyChange("p", "latest", "a", at(1)))
    b = to_cell(PropertyChange("p", "latest", "b", at(2)))
    stored = json.loads(json.dumps(merge_cells("latest", None, a)))
    assert merge_cells("latest", stored, b) == merge_cells("latest", a, b)


def test_a_cell_from_another_policy_is_replaced() -> None:
    old = to_cell(PropertyChange("p", "union", "a", T0))
    new = to_cell(PropertyChange("p", "latest", "b", T0))
    assert merge_cells("latest", old, new) == new
    assert merge_cells("latest", {"garbage": True}, new) == new


def test_malformed_incoming_cell_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a 'max' cell"):
        merge_cells("max", None, {"p": "max", "v": float("nan")})
    with pytest.raises(ValueError, match="unknown merge policy"):
        merge_cells("avg", None, {"p": "avg", "v": 1})
    with pytest.raises(ValueError):
        to_cell(PropertyChange("p", "latest", float("inf"), T0))


def test_merging_does_not_alias_inputs() -> None:
    a = to_cell(PropertyChange("p", "union", "a", T0))
    result = merge_cells("union", None, a)
    result["s"].append("zzz")
    assert a == {"p": "union", "s": ["a"]}


# ---- the semilattice laws ------------------------------------------------------------------

values = st.one_of(
    st.text(max_size=6),
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)).map(
        lambda d: format_timestamp(d.replace(tzinfo=UTC))
    ),
)
moments = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2020, 1, 2), timezones=st.just(UTC)
)
policies = st.sampled_from([*POLICIES, "set_once"])
LAWS = settings(max_examples=150, deadline=None)


def changes(policy: str, size: int = 8) -> st.SearchStrategy[list[PropertyChange]]:
    """Lists of changes to one property (few distinct timestamps and values, to force ties)."""
    pool_values = st.shared(st.lists(values, min_size=1, max_size=4), key="v")
    pool_times = st.shared(st.lists(moments, min_size=1, max_size=3), key="t")
    return st.lists(
        st.builds(
            PropertyChange,
            name=st.just("p"),
            policy=st.just(policy),
            value=st.one_of(values, pool_values.flatmap(st.sampled_from)),
            timestamp=st.one_of(moments, pool_times.flatmap(st.sampled_from)),
        ),
        min_size=1,
        max_size=size,
    )


def cells(policy: str) -> st.SearchStrategy[dict[str, Any]]:
    """Arbitrary reachable cells: folds of random changes."""
    return changes(policy, 5).map(lambda cs: fold(policy, [to_cell(c) for c in cs]) or {})


@LAWS
@given(st.data())
def test_commutative(data: st.DataObject) -> None:
    policy = data.draw(policies)
    a, b = data.draw(cells(policy)), data.draw(cells(policy))
    assert same(merge_cells(policy, a, b), merge_cells(policy, b, a))


@LAWS
@given(st.data())
def test_associative(data: st.DataObject) -> None:
    policy = data.draw(policies)
    a, b, c = (data.draw(cells(policy)) for _ in range(3))
    left = merge_cells(policy, merge_cells(policy, a, b), c)
    right = merge_cells(policy, a, merge_cells(policy, b, c))
    assert same(left, right)


@LAWS
@given(st.data())
def test_idempotent(data: st.DataObject) -> None:
    policy = data.draw(policies)
    a, b = data.draw(cells(policy)), data.draw(cells(policy))
    assert same(merge_cells(policy, a, a), a)
    ab = merge_cells(policy, a, b)
    assert same(merge_cells(policy, ab, b), ab)
    assert same(merge_cells(policy, ab, a), ab)


@LAWS
@given(st.data())
def test_any_order_and_any_repetition_fold_to_the_same_cell(data: st.DataObject) -> None:
    policy = data.draw(policies)
    history = data.draw(changes(policy, 10))
    delivered = data.draw(st.permutations(history))
    repeats = data.draw(st.lists(st.sampled_from(history), max_size=10))
    delivered = data.draw(st.permutations([*delivered, *repeats]))
    expected = fold(policy, [to_cell(c) for c in history])
    got = fold(policy, [to_cell(c) for c in delivered])
    assert same(got, expected)
    for value_type in ("string", "number", "datetime", "bool"):
        assert cell_value(policy, got, value_type) == cell_value(policy, expected, value_type)


@LAWS
@given(st.data())
def test_latest_and_first_pick_the_extreme_timestamp(data: st.DataObject) -> None:
    policy = data.draw(st.sampled_from(["latest", "first"]))
    history = data.draw(changes(policy, 10))
    result = fold(policy, [to_cell(c) for c in history])
    assert result is not None
    pick = max if policy == "latest" else min
    extreme = pick(c.timestamp for c in history)
    assert result["v"] in [c.value for c in history if c.timestamp == extreme]
