"""Property changes and the value types a mapping declares (string, number, datetime, ...)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from instruqt_crm.events import EventError, format_timestamp

from .templates import to_datetime

ValueType = Literal["string", "number", "datetime", "date", "bool"]
VALUE_TYPES: tuple[str, ...] = ("string", "number", "datetime", "date", "bool")
Value = str | int | float | bool

_INT = re.compile(r"[+-]?\d+")
_DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
MAX_SAFE_INT = 2**53


@dataclass(frozen=True)
class PropertyChange:
    """One event's contribution to one CRM property, merged later under ``policy``."""

    name: str
    policy: str
    value: Value
    timestamp: datetime


def value_text(value: Value) -> str:
    """The text form of a stored value (bools as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_number(text: str) -> int | float:
    """An int, or a finite float (integral floats become ints)."""
    cleaned = text.strip()
    if _INT.fullmatch(cleaned):
        return int(cleaned)
    number = float(cleaned)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {text!r}")
    if number.is_integer() and abs(number) < MAX_SAFE_INT:
        return int(number)
    return number


def coerce(text: str, value_type: str) -> Value:
    """Convert rendered template text to the declared type; raise ValueError if it does not fit."""
    if value_type == "string":
        return text
    if value_type == "number":
        try:
            return to_number(text)
        except ValueError:
            raise ValueError(f"not a number: {text[:60]!r}") from None
    if value_type == "bool":
        lowered = text.strip().lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise ValueError(f"not a boolean (true/false/yes/no/1/0): {text[:60]!r}")
    try:
        moment = to_datetime(text.strip())
    except (EventError, ValueError, OverflowError):
        raise ValueError(f"not a timestamp: {text[:60]!r}") from None
    formatted = format_timestamp(moment)
    if not _DATETIME.fullmatch(formatted):
        raise ValueError(f"timestamp out of range: {text[:60]!r}")
    if value_type == "date":
        return formatted[:10]
    if value_type == "datetime":
        return formatted
    raise ValueError(f"unknown type {value_type!r}")


def fit(value: Value, value_type: str) -> Value | None:
    """A stored value re-read as ``value_type``, or None if it no longer fits."""
    try:
        return coerce(value_text(value), value_type)
    except ValueError:
        return None
