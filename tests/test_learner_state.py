"""The packed learner state: round trips, size, and what the ledger keeps of it in Redis."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from instruqt_crm import keys
from instruqt_crm.engine import ledger, plays
from instruqt_crm.engine.learner_state import (
    CorruptState,
    LearnerState,
    fingerprint,
    pack,
    schema_id,
    unpack,
)
from instruqt_crm.engine.records import Merge
from instruqt_crm.mapping import PropertyChange, load_mapping

MAPPING = load_mapping(Path("mappings/hubspot.yaml"))
NAMES = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
SCALARS = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ).map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"),
)
CELLS = st.one_of(
    st.builds(
        lambda p, t, v: {"p": p, "t": t, "v": v},
        st.sampled_from(["latest", "first"]),
        st.integers(-1, 2**53),
        SCALARS,
    ),
    st.builds(lambda p, v: {"p": p, "v": v}, st.sampled_from(["min", "max"]), SCALARS),
    st.builds(lambda s: {"p": "union", "s": s}, st.lists(SCALARS, max_size=4)),
    st.builds(
        lambda s: {"p": "count", "s": sorted({fingerprint(v) for v in s})},
        st.lists(SCALARS, max_size=6),
    ),
)
STATES = st.builds(
    LearnerState,
    version=st.integers(0, 10**9),
    email=st.none() | st.emails(),
    user_id=st.none() | st.text(max_size=30),
    first_name=st.none() | st.text(max_size=10),
    last_name=st.none() | st.text(max_size=10),
    cells=st.dictionaries(NAMES, CELLS, max_size=8),
    unsent=st.sets(NAMES, max_size=4),
    bases=st.dictionaries(NAMES, st.integers(0, 10**6), max_size=2),
    needs_read=st.booleans(),
)


@given(STATES)
def test_a_state_reads_back_as_it_was_written(state: LearnerState) -> None:
    blob, names = pack(state)
    assert unpack(blob, names) == state


@given(st.binary(max_size=64))
def test_anything_else_is_refused_as_corrupt(blob: bytes) -> None:
    with pytest.raises(CorruptState):
        unpack(blob, ["a", "b"])


def test_a_typical_learner_packs_into_a_few_hundred_bytes() -> None:
    stamp = "2026-11-08T22:58:42.249Z"
    state = LearnerState(
        version=8,
        user_id="kwp8ufhg3yrz",
        cells={
            "instruqt_user_id": {"p": "first", "t": 1794178722249861, "v": "kwp8ufhg3yrz"},
            "instruqt_first_activity_at": {"p": "min", "v": stamp},
            "instruqt_last_activity_at": {"p": "max", "v": stamp},
            "instruqt_last_track": {"p": "latest", "t": 1794562947926294, "v": "consul-mesh"},
            "instruqt_tracks_started": {"p": "union", "s": ["consul-mesh", "vault-basics"]},
            "instruqt_tracks_completed": {"p": "union", "s": ["vault-basics"]},
            "instruqt_tracks_completed_count": {"p": "count", "s": [fingerprint("vault")]},
            "instruqt_challenges_completed_count": {
                "p": "count",
                "s": sorted(fingerprint(f"t/ch{n}") for n in range(4)),
            },
        },
        needs_read=False,
    )
    blob, names = pack(state)
    assert len(blob) < 220, len(blob)  # the JSON hash earlier versions kept took ~1,500 bytes
    assert len(json.dumps(names)) > len(blob) / 2  # names are kept once, not per learner


def change(name: str, policy: str, value: object, day: int = 1) -> PropertyChange:
    return PropertyChange(name, policy, value, datetime(2026, 11, day, tzinfo=UTC))  # type: ignore[arg-type]


def test_merges_write_one_packed_key_that_lives_idle_seconds(redis_conn: redis.Redis) -> None:
    changes = [change("instruqt_last_track", "latest", "intro")]
    assert ledger.merge(redis_conn, "a@x.co", changes, "m1", "a@x.co", "u1", idle_seconds=500)
    assert redis_conn.ttl(keys.learner("a@x.co")) == -1  # dirty: kept until sent
    sent = {"instruqt_last_track": "intro"}
    assert ledger.settle(redis_conn, "a@x.co", "1", sent, MAPPING, idle_seconds=500)
    assert 490 < redis_conn.ttl(keys.learner("a@x.co")) <= 500
    assert redis_conn.type(keys.learner("a@x.co")) == b"string"
    assert not redis_conn.exists(keys.contact("a@x.co"))
    later = [change("instruqt_last_track", "latest", "later", day=2)]
    redis_conn.expire(keys.learner("a@x.co"), 10)
    assert ledger.merge(redis_conn, "a@x.co", later, "m2", "a@x.co", idle_seconds=500)
    assert ledger.settle(redis_conn, "a@x.co", "2", {}, MAPPING, idle_seconds=500)
    assert redis_conn.ttl(keys.learner("a@x.co")) == -1  # "later" not accepted: kept
    sent = {"instruqt_last_track": "later"}
    assert ledger.settle(redis_conn, "a@x.co", "2", sent, MAPPING, idle_seconds=500)
    assert redis_conn.ttl(keys.learner("a@x.co")) > 490  # each write renews it
    assert not redis_conn.exists(keys.contact_events("a@x.co"))  # which events: the trail
    schemas = list(redis_conn.scan_iter(f"{keys.PREFIX}schema:*"))
    assert len(schemas) == 1 and redis_conn.ttl(schemas[0]) == -1  # kept: states refer to it


def test_state_written_by_an_earlier_version_is_read_then_replaced(
    redis_conn: redis.Redis,
) -> None:
    """One hash per contact with JSON cells and the values last sent (before the packed
    state): read as it is, what differs from the value sent is unsent, and the next write
    replaces the hash with the packed state."""
    cell = {"p": "union", "s": ["a", "b"]}
    count = {"p": "count", "s": ["t/ch0", "t/ch1"]}
    redis_conn.hset(
        keys.contact("old@x.co"),
        mapping={
            "c:instruqt_tracks_started": json.dumps(cell),
            "s:instruqt_tracks_started": json.dumps("a"),  # b arrived after the last send
            "c:instruqt_challenges_completed_count": json.dumps(count),
            "s:instruqt_challenges_completed_count": "2",
            "email": "old@x.co",
            "user_id": "u9",
            "version": "7",
        },
    )
    redis_conn.zadd(keys.DIRTY_CONTACTS, {"old@x.co": 1})
    found = ledger.pending(redis_conn, "old@x.co", MAPPING)
    assert found.change is not None and not found.needs_read
    assert found.change.properties == {"instruqt_tracks_started": "a;b"}
    more = [change("instruqt_challenges_completed_count", "count", "t/ch1")]  # seen before
    more.append(change("instruqt_challenges_completed_count", "count", "t/ch2"))
    assert ledger.merge(redis_conn, "old@x.co", more, "m3", "old@x.co")
    assert not redis_conn.exists(keys.contact("old@x.co"))
    after = ledger.pending(redis_conn, "old@x.co", MAPPING).change
    assert after is not None and after.properties == {
        "instruqt_tracks_started": "a;b",
        "instruqt_challenges_completed_count": 3,
    }
    assert ledger.state(redis_conn, "old@x.co").version == 8


def test_a_schema_id_names_its_names() -> None:
    assert schema_id(["a", "b"]) != schema_id(["a", "c"]) != schema_id(["ab"])
    assert len(schema_id(["a"])) == 8


def test_a_play_carries_no_ttl_while_dirty_and_idle_seconds_once_sent(
    redis_conn: redis.Redis,
) -> None:
    merge = Merge("p1", [change("started_at", "min", "2026-11-01T00:00:00.000Z")], "m1", "a@x.co")
    assert plays.merge_many(redis_conn, [merge], idle_seconds=500) == [True]
    assert redis_conn.ttl(keys.play("p1")) == -1  # dirty: kept until sent
    assert plays.settle(redis_conn, "p1", "1", {"started_at": "x"}, idle_seconds=500)
    assert 490 < redis_conn.ttl(keys.play("p1")) <= 500
    again = Merge("p1", [change("last_at", "max", "2026-11-02T00:00:00.000Z")], "m2", "a@x.co")
    assert plays.merge_many(redis_conn, [again], idle_seconds=500) == [True]
    assert redis_conn.ttl(keys.play("p1")) == -1


def test_migrate_rewrites_every_earlier_hash_in_the_packed_form(redis_conn: redis.Redis) -> None:
    for email in ("one@x.co", "o'brien+x@x.co", "has:colon@x.co"):
        cell = {"p": "max", "v": "2026-11-01T00:00:00.000Z"}
        fields = {"c:instruqt_last_activity_at": json.dumps(cell), "email": email, "version": "3"}
        fields["s:instruqt_last_activity_at"] = json.dumps(cell["v"])
        redis_conn.hset(keys.contact(email), mapping=fields)
        redis_conn.sadd(keys.contact_events(email), "msg_old")  # kept without a TTL then
    assert ledger.migrate(redis_conn, idle_seconds=500) == 3
    for email in ("one@x.co", "o'brien+x@x.co", "has:colon@x.co"):
        assert not redis_conn.exists(keys.contact(email), keys.contact_events(email))
        state = ledger.state(redis_conn, email)
        assert state.version == 3 and not state.unsent and state.email == email
        assert 490 < redis_conn.ttl(keys.learner(email)) <= 500
    assert ledger.migrate(redis_conn) == 0


def test_what_an_old_worker_merges_after_the_conversion_is_not_lost(
    redis_conn: redis.Redis,
) -> None:
    """While old and new workers overlap during a deploy, an old worker writes its hash next
    to the packed record: the next read folds it in and the next write removes it."""
    started = [change("instruqt_tracks_started", "union", "a")]
    ledger.merge(redis_conn, "o@x.co", started, "m1", "o@x.co")
    ledger.settle(redis_conn, "o@x.co", "1", {"instruqt_tracks_started": "a"}, MAPPING)
    old = {"c:instruqt_tracks_started": json.dumps({"p": "union", "s": ["b"]}), "version": "1"}
    redis_conn.hset(keys.contact("o@x.co"), mapping=old)  # what the old worker wrote
    found = ledger.pending(redis_conn, "o@x.co", MAPPING).change
    assert found is not None and found.properties == {"instruqt_tracks_started": "a;b"}
    more = [change("instruqt_tracks_started", "union", "c")]
    assert ledger.merge(redis_conn, "o@x.co", more, "m3", "o@x.co")
    assert not redis_conn.exists(keys.contact("o@x.co"))
    after = ledger.pending(redis_conn, "o@x.co", MAPPING).change
    assert after is not None and after.properties == {"instruqt_tracks_started": "a;b;c"}


def test_a_state_that_cannot_be_read_starts_over_without_stopping_anyone(
    redis_conn: redis.Redis,
) -> None:
    for email in ("lost@x.co", "fine@x.co"):
        ledger.merge(redis_conn, email, [change("instruqt_last_track", "latest", "t")], "m", email)
    redis_conn.set(keys.learner("lost@x.co"), b"\x93not a state")
    found = ledger.pending_many(redis_conn, ["lost@x.co", "fine@x.co"], MAPPING)
    assert found[0].change is None and found[0].needs_read  # from the CRM again
    assert found[1].change is not None
    assert ledger.merge(
        redis_conn, "lost@x.co", [change("instruqt_last_track", "latest", "u")], "m2", "lost@x.co"
    )
    assert ledger.state(redis_conn, "lost@x.co").cells["instruqt_last_track"]["v"] == "u"


def test_rejected_or_requeued_values_are_never_given_a_ttl(redis_conn: redis.Redis) -> None:
    ledger.merge(
        redis_conn, "r@x.co", [change("instruqt_last_track", "latest", "t")], "m", "r@x.co"
    )
    assert ledger.settle(redis_conn, "r@x.co", "1", None, MAPPING, idle_seconds=500)  # rejected
    assert ledger.dirty(redis_conn, 10) == [] and redis_conn.ttl(keys.learner("r@x.co")) == -1
    ledger.settle(redis_conn, "r@x.co", "1", {"instruqt_last_track": "t"}, MAPPING, 500)
    assert redis_conn.ttl(keys.learner("r@x.co")) > 0
    ledger.mark_dirty(redis_conn, ["r@x.co"])  # requeued: kept until sent again
    assert redis_conn.ttl(keys.learner("r@x.co")) == -1


def test_a_schema_id_naming_other_names_is_refused_before_anything_is_written(
    redis_conn: redis.Redis,
) -> None:
    names = ["instruqt_last_track"]
    redis_conn.set(keys.state_schema(schema_id(names)), json.dumps(["something_else"]))
    with pytest.raises(redis.ResponseError, match="schema id collision"):
        ledger.merge(redis_conn, "c@x.co", [change(names[0], "latest", "t")], "m", "c@x.co")
    assert not redis_conn.exists(keys.learner("c@x.co"))
