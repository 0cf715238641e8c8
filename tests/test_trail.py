"""Learners' trails: bounded in entries, bytes and days; compact; earlier entries readable."""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.journal import trail, trail_format
from samples.history import deliveries, history
from tests.engine_helpers import drain, engine_runtime, enqueue_all, installed

EMAIL = "ada@example.com"
CHANGES = {
    "instruqt_user_id": "user00042",
    "instruqt_first_activity_at": "2026-11-07T09:48:57.345Z",
    "instruqt_last_activity_at": "2026-11-07T09:48:57.345Z",
    "instruqt_last_track": "terraform-101",
    "instruqt_challenges_completed_count": "terraform-101/ch2",
}


@pytest.fixture
def bounded() -> Iterator[trail.Limits]:
    """Trails bounded to 5 entries, 1,000 bytes and one day for the test."""
    limits = trail.Limits(entries=5, bytes=1000, seconds=86400)
    trail.configure(limits)
    yield limits
    trail.configure(None)


def event(number: int, **extra: object) -> dict[str, object]:
    """The details of an event entry as the engine writes them."""
    return {
        "event_id": f"msg_{number:08d}",
        "type": "track.challenge_attempted",
        "timestamp": "2026-11-07T09:48:57.34525854Z",
        "changed": True,
        "changes": CHANGES,
        **extra,
    }


def noise(seed: int, size: int) -> str:
    """Text that deflate cannot shrink much (hex of random bytes): ``size`` bytes' worth."""
    return random.Random(seed).randbytes(size).hex()


def stored(conn: redis.Redis, email: str = EMAIL) -> list[bytes]:
    return list(conn.lrange(keys.trail(email), 0, -1))


def test_the_newest_entries_are_kept_up_to_the_entry_cap(
    redis_conn: redis.Redis, bounded: trail.Limits
) -> None:
    for number in range(12):
        trail.note(redis_conn, EMAIL, "event", **event(number))
    kept = trail.entries(redis_conn, EMAIL)
    assert [e["event_id"] for e in kept] == [f"msg_{n:08d}" for n in range(7, 12)]


def test_the_byte_cap_drops_the_oldest_and_keeps_the_newest_however_large(
    redis_conn: redis.Redis, bounded: trail.Limits
) -> None:
    for number in range(4):
        trail.note(redis_conn, EMAIL, "failed", reason=f"reason {number} " + noise(number, 300))
    sizes = [len(item) for item in stored(redis_conn)]
    assert sum(sizes) <= bounded.bytes and len(sizes) < 4
    assert trail.entries(redis_conn, EMAIL)[-1]["reason"].startswith("reason 3 ")

    huge = noise(99, 2000)  # stored, it is larger than the cap on its own
    trail.note(redis_conn, EMAIL, "failed", reason=huge)
    assert len(stored(redis_conn)) == 1  # alone, over the cap: the newest is always kept
    assert trail.entries(redis_conn, EMAIL)[0]["reason"] == huge
    trail.note(redis_conn, EMAIL, "retry", reason="later")
    assert [e["kind"] for e in trail.entries(redis_conn, EMAIL)] == ["retry"]


def test_the_trail_expires_after_the_retention(
    redis_conn: redis.Redis, bounded: trail.Limits
) -> None:
    trail.note(redis_conn, EMAIL, "event", **event(1))
    assert bounded.seconds - 60 < redis_conn.ttl(keys.trail(EMAIL)) <= bounded.seconds


def test_limits_come_from_the_settings_the_worker_runs_with(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """Events through real RQ jobs: the runtime's TRACE_* settings bound what they write."""
    run = engine_runtime(
        redis_url,
        tmp_path,
        TRACE_MAX_ENTRIES="3",
        TRACE_MAX_BYTES="512",
        TRACE_RETENTION_DAYS="0.5",
    )
    events = [e for e in history(2, seed=5) if e["user_id"] == "user00000"]
    assert len(events) > 3
    with installed(run):
        enqueue_all(redis_conn, deliveries(events, seed=1))
        drain(redis_conn)
    raw = stored(redis_conn, "learner00000@example.com")
    assert 1 <= len(raw) <= 3 and (len(raw) == 1 or sum(map(len, raw)) <= 512)
    assert 43_140 < redis_conn.ttl(keys.trail("learner00000@example.com")) <= 43_200
    assert trail.limits() == trail.Limits.from_settings(Settings.from_env({}))  # uninstalled


def test_an_event_entry_is_stored_in_a_quarter_of_its_json(redis_conn: redis.Redis) -> None:
    details = event(7)
    trail.note(redis_conn, EMAIL, "event", **details)
    (raw,) = stored(redis_conn)
    plain = json.dumps({"at": 1796669746.1975815, "kind": "event", **details}, sort_keys=True)
    assert len(raw) * 4 <= len(plain)
    (entry,) = trail.entries(redis_conn, EMAIL)
    assert entry == {"at": entry["at"], "kind": "event", **details}
    assert isinstance(entry["at"], int)


def test_every_kind_reads_back_with_its_full_names() -> None:
    samples = [
        {"at": 1796669747, "kind": "sent", "properties": CHANGES, "record_id": "1201"},
        {"at": 1796669747, "kind": "rejected", "properties": CHANGES, "reason": "INVALID_EMAIL"},
        {"at": 1796669747, "kind": "skipped", "event_id": "msg_1", "reason": "developer_play"},
        {"at": 1796669747, "kind": "identity", "reason": "the parameter email is not Instruqt's"},
        {"at": 1796669747, "kind": "a-kind-of-tomorrow", "extra": [1, "two"]},
    ]
    for entry in samples:
        assert trail_format.decode(trail_format.encode(entry)) == entry
    empty = {"at": 1796669747.9, "kind": "sent", "reason": "", "record_id": None}
    assert trail_format.decode(trail_format.encode(empty)) == {"at": 1796669747, "kind": "sent"}
    with pytest.raises(ValueError, match="would read back as 'reason'"):
        trail_format.encode({"at": 1, "kind": "sent", "r": "ambiguous"})


def test_entries_written_as_json_by_earlier_versions_stay_readable(
    redis_conn: redis.Redis,
) -> None:
    """As the previous version wrote them: sorted JSON with full names, float times."""
    earlier = {
        "at": 1796669746.7821567,
        "changed": True,
        "changes": CHANGES,
        "event_id": "msg_00000494",
        "kind": "event",
        "timestamp": "2026-11-07T09:48:57.34525854Z",
        "type": "track.challenge_attempted",
    }
    redis_conn.lpush(keys.trail(EMAIL), json.dumps(earlier, sort_keys=True, default=str))
    trail.note(redis_conn, EMAIL, "sent", properties={"instruqt_last_track": "terraform-101"})
    old, new = trail.entries(redis_conn, EMAIL)
    assert old == earlier
    assert new["kind"] == "sent" and new["properties"] == {"instruqt_last_track": "terraform-101"}
    lines = [trail.describe(entry) for entry in (old, new)]
    assert "track.challenge_attempted msg_00000494 (changed)" in lines[0]
    assert "instruqt_last_track=terraform-101" in lines[0]
    assert '{"instruqt_last_track": "terraform-101"}' in lines[1]


def test_an_entry_that_is_not_ours_reads_as_unreadable(redis_conn: redis.Redis) -> None:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=trail_format.ZDICT_1)
    bomb = trail_format.FORMAT_1 + deflater.compress(b" " * (4 << 20)) + deflater.flush()
    for raw in (b"\x07garbage", b"\x01not deflate", b"[1, 2]", bomb):
        redis_conn.rpush(keys.trail(EMAIL), raw)
    found = trail.entries(redis_conn, EMAIL)
    assert [e["kind"] for e in found] == ["unreadable"] * 4
    assert "too large" in found[0]["reason"]  # the bomb (oldest first) is not inflated whole
    assert all(trail.describe(entry) for entry in found)
