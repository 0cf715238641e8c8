"""The fake org's SOQL on its records (Contacts, Leads, custom objects), answered as Salesforce
answers it.

``SELECT a, b FROM Object WHERE x IN ('v', ...) OR y IN (...) [ORDER BY CreatedDate ASC]``
(conditions joined by OR; none: every record). A field that does not exist, or that
field-level security hides from the user, is INVALID_FIELD; a field selected twice is
MALFORMED_QUERY; names are case-insensitive. Only records the user may see match (sharing),
oldest first. Each record carries its ``attributes`` and exactly the selected fields, under
their API names, null when empty, in the REST API's JSON forms: a DateTime as
``2026-11-08T22:58:42.000+0000`` (UTC), a Date as ``YYYY-MM-DD``, a Number as a double, a
Checkbox as a boolean (by the deployed field's type; a test's undeployed field as stored).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from .salesforce_org import SoqlRefused, from_object

IN_LIST = re.compile(r"(\w+) IN \(([^)]*)\)")
LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'")
STANDARD_CHECKBOXES = {("Lead", "IsConverted")}  # never null


def salesforce_datetime(value: Any) -> Any:
    """A stored time as the REST API writes a DateTime (``...T22:58:42.000+0000``)."""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return value  # Salesforce refuses such a write; a test stored it directly
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


def literals(values: str) -> set[str]:
    """The lower-cased values of a list of SOQL string literals (escapes undone)."""
    return {re.sub(r"\\(.)", r"\1", value).lower() for value in LITERAL.findall(values)}


class SoqlQueries:
    """The query side of ``FakeSalesforce``, which holds this state and provides ``fields_of``."""

    records: dict[str, dict[str, dict[str, Any]]]
    definitions: dict[tuple[str, str], Any]
    access: Any
    queries: list[str]

    def _query(self, soql: str, user: str, version: str) -> dict[str, Any]:
        """Records of the object whose fields are IN the lists, as the user sees them; setup
        objects from ``access``."""
        sobject = from_object(soql)
        if sobject not in self.records:
            return self.access.query(soql, user)
        self.queries.append(soql)
        head, _, where = soql.partition(" WHERE ")
        columns = [c.strip() for c in head.split(" FROM ")[0].removeprefix("SELECT ").split(",")]
        conditions = IN_LIST.findall(where.split(" ORDER BY ")[0])
        names = self._names(sobject, user, columns, [name for name, _ in conditions])
        wanted = [(names[name.lower()], literals(values)) for name, values in conditions]
        found = [
            record
            for record in self.records[sobject].values()  # oldest first
            if self.access.sees(user, sobject, record)
            and (not wanted or any(str(record.get(f, "")).lower() in vs for f, vs in wanted))
        ]
        selected = [names[c.lower()] for c in columns]
        rows = [self._row(sobject, record, selected, version) for record in found]
        return {"totalSize": len(rows), "done": True, "records": rows}

    def _names(
        self, sobject: str, user: str, columns: list[str], filtered: list[str]
    ) -> dict[str, str]:
        """The API names of the fields the user may see, by lower-cased name; SoqlRefused for a
        selected or filtered field it may not, and for a field selected twice."""
        visible = {name.lower(): name for name in self.fields_of(sobject, user) or []}
        for name in columns + filtered:
            if name.lower() not in visible:
                message = f"No such column '{name}' on entity '{sobject}'"
                raise SoqlRefused("INVALID_FIELD", message)
        for number, name in enumerate(columns):  # named as where it is selected again
            if name.lower() in (earlier.lower() for earlier in columns[:number]):
                raise SoqlRefused("MALFORMED_QUERY", f"duplicate field selected: {name}")
        return visible

    def _row(
        self, sobject: str, record: dict[str, Any], selected: list[str], version: str
    ) -> dict[str, Any]:
        """One record as a query answers it."""
        url = f"/services/data/v{version}/sobjects/{sobject}/{record['Id']}"
        row: dict[str, Any] = {"attributes": {"type": sobject, "url": url}}
        for name in selected:
            row[name] = self._json_value(sobject, name, record.get(name))
        return row

    def _json_value(self, sobject: str, name: str, value: Any) -> Any:
        """A stored value in the REST API's JSON form for the field's type."""
        if (sobject, name) in STANDARD_CHECKBOXES:
            return bool(value)
        if value is None or value == "":
            return None
        kind = getattr(self.definitions.get((sobject, name)), "type", None)
        if kind == "DateTime":
            return salesforce_datetime(value)
        if kind == "Date":
            return str(value)[:10]
        if kind == "Number":
            return float(value)
        if kind == "Checkbox":
            return value in (True, "true")
        return value
