"""A CRM that writes nothing: it logs the batches it would send and keeps the records it would make.

Used by the local run (no credentials needed) and by tests. It checks what a real CRM
checks first, so mistakes show up before going live: an unknown property or a malformed
email rejects that record (never its batch-mates). Emails with characters beyond ASCII are
refused too, as a Salesforce org without Email Address Internationalization refuses them.
"""

from __future__ import annotations

import fcntl
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from instruqt_crm import keys
from instruqt_crm.errors import Category
from instruqt_crm.mapping import Mapping

from .base import ContactChange, Outcome, PropertyInfo

EMAIL = re.compile(r"^[!-?A-~]+@[!-?A-~]+\.[A-Za-z0-9-]{2,}$")  # printable ASCII, one @


class DryRunAdapter:
    """Pretend CRM: appends each batch to a JSONL file and keeps the resulting records in Redis."""

    name = "dry-run"

    def __init__(
        self, conn: redis.Redis, mapping: Mapping, path: Path, batch_size: int = 100
    ) -> None:
        self.conn = conn
        self.mapping = mapping
        self.path = path
        self.batch_size = batch_size

    def describe(self) -> dict[str, PropertyInfo]:
        """The mapping's own properties plus ``email`` (a dry run has every field it needs)."""
        properties = self.mapping.properties
        known = {name: PropertyInfo(name, spec.type) for name, spec in properties.items()}
        known["email"] = PropertyInfo("email", "string")
        return known

    def upsert(self, changes: Sequence[ContactChange]) -> list[Outcome]:
        """Check and "write" a batch: one outcome per change."""
        known = self.describe()
        outcomes, written = [], []
        for change in changes:
            problem = self._problem(change, known)
            if problem:
                outcomes.append(Outcome(change.key, "rejected", problem, Category.VALIDATION))
                continue
            written.append(change)
            outcomes.append(Outcome(change.key, "synced", record_id=change.email))
        if written:
            self._write(written)
        return outcomes

    @staticmethod
    def _problem(change: ContactChange, known: dict[str, PropertyInfo]) -> str:
        """Why a real CRM would refuse this record ('' if it would not)."""
        if not EMAIL.match(change.email):
            return f"invalid email {change.email!r}"
        unknown = sorted(set(change.properties) - set(known))
        return f"property {unknown[0]!r} does not exist" if unknown else ""

    def _write(self, changes: Sequence[ContactChange]) -> None:
        """Append the batch to the file and apply it to the stored records."""
        line = json.dumps(
            {
                "at": time.time(),
                "upsert": [
                    {"id": c.email, "idProperty": "email", "properties": c.properties}
                    for c in changes
                ],
            },
            sort_keys=True,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(line + "\n")
        with self.conn.pipeline(transaction=True) as pipe:
            for change in changes:
                pipe.hget(keys.DRY_RUN_RECORDS, change.email)
            stored = pipe.execute()
            for change, raw in zip(changes, stored, strict=True):
                record = json.loads(raw) if raw else {"email": change.email}
                record.update(change.properties)
                pipe.hset(keys.DRY_RUN_RECORDS, change.email, json.dumps(record, sort_keys=True))
            pipe.execute()


def dry_run_records(conn: redis.Redis) -> dict[str, dict[str, object]]:
    """Every record the dry-run CRM holds, by email."""
    return {keys.text(k): json.loads(v) for k, v in conn.hgetall(keys.DRY_RUN_RECORDS).items()}
