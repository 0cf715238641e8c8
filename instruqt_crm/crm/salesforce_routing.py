"""Salesforce routing: which Contact or Lead each learner change updates or creates.

API names (``field_name``), values (``format_value``), SOQL literals and the ``Target`` a change
becomes. ``Router`` finds a batch's records with one SOQL query per object, by Email or the
external id (``Instruqt_User_Id__c``); a matched record is updated by Id, a converted Lead is
followed to its Contact, and a learner without a record gets a new one (upserted on the external
id when it has one): a Contact when the mapping targets Contacts, else a Lead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from instruqt_crm.mapping import Mapping

from .base import ContactChange, Value

EXTERNAL_ID = "Instruqt_User_Id__c"
BATCH_SIZE = 200  # records per sObject Collections request
MAX_SOQL = 9000  # characters; longer lookups are split in two


def field_name(prop: str) -> str:
    """API name of a property: ``instruqt_tracks_completed`` → ``Instruqt_Tracks_Completed__c``."""
    if prop.endswith("__c") or prop[:1].isupper():
        return prop  # already an API name (custom or standard)
    return "_".join(part.capitalize() for part in prop.split("_") if part) + "__c"


def format_value(value: Value) -> Value:
    """A value as Salesforce JSON wants it: numbers as numbers, None clears, ISO text as is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def soql_quote(text: str) -> str:
    """A SOQL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Target:
    """Where one record goes: an object, and an Id (update), an external id field (upsert on
    it, its value in ``fields``) or neither (create); ``key`` names the change it carries."""

    key: str
    sobject: str
    record_id: str | None
    fields: dict[str, Any]
    external: str | None = None


class Router:
    """Find a batch's Contacts and Leads (one SOQL query per object) and route each change."""

    def __init__(self, mapping: Mapping, call: Callable[..., Any], api_version: str) -> None:
        self.call = call  # the adapter's REST call: (what, method, path, **kwargs) -> JSON
        self.api_version = api_version
        self.object = mapping.object if mapping.object in ("Contact", "Lead") else "auto"
        options = mapping.salesforce
        self.lead_defaults = dict(options.lead_defaults) if options else {}
        key = mapping.identity.match_key
        self.match_key = key
        self.external_id = field_name(key) if key else EXTERNAL_ID

    def __repr__(self) -> str:
        return f"Router(object={self.object!r}, external_id={self.external_id!r})"

    def _user_id(self, change: ContactChange) -> str | None:
        """The learner's external id value, if known."""
        value = change.properties.get(self.match_key) if self.match_key else None
        return str(value) if value not in (None, "") else change.user_id

    def _find(self, sobject: str, changes: Sequence[ContactChange]) -> list[dict[str, Any]]:
        """One SOQL query: records of ``sobject`` whose Email or external id is in the batch."""
        soql = self._soql(sobject, changes)
        if len(soql) > MAX_SOQL and len(changes) > 1:  # keep the GET URL under 16 kB
            middle = len(changes) // 2
            return self._find(sobject, changes[:middle]) + self._find(sobject, changes[middle:])
        records: list[dict[str, Any]] = []
        data = self.call(f"find {sobject}s", "GET", "query/", params={"q": soql})
        while True:
            records += list(data.get("records") or [])
            following = data.get("nextRecordsUrl")
            if data.get("done", True) or not following:
                return records
            path = following.split(f"/v{self.api_version}/", 1)[-1]
            data = self.call(f"find {sobject}s (more)", "GET", path)

    def _soql(self, sobject: str, changes: Sequence[ContactChange]) -> str:
        """The lookup query for a batch."""
        emails = sorted({c.email for c in changes})
        ids = sorted({uid for c in changes if (uid := self._user_id(c))})
        extra = ", IsConverted, ConvertedContactId" if sobject == "Lead" else ""
        where = f"Email IN ({', '.join(map(soql_quote, emails))})"
        if ids:
            where += f" OR {self.external_id} IN ({', '.join(map(soql_quote, ids))})"
        return (
            f"SELECT Id, Email, {self.external_id}{extra} FROM {sobject} "
            f"WHERE {where} ORDER BY CreatedDate ASC"
        )

    def _index(self, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Records by lower-cased email and by external id (the oldest wins)."""
        index: dict[str, dict[str, Any]] = {}
        for record in records:
            for key in (
                str(record.get("Email") or "").lower(),
                f"#{record.get(self.external_id) or ''}",
            ):
                if key not in ("", "#"):
                    index.setdefault(key, record)
        return index

    def _match(
        self, index: dict[str, dict[str, Any]], change: ContactChange
    ) -> dict[str, Any] | None:
        """The change's record in ``index``: by external id first, else by email."""
        uid = self._user_id(change)
        return (
            index.get(f"#{uid}") if uid and f"#{uid}" in index else index.get(change.email.lower())
        )

    def route(self, changes: Sequence[ContactChange]) -> list[Target]:
        """Decide for each change which record it updates or creates."""
        contacts = self._index(self._find("Contact", changes)) if self.object != "Lead" else {}
        leads = self._index(self._find("Lead", changes)) if self.object != "Contact" else {}
        targets = []
        for change in changes:
            fields = {field_name(k): format_value(v) for k, v in change.properties.items()}
            contact = self._match(contacts, change)
            lead = self._match(leads, change)
            key = change.key
            if contact is not None:
                targets.append(Target(key, "Contact", contact["Id"], fields))
            elif lead is not None and lead.get("IsConverted") and lead.get("ConvertedContactId"):
                targets.append(Target(key, "Contact", lead["ConvertedContactId"], fields))
            elif lead is not None:
                targets.append(Target(key, "Lead", lead["Id"], fields))
            else:
                sobject = "Contact" if self.object == "Contact" else "Lead"
                created = self._new(sobject, change, fields)
                external = self.external_id if self.external_id in created else None
                targets.append(Target(key, sobject, None, created, external))
        return targets

    def _new(self, sobject: str, change: ContactChange, fields: dict[str, Any]) -> dict[str, Any]:
        """Fields of a record to create: the placeholders, the name Instruqt gave the learner
        (on creation only: a name a person enters later is never overwritten), Email, the
        external id, then the mapping's fields."""
        defaults = dict(self.lead_defaults)
        if sobject == "Contact":
            defaults = {k: v for k, v in defaults.items() if k != "Company"}
        uid = self._user_id(change)
        names = {"FirstName": change.first_name, "LastName": change.last_name}
        named = {field: value for field, value in names.items() if value}  # Instruqt's, if any
        created = {**defaults, **named, "Email": change.email, **fields}
        if uid:
            created[self.external_id] = uid
        return created
