"""A learner's ledger state, packed small: one msgpack string per learner.

What is kept per learner (merged cells, which values the CRM has not accepted yet, the
learner's email, user id and name) stays in Redis for as long as the learner is active, so it
is packed for size:

- property names are not repeated in every learner's state: the state names a *schema* (the
  sorted names of the properties it holds, stored once in Redis under an 8-byte content hash)
  and its cells follow the schema's order;
- a cell is ``[policy code, payload]``: ``[t, v]`` for latest/first, ``v`` for min/max, the
  values for union, and for count one 8-byte fingerprint per distinct value (a count sends
  how many values there are, never the values);
- times in the normalised form (``2026-11-08T22:58:42.249Z``) travel as 8-byte integers;
- the values last sent are not kept: ``unsent`` names the properties whose value changed
  since the CRM last accepted one, which is all a flush needs to know.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack

from instruqt_crm.mapping.merge import Cell, canonical_policy

FORMAT = 1
POLICY_CODES = {"latest": 0, "first": 1, "min": 2, "max": 3, "union": 4, "count": 5}
POLICY_NAMES = {code: name for name, code in POLICY_CODES.items()}
FINGERPRINT_BYTES = 8  # one learner's distinct values never collide in practice (2**64)
SCHEMA_ID_BYTES = 8  # tens of schemas per deployment; a collision is refused (ledger._WRITE)
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_TIME_EXT = 1  # msgpack extension type: a normalised time as signed milliseconds since 1970
_BIG_EXT = 2  # msgpack extension type: an integer past 64 bits, as its decimal text
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_NEEDS_READ = 1  # flag: the CRM's current values were not read into this state yet


class CorruptState(ValueError):
    """A stored state this version cannot read."""


def fingerprint(value: Any) -> str:
    """A count value's fingerprint (hex): what the ledger keeps of it."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=FINGERPRINT_BYTES).hexdigest()


@dataclass
class LearnerState:
    """Everything the ledger keeps about one learner (one CRM record)."""

    version: int = 0
    email: str | None = None
    user_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    cells: dict[str, Cell] = field(default_factory=dict)
    unsent: set[str] = field(default_factory=set)
    bases: dict[str, int] = field(default_factory=dict)  # count policies: the CRM's count
    needs_read: bool = True  # new here: read the CRM's current values before the first send

    def copy(self) -> LearnerState:
        """A copy whose cells, unsent names and bases can change without touching this one."""
        return replace(
            self, cells=dict(self.cells), unsent=set(self.unsent), bases=dict(self.bases)
        )

    def schema(self) -> tuple[str, ...]:
        """The names this state holds anything for, sorted."""
        return tuple(sorted(set(self.cells) | self.unsent | set(self.bases)))


def schema_id(names: Sequence[str]) -> bytes:
    """The content hash naming a schema."""
    return hashlib.blake2b("\n".join(names).encode(), digest_size=SCHEMA_ID_BYTES).digest()


def _pack_value(value: Any) -> Any:
    """A value as packed: normalised times as 8-byte integers, integers msgpack cannot hold
    as text, the rest as they are."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not -(2**63) <= value < 2**64:
            return msgpack.ExtType(_BIG_EXT, str(value).encode())
        return value
    if isinstance(value, str) and _TIME.fullmatch(value):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        if _time_text(moment) == value:
            millis = (moment - _EPOCH) // _MILLISECOND
            return msgpack.ExtType(_TIME_EXT, millis.to_bytes(8, "big", signed=True))
    return value


def _time_text(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _unpack_ext(code: int, data: bytes) -> Any:
    if code == _BIG_EXT:
        return int(data.decode())
    if code != _TIME_EXT or len(data) != 8:
        raise CorruptState(f"unknown extension type {code}")
    return _time_text(_EPOCH + int.from_bytes(data, "big", signed=True) * _MILLISECOND)


def _pack_cell(cell: Cell) -> list[Any]:
    policy = canonical_policy(str(cell["p"]))
    payload: Any
    if policy in ("latest", "first"):
        payload = [cell["t"], _pack_value(cell["v"])]
    elif policy in ("min", "max"):
        payload = _pack_value(cell["v"])
    elif policy == "union":
        payload = [_pack_value(v) for v in cell["s"]]
    else:
        payload = b"".join(bytes.fromhex(str(member)) for member in cell["s"])
    return [POLICY_CODES[policy], payload]


def _unpack_cell(packed: Any) -> Cell:
    code, payload = packed
    policy = POLICY_NAMES[code]
    if policy in ("latest", "first"):
        return {"p": policy, "t": payload[0], "v": payload[1]}
    if policy in ("min", "max"):
        return {"p": policy, "v": payload}
    if policy == "union":
        return {"p": policy, "s": list(payload)}
    size = FINGERPRINT_BYTES
    return {"p": policy, "s": [payload[i : i + size].hex() for i in range(0, len(payload), size)]}


def pack(state: LearnerState) -> tuple[bytes, tuple[str, ...]]:
    """The state as stored, and the schema it names (to be kept beside it)."""
    names = state.schema()
    position = {name: index for index, name in enumerate(names)}
    record = [
        FORMAT,
        schema_id(names),
        state.version,
        _NEEDS_READ if state.needs_read else 0,
        state.email,
        state.user_id,
        state.first_name,
        state.last_name,
        [_pack_cell(state.cells[name]) if name in state.cells else None for name in names],
        sorted(position[name] for name in state.unsent),
        {position[name]: _pack_value(count) for name, count in state.bases.items()},
    ]
    packed: bytes = msgpack.packb(record, use_bin_type=True, unicode_errors="surrogatepass")
    return packed, names


@dataclass(frozen=True)
class Stored:
    """A stored state, decoded once: the schema it names, and the state once its names are
    known."""

    record: list[Any]

    @property
    def schema(self) -> bytes:
        """The id of the schema the state names."""
        return bytes(self.record[1])

    def state(self, names: Sequence[str]) -> LearnerState:
        """The state, read with the names of its schema (CorruptState if they do not fit)."""
        return _state(self.record, names)


def decode(blob: bytes) -> Stored:
    """A stored state, decoded (CorruptState if it is not one)."""
    return Stored(_record(blob))


def unpack(blob: bytes, names: Sequence[str]) -> LearnerState:
    """A stored state, read with the names of its schema."""
    return decode(blob).state(names)


def _state(record: list[Any], names: Sequence[str]) -> LearnerState:
    try:
        _, _, version, flags, email, user_id, first, last, cells, unsent, bases = record
        return LearnerState(
            version=int(version),
            email=email,
            user_id=user_id,
            first_name=first,
            last_name=last,
            cells={
                names[i]: _unpack_cell(cell) for i, cell in enumerate(cells) if cell is not None
            },
            unsent={names[i] for i in unsent},
            bases={names[int(i)]: int(count) for i, count in bases.items()},
            needs_read=bool(flags & _NEEDS_READ),
        )
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise CorruptState(f"unreadable state ({type(exc).__name__}: {exc})") from exc


def _record(blob: bytes) -> list[Any]:
    try:
        record = msgpack.unpackb(
            blob,
            raw=False,
            ext_hook=_unpack_ext,
            strict_map_key=False,
            unicode_errors="surrogatepass",
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptState(f"unreadable state ({type(exc).__name__})") from exc
    if not isinstance(record, list) or len(record) != 11 or record[0] != FORMAT:
        raise CorruptState("not a learner state of this format")
    return record
