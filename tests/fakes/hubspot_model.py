"""HubSpot's contact schema for the fake: standard properties, groups and value rules.

Everything here is plain data and pure functions; `tests.fakes.hubspot` owns the state
and the HTTP server. Shapes follow the `hubspot-api-client` v12 models
(`ModelProperty`, `PropertyGroup`, `Option`) so that SDK responses deserialize cleanly.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import UTC, date, datetime, time
from typing import Any

PROPERTY_TYPES = ("string", "number", "date", "datetime", "enumeration", "bool")
FIELD_TYPES_BY_TYPE: dict[str, tuple[str, ...]] = {
    "string": ("text", "textarea", "file", "html", "phonenumber", "calculation_equation"),
    "number": ("number", "calculation_equation"),
    "date": ("date",),
    "datetime": ("date",),
    "enumeration": ("select", "radio", "checkbox", "booleancheckbox", "calculation_equation"),
    "bool": ("booleancheckbox", "calculation_equation"),
}
FIELD_TYPES = tuple(sorted({ft for fts in FIELD_TYPES_BY_TYPE.values() for ft in fts}))
MAX_STRING_LENGTH = 65536
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
EMAIL_RE = re.compile(r"^[^@\s;,]+@[^@\s;,]+\.[A-Za-z0-9-]{2,}$")
EPOCH_MS_RE = re.compile(r"^-?\d{1,15}$")
DEFAULT_READ_PROPERTIES = (
    "createdate",
    "email",
    "firstname",
    "hs_object_id",
    "lastmodifieddate",
    "lastname",
)


class ApiError(Exception):
    """An HTTP error answer: status, HubSpot-style JSON body (or raw text) and extra headers."""

    def __init__(
        self, status: int, body: dict[str, Any] | str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body
        self.headers = headers or {}


def correlation_id() -> str:
    """A fresh correlation id like HubSpot's."""
    return str(uuid.uuid4())


def error_body(message: str, category: str, **extra: Any) -> dict[str, Any]:
    """HubSpot's standard error JSON."""
    body: dict[str, Any] = {
        "status": "error",
        "message": message,
        "correlationId": correlation_id(),
        "category": category,
    }
    body.update(extra)
    return body


def validation_error(message: str, **extra: Any) -> ApiError:
    """A 400 VALIDATION_ERROR."""
    return ApiError(400, error_body(message, "VALIDATION_ERROR", **extra))


def utc_now() -> datetime:
    """The current UTC time (the fake's default wall clock)."""
    return datetime.now(UTC)


def now_iso() -> str:
    """The current UTC time as HubSpot writes it (milliseconds, Z)."""
    return iso_ms(utc_now())


def iso_ms(moment: datetime) -> str:
    """`2024-01-02T03:04:05.678Z`."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# ---------------------------------------------------------------- seeds


def _definition(
    name: str,
    label: str,
    ptype: str,
    field_type: str,
    group: str,
    *,
    read_only: bool = False,
    unique: bool = False,
    options: list[tuple[str, str]] | None = None,
    hubspot_defined: bool = True,
) -> dict[str, Any]:
    """One property definition in the shape of the SDK's `ModelProperty`."""
    stamp = "2019-08-06T02:41:52.000Z" if hubspot_defined else now_iso()
    return {
        "name": name,
        "label": label,
        "type": ptype,
        "fieldType": field_type,
        "groupName": group,
        "description": "",
        "displayOrder": -1,
        "options": [
            {"label": olabel, "value": value, "displayOrder": i, "hidden": False}
            for i, (value, olabel) in enumerate(options or [])
        ],
        "hidden": False,
        "formField": not read_only,
        "hasUniqueValue": unique,
        "calculated": False,
        "externalOptions": False,
        "archived": False,
        "hubspotDefined": hubspot_defined,
        "createdAt": stamp,
        "updatedAt": stamp,
        "modificationMetadata": {
            "archivable": not hubspot_defined,
            "readOnlyDefinition": hubspot_defined,
            "readOnlyValue": read_only,
        },
    }


def standard_groups() -> dict[str, dict[str, Any]]:
    """HubSpot's default contact property groups."""
    names = [
        ("contactinformation", "Contact information"),
        ("conversioninformation", "Conversion information"),
        ("emailinformation", "Email information"),
        ("sales_properties", "Sales properties"),
        ("socialmediainformation", "Social media information"),
    ]
    return {
        name: {"name": name, "label": label, "displayOrder": i, "archived": False}
        for i, (name, label) in enumerate(names)
    }


def standard_properties() -> dict[str, dict[str, Any]]:
    """A realistic handful of HubSpot's standard contact properties."""
    ci = "contactinformation"
    lifecycle = [
        ("subscriber", "Subscriber"),
        ("lead", "Lead"),
        ("marketingqualifiedlead", "Marketing Qualified Lead"),
        ("salesqualifiedlead", "Sales Qualified Lead"),
        ("opportunity", "Opportunity"),
        ("customer", "Customer"),
        ("evangelist", "Evangelist"),
        ("other", "Other"),
    ]
    lead_status = [
        ("NEW", "New"),
        ("OPEN", "Open"),
        ("IN_PROGRESS", "In Progress"),
        ("UNQUALIFIED", "Unqualified"),
        ("CONNECTED", "Connected"),
    ]
    defs = [
        _definition("email", "Email", "string", "text", ci),
        _definition("firstname", "First Name", "string", "text", ci),
        _definition("lastname", "Last Name", "string", "text", ci),
        _definition("company", "Company Name", "string", "text", ci),
        _definition("jobtitle", "Job Title", "string", "text", ci),
        _definition("phone", "Phone Number", "string", "phonenumber", ci),
        _definition("website", "Website URL", "string", "text", ci),
        _definition("city", "City", "string", "text", ci),
        _definition("country", "Country/Region", "string", "text", ci),
        _definition("message", "Message", "string", "textarea", ci),
        _definition(
            "lifecyclestage", "Lifecycle Stage", "enumeration", "radio", ci, options=lifecycle
        ),
        _definition(
            "hs_lead_status",
            "Lead Status",
            "enumeration",
            "radio",
            "sales_properties",
            options=lead_status,
        ),
        _definition(
            "hs_email_optout",
            "Unsubscribed from all email",
            "bool",
            "booleancheckbox",
            "emailinformation",
            options=[("true", "True"), ("false", "False")],
        ),
        _definition(
            "num_conversion_events",
            "Number of Form Submissions",
            "number",
            "number",
            "conversioninformation",
            read_only=True,
        ),
        _definition("createdate", "Create Date", "datetime", "date", ci, read_only=True),
        _definition(
            "lastmodifieddate", "Last Modified Date", "datetime", "date", ci, read_only=True
        ),
        _definition(
            "hs_object_id", "Record ID", "number", "number", ci, read_only=True, unique=True
        ),
    ]
    return {d["name"]: d for d in defs}


# ---------------------------------------------------------------- property definitions


def new_property(
    body: Any, properties: dict[str, dict[str, Any]], groups: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Validate a `PropertyCreate` body and build the stored definition (raises ApiError)."""
    if not isinstance(body, dict):
        raise validation_error("Invalid input JSON: expected an object")
    missing = [f for f in ("name", "label", "type", "fieldType", "groupName") if not body.get(f)]
    if missing:
        raise validation_error(
            "Invalid input JSON: Cannot build PropertyCreate, some of required attributes "
            f"are not set {missing}"
        )
    name, ptype, field_type = body["name"], body["type"], body["fieldType"]
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > 100:
        raise validation_error(
            f"Property name {name!r} is invalid: use lowercase letters, digits and "
            "underscores, starting with a letter"
        )
    if ptype not in PROPERTY_TYPES:
        raise validation_error(
            f"Invalid input JSON: Unknown property type {ptype!r}; expected one of "
            f"{list(PROPERTY_TYPES)}"
        )
    if field_type not in FIELD_TYPES:
        raise validation_error(
            f"Invalid input JSON: Unknown fieldType {field_type!r}; expected one of "
            f"{list(FIELD_TYPES)}"
        )
    if field_type not in FIELD_TYPES_BY_TYPE[ptype]:
        raise validation_error(
            f"fieldType {field_type!r} is not valid for a property of type {ptype!r}; "
            f"use one of {list(FIELD_TYPES_BY_TYPE[ptype])}"
        )
    if body["groupName"] not in groups:
        raise validation_error(
            f"Property group {body['groupName']!r} does not exist",
            subCategory="PropertyValidationError.INVALID_GROUP",
        )
    if body.get("hasUniqueValue") and ptype not in ("string", "number"):
        raise validation_error("Only string and number properties can require unique values")
    if name in properties:
        raise ApiError(
            409, error_body(f"Property named '{name}' already exists.", "OBJECT_ALREADY_EXISTS")
        )
    options = _options(body.get("options"), ptype)
    definition = _definition(
        name,
        str(body["label"]),
        ptype,
        field_type,
        body["groupName"],
        unique=bool(body.get("hasUniqueValue")),
        hubspot_defined=False,
    )
    definition.update(
        options=options,
        description=str(body.get("description") or ""),
        displayOrder=int(body.get("displayOrder", -1)),
        hidden=bool(body.get("hidden", False)),
        formField=bool(body.get("formField", False)),
        createdUserId="1",
        updatedUserId="1",
    )
    return definition


def _options(raw: Any, ptype: str) -> list[dict[str, Any]]:
    """Validate `OptionInput`s; bool properties get true/false when none are given."""
    if not raw:
        if ptype == "bool":
            raw = [{"label": "True", "value": "true"}, {"label": "False", "value": "false"}]
        else:
            return []
    if not isinstance(raw, list) or not all(isinstance(o, dict) for o in raw):
        raise validation_error("Invalid input JSON: options must be a list of objects")
    values = [o.get("value") for o in raw]
    if any(not isinstance(v, str) or not o.get("label") for v, o in zip(values, raw, strict=True)):
        raise validation_error("Every option needs a label and a string value")
    if len(set(values)) != len(values):
        raise validation_error(f"Option values must be unique: {values}")
    return [
        {
            "label": str(o["label"]),
            "value": o["value"],
            "hidden": bool(o.get("hidden", False)),
            "displayOrder": int(o.get("displayOrder", i)),
            "description": o.get("description", ""),
        }
        for i, o in enumerate(raw)
    ]


def new_group(body: Any, groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Validate a `PropertyGroupCreate` body and build the stored group (raises ApiError)."""
    if not isinstance(body, dict) or not body.get("name") or not body.get("label"):
        raise validation_error(
            "Invalid input JSON: Cannot build PropertyGroupCreate, some of required "
            "attributes are not set [name, label]"
        )
    name = body["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise validation_error(f"Property group name {name!r} is invalid")
    if name in groups:
        raise ApiError(
            409,
            error_body(f"A property group named '{name}' already exists.", "OBJECT_ALREADY_EXISTS"),
        )
    return {
        "name": name,
        "label": str(body["label"]),
        "displayOrder": int(body.get("displayOrder", -1)),
        "archived": False,
    }


# ---------------------------------------------------------------- property values


class InvalidValue(Exception):
    """One invalid property value, reported the way HubSpot lists them."""

    def __init__(self, name: str, error: str, message: str) -> None:
        super().__init__(message)
        self.name, self.error, self.message = name, error, message

    def as_dict(self) -> dict[str, Any]:
        """The entry HubSpot puts in `Property values were not valid: [...]`."""
        return {
            "isValid": False,
            "message": self.message,
            "error": self.error,
            "name": self.name,
            "localizedErrorMessage": self.message,
        }


def invalid_values_error(problems: list[InvalidValue]) -> ApiError:
    """The whole-request 400 for invalid or unknown properties."""
    listed = json.dumps([p.as_dict() for p in problems], separators=(",", ":"))
    return validation_error(
        f"Property values were not valid: {listed}",
        errors=[
            {"message": p.message, "code": p.error, "context": {"propertyName": [p.name]}}
            for p in problems
        ],
    )


def is_email(value: str) -> bool:
    """Roughly HubSpot's email check: one @, a dotted domain, no spaces."""
    return bool(EMAIL_RE.match(value))


def normalize_value(definition: dict[str, Any], raw: Any) -> str:
    """The string HubSpot stores for `raw` ("" clears); raises InvalidValue."""
    name, ptype = definition["name"], definition["type"]
    if definition["modificationMetadata"]["readOnlyValue"]:
        raise InvalidValue(
            name, "READ_ONLY_VALUE", f'"{name}" is a read only property; its value cannot be set.'
        )
    if raw is None:
        return ""
    if isinstance(raw, bool):
        raw = "true" if raw else "false"
    elif isinstance(raw, int | float):
        raw = repr(raw)
    elif not isinstance(raw, str):
        raise InvalidValue(
            name,
            "INVALID_PROPERTY_VALUE",
            f'Property "{name}" must be a string, number or boolean, not {type(raw).__name__}',
        )
    if raw == "":
        return ""
    checker = _CHECKERS[ptype]
    return checker(definition, raw)


def _check_string(definition: dict[str, Any], value: str) -> str:
    name = definition["name"]
    if len(value) > MAX_STRING_LENGTH:
        raise InvalidValue(
            name,
            "INVALID_LENGTH",
            f'Property "{name}" is longer than {MAX_STRING_LENGTH} characters',
        )
    if name == "email":
        if not is_email(value.strip()):
            raise InvalidValue(name, "INVALID_EMAIL", f"Email address {value} is invalid")
        return value.strip().lower()
    return value


def _check_number(definition: dict[str, Any], value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InvalidValue(
            definition["name"],
            "INVALID_INTEGER",
            f'{value} was not a valid number for property "{definition["name"]}".',
        )
    return value.strip()


def parse_datetime(value: str) -> datetime | None:
    """ISO 8601 with a zone (up to 9 fractional digits) or epoch milliseconds, else None."""
    text = value.strip()
    if EPOCH_MS_RE.match(text):
        return datetime.fromtimestamp(int(text) / 1000, UTC)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return datetime.combine(date.fromisoformat(text), time(), UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _check_datetime(definition: dict[str, Any], value: str) -> str:
    moment = parse_datetime(value)
    if moment is None:
        raise InvalidValue(
            definition["name"],
            "INVALID_DATE",
            f'{value} is not a valid datetime for property "{definition["name"]}": use ISO 8601 '
            "with a time zone or milliseconds since the epoch",
        )
    return iso_ms(moment)


def _check_date(definition: dict[str, Any], value: str) -> str:
    moment = parse_datetime(value)
    name = definition["name"]
    if moment is None:
        raise InvalidValue(name, "INVALID_DATE", f'{value} is not a valid date for "{name}"')
    moment = moment.astimezone(UTC)
    if moment.time() != time():
        raise InvalidValue(
            name,
            "INVALID_DATE",
            f'{value} is not a valid date for "{name}": it is not midnight UTC',
        )
    return moment.date().isoformat()


def _check_bool(definition: dict[str, Any], value: str) -> str:
    if value.lower() not in ("true", "false"):
        raise InvalidValue(
            definition["name"],
            "INVALID_OPTION",
            f"{value} was not one of the allowed options: [true, false]",
        )
    return value.lower()


def _check_enumeration(definition: dict[str, Any], value: str) -> str:
    allowed = [o["value"] for o in definition["options"]]
    chosen = value.split(";") if definition["fieldType"] == "checkbox" else [value]
    bad = [v for v in chosen if v not in allowed]
    if bad:
        raise InvalidValue(
            definition["name"],
            "INVALID_OPTION",
            f"{bad[0]} was not one of the allowed options: {allowed}",
        )
    return value


_CHECKERS = {
    "string": _check_string,
    "number": _check_number,
    "datetime": _check_datetime,
    "date": _check_date,
    "bool": _check_bool,
    "enumeration": _check_enumeration,
}
