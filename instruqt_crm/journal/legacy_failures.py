"""Failures as versions before the RQ failed registry kept them (a sorted set of ids and a
hash each), read so that ``failures.migrate_legacy`` moves them into the registry."""

from __future__ import annotations

import json
from typing import Any

import redis

from instruqt_crm import keys


def stored(conn: redis.Redis) -> list[tuple[str, dict[str, Any] | None]]:
    """Each old failure's id and record (the fields ``failures`` keeps; None when its hash is
    gone). Versions before those kept no kind: it is read off the payload, as they did when
    requeueing it. Cheap when there are none (one EXISTS)."""
    if not conn.exists(keys.LEGACY_FAILURES):
        return []
    found = []
    for raw_id in conn.zrange(keys.LEGACY_FAILURES, 0, -1):
        old_id = keys.text(raw_id)
        raw = conn.hgetall(keys.legacy_failure(old_id))
        fields = {keys.text(k): keys.text(v) for k, v in raw.items()}
        found.append((old_id, _record(fields) if fields else None))
    return found


def _record(fields: dict[str, str]) -> dict[str, Any]:
    """The record an old hash stands for."""
    return {
        "kind": fields.get("kind") or _kind_of(fields),
        "category": fields.get("category", "other"),
        "reason": fields.get("reason", ""),
        "message_id": fields.get("message_id", ""),
        "at": float(fields.get("at", 0.0)),
        "payload": fields.get("payload", ""),
    }


def _kind_of(fields: dict[str, str]) -> str:
    """The kind of a failure recorded without one, read off its payload."""
    try:
        body = json.loads(fields.get("payload", ""))
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("type"), str) and body["type"]:
        return "event"
    if isinstance(body, dict) and isinstance(body.get("participant_id"), str) and "fields" in body:
        return "play"
    if isinstance(body, dict) and isinstance(body.get("email"), str) and "properties" in body:
        return "contact"
    return "flush" if fields.get("message_id") == "flush" else "body"


def forget(pipe: Any, old_id: str) -> None:
    """Queue (on a pipeline) the commands that drop one old failure."""
    pipe.delete(keys.legacy_failure(old_id))
    pipe.zrem(keys.LEGACY_FAILURES, old_id)
