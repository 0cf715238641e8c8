"""Salesforce routing: which Contact or Lead each learner change updates or creates.

API names (``field_name``), values (``format_value``), SOQL literals and the ``Target`` a change
becomes. ``Router`` finds a batch's records with one SOQL query per object, by Email or the
external id (``Instruqt_User_Id__c``), reading the mapped fields too when asked (``lookup``);
a matched record is updated by Id, a converted Lead is followed to its Contact, and a learner
without a record gets a new one (upserted on the external id when it has one): a Contact when
the mapping targets Contacts, else a Lead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Mapping as MappingOf
from dataclasses import dataclass
from typing import Any, TypeGuard

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


Place = tuple[str, str]  # (object, Id) of a learner's record


@dataclass(frozen=True)
class Found:
    """The existing record a change updates, and its fields as the lookup's query answered them
    (only Id, Email and the external id unless it read more; none for a converted Lead's
    Contact that was not read)."""

    sobject: str
    record_id: str
    fields: dict[str, Any]

    @property
    def place(self) -> Place:
        """(object, Id)."""
        return self.sobject, self.record_id


@dataclass(frozen=True)
class Lookup:
    """Each change's record by change key (None: it has none yet), and the queries it took."""

    records: dict[str, Found | None]
    queries: int


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

    def _find(
        self,
        sobject: str,
        changes: Sequence[ContactChange],
        fields: Sequence[str] = (),
        ids: Sequence[str] = (),
    ) -> tuple[list[dict[str, Any]], int]:
        """Records of ``sobject`` whose Email or external id is in ``changes`` or whose Id is in
        ``ids``, with ``fields`` selected too; and the queries that took (one, unless the query
        is too long for a URL or answered in pages)."""
        if not changes and not ids:
            return [], 0
        soql = self._soql(sobject, changes, fields, ids)
        if len(soql) > MAX_SOQL and len(changes) + len(ids) > 1:  # keep the GET URL under 16 kB
            half, half_ids = (len(changes) + 1) // 2, len(ids) // 2  # both halves ask something
            first = self._find(sobject, changes[:half], fields, ids[:half_ids])
            second = self._find(sobject, changes[half:], fields, ids[half_ids:])
            return first[0] + second[0], first[1] + second[1]
        data = self.call(f"find {sobject}s", "GET", "query/", params={"q": soql})
        records, queries = list(data.get("records") or []), 1
        while not data.get("done", True) and (following := data.get("nextRecordsUrl")):
            path = following.split(f"/v{self.api_version}/", 1)[-1]
            data = self.call(f"find {sobject}s (more)", "GET", path)
            records += list(data.get("records") or [])
            queries += 1
        return records, queries

    def _soql(
        self,
        sobject: str,
        changes: Sequence[ContactChange],
        fields: Sequence[str],
        ids: Sequence[str],
    ) -> str:
        """The lookup query: by Email or external id, or by Id; ``fields`` selected once each
        (SOQL refuses a field selected twice)."""
        columns = ["Id", "Email", self.external_id]
        if sobject == "Lead":
            columns += ["IsConverted", "ConvertedContactId"]
        for name in fields:
            if name.lower() not in {column.lower() for column in columns}:
                columns.append(name)
        emails = sorted({c.email for c in changes})
        user_ids = sorted({uid for c in changes if (uid := self._user_id(c))})
        terms = [
            f"{column} IN ({', '.join(map(soql_quote, values))})"
            for column, values in (("Email", emails), (self.external_id, user_ids), ("Id", ids))
            if values
        ]
        return (
            f"SELECT {', '.join(columns)} FROM {sobject} "
            f"WHERE {' OR '.join(terms)} ORDER BY CreatedDate ASC"
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

    def lookup(self, changes: Sequence[ContactChange], fields: Sequence[str] = ()) -> Lookup:
        """Each change's record: one query per object (Leads first). With ``fields`` (API
        names) the records' values are read too, the Contact a converted Lead became included
        (fetched by Id in the Contact query): the values of the record the change updates."""
        leads, queries = (
            self._find("Lead", changes, fields) if self.object != "Contact" else ([], 0)
        )
        lead_index = self._index(leads)
        matched = {change.key: self._match(lead_index, change) for change in changes}
        converted = {
            str(lead["ConvertedContactId"]) for lead in matched.values() if _converted(lead)
        }
        searched = changes if self.object != "Lead" else []  # Lead mode: by Id only
        contacts, more = self._find(
            "Contact", searched, fields, sorted(converted) if fields else []
        )
        by_id = {str(record["Id"]): record for record in contacts}
        contact_index = self._index(contacts) if self.object != "Lead" else {}
        records: dict[str, Found | None] = {}
        for change in changes:
            contact, lead = self._match(contact_index, change), matched[change.key]
            if contact is not None:
                records[change.key] = Found("Contact", str(contact["Id"]), contact)
            elif lead is not None and _converted(lead):
                record_id = str(lead["ConvertedContactId"])
                records[change.key] = Found("Contact", record_id, by_id.get(record_id, {}))
            elif lead is not None:
                records[change.key] = Found("Lead", str(lead["Id"]), lead)
            else:
                records[change.key] = None
        return Lookup(records, queries + more)

    def route(
        self, changes: Sequence[ContactChange], known: MappingOf[str, Place | None] | None = None
    ) -> list[Target]:
        """Decide for each change which record it updates or creates; ``known``: the records
        already found in this flush (None: the learner has none), not looked up again."""
        places = dict(known or {})
        unknown = [change for change in changes if change.key not in places]
        if unknown:
            looked = self.lookup(unknown).records
            places.update({key: found.place if found else None for key, found in looked.items()})
        return [self.target(change, places[change.key]) for change in changes]

    def target(self, change: ContactChange, place: Place | None) -> Target:
        """The update of the change's record, or a new record (upserted on the external id
        when it has one)."""
        fields = {field_name(k): format_value(v) for k, v in change.properties.items()}
        if place is not None:
            return Target(change.key, *place, fields)
        sobject = "Contact" if self.object == "Contact" else "Lead"
        created = self._new(sobject, change, fields)
        external = self.external_id if self.external_id in created else None
        return Target(change.key, sobject, None, created, external)

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


def _converted(lead: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """Whether a Lead the lookup found was converted into a Contact it names."""
    return bool(lead and lead.get("IsConverted") and lead.get("ConvertedContactId"))
