"""How a trail entry is stored: a few dozen bytes instead of a few hundred, and back.

An entry is a dict (``at``, ``kind`` and the details a stage adds). Stored, it is one format
byte and then the entry as JSON with short field names and kinds, ``None`` and empty
details left out and the time in whole seconds, deflated with a preset dictionary of what
entries repeat (field names, event types, the default mappings' property names). A default
HubSpot event entry takes about 110 bytes instead of about 400 as plain JSON; a name the
dictionary lacks is still stored, it only compresses less. Entries earlier versions wrote
as plain JSON (they start with ``{``) read as they were.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

FORMAT_1 = b"\x01"
MAX_DECODED_BYTES = 1 << 20  # an entry that inflates past this is not one we wrote

# Field and kind names as stored. Never reuse a short name: entries written with it live on.
FIELDS = {
    "at": "a",
    "kind": "k",
    "event_id": "i",
    "type": "t",
    "timestamp": "w",
    "changed": "c",
    "changes": "v",
    "properties": "p",
    "reason": "r",
    "record_id": "o",
}
KINDS = {
    "event": "e",
    "sent": "s",
    "skipped": "k",
    "failed": "f",
    "rejected": "x",
    "retry": "y",
    "identity": "d",
}
_LONG_FIELDS = {short: name for name, short in FIELDS.items()}
_LONG_KINDS = {short: name for name, short in KINDS.items()}

# Format 1's preset dictionary: fixed for good (entries deflated with it must stay readable);
# a new dictionary needs a new format byte. What entries repeat most stands last.
ZDICT_1 = (
    b'"Instruqt_Last_Review_Track__c":"Instruqt_Last_Review_Score__c":'
    b'"Instruqt_Challenges_Completed_Count__c":"Instruqt_Tracks_Completed_Count__c":'
    b'"Instruqt_Tracks_Completed__c":"Instruqt_Tracks_Started__c":"Instruqt_Last_Track__c":'
    b'"Instruqt_Last_Activity_At__c":"Instruqt_First_Activity_At__c":"Instruqt_User_Id__c":'
    b'"instruqt_last_review_track":"instruqt_last_review_score":'
    b'"instruqt_challenges_completed_count":"instruqt_tracks_completed_count":'
    b'"instruqt_tracks_completed":"instruqt_tracks_started":"instruqt_last_track":'
    b'"instruqt_last_activity_at":"instruqt_first_activity_at":"instruqt_user_id":"user'
    b'"review.created","track.completed","track.challenge_attempted","track.started",'
    b'{"a":17,"k":"s","p":{"instruqt_,"r":"developer_play","o":"'
    b'{"a":17,"k":"e","i":"msg_","t":"track.","w":"20","c":true,"v":{"'
)


def encode(entry: dict[str, Any]) -> bytes:
    """An entry as stored (format 1)."""
    short = {}
    for name, value in entry.items():
        if value is None or value == "":
            continue
        if name not in FIELDS and name in _LONG_FIELDS:
            raise ValueError(f"trail detail {name!r} would read back as {_LONG_FIELDS[name]!r}")
        if name == "at":
            value = int(value)
        elif name == "kind":
            value = KINDS.get(value, value)
        short[FIELDS.get(name, name)] = value
    text = json.dumps(short, separators=(",", ":"), default=str).encode()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=ZDICT_1)
    return FORMAT_1 + deflater.compress(text) + deflater.flush()


def decode(raw: bytes) -> dict[str, Any]:
    """A stored entry with its full names (ValueError if it is not an entry we wrote)."""
    if raw[:1] == b"{":  # plain JSON, as earlier versions wrote entries
        return _object(json.loads(raw))
    if raw[:1] != FORMAT_1:
        raise ValueError(f"unknown trail entry format {raw[:1]!r}")
    inflater = zlib.decompressobj(-15, zdict=ZDICT_1)
    try:
        text = inflater.decompress(raw[1:], MAX_DECODED_BYTES)
    except zlib.error as exc:
        raise ValueError(f"trail entry does not inflate: {exc}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("trail entry is cut short or too large")
    short = _object(json.loads(text))
    entry = {_LONG_FIELDS.get(name, name): value for name, value in short.items()}
    if "kind" in entry:
        entry["kind"] = _LONG_KINDS.get(entry["kind"], entry["kind"])
    return entry


def _object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else ValueError."""
    if not isinstance(value, dict):
        raise ValueError("trail entry is not a JSON object")
    return value
