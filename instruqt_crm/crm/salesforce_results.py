"""Per-record results of sObject Collections writes as outcomes, with reasons operators act on.

A result is ``{"id", "success", "errors": [{"statusCode", "message", "fields"}]}``. A duplicate
rule's refusal (``DUPLICATES_DETECTED``) also carries ``duplicateResult``: the rule, whether it
only alerts (``allowSave``: a request with ``Sforce-Duplicate-Rule-Header: allowSave=true``
saves past it) or blocks, and the records it matched (``matchResults[].matchRecords[]``).
UNABLE_TO_LOCK_ROW is retried; duplicates are rejected as conflicts, the rest as validation.
"""

from __future__ import annotations

from typing import Any

from instruqt_crm.errors import Category

from .base import Outcome
from .salesforce_routing import Target

RETRYABLE_CODES = {"UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE"}
DUPLICATES = "DUPLICATES_DETECTED"
ALLOW_SAVE_SETTING = "SALESFORCE_ALLOW_DUPLICATE_SAVE"
DUPLICATE_RULE_HEADER = "Sforce-Duplicate-Rule-Header"
THEN = "then requeue the failure"


def outcome(target: Target, result: dict[str, Any], allow_save: bool) -> Outcome:
    """The outcome of one record's result (``allow_save``: whether the request carried
    ``allowSave=true``)."""
    key = target.key
    if result.get("success"):
        return Outcome(key, "synced", record_id=result.get("id") or target.record_id)
    errors = result.get("errors") or [{}]
    codes = {str(e.get("statusCode", "")) for e in errors}
    reason = "; ".join(error_reason(e, allow_save) for e in errors)
    reason = f"{target.sobject} {target.record_id or '(new)'}: {reason}"
    if codes & RETRYABLE_CODES:
        return Outcome(key, "retry", reason)
    category = Category.CONFLICT if DUPLICATES in codes else Category.VALIDATION
    return Outcome(key, "rejected", reason, category)


def error_reason(error: dict[str, Any], allow_save: bool) -> str:
    """One error as ``CODE: message`` (a duplicate rule's also says which rule, which records
    and what to do)."""
    code = str(error.get("statusCode", "ERROR"))
    text = f"{code}: {error.get('message', '')}".strip(": ")
    if code != DUPLICATES:
        return text
    found = error.get("duplicateResult") or {}
    rule = f"duplicate rule {found['duplicateRule']}" if found.get("duplicateRule") else ""
    matched = [
        f"{result.get('entityType', '')} {match.get('record', {}).get('Id', '')}".strip()
        for result in found.get("matchResults") or []
        for match in result.get("matchRecords") or []
    ]
    which = rule or "a duplicate rule"
    if matched:
        which += f" matched {', '.join(matched)}"
    return f"{text}: {which}: {duplicate_fix(found.get('allowSave'), allow_save)}"


def duplicate_fix(rule_alerts: bool | None, allow_save: bool) -> str:
    """What to do about a duplicate rule's refusal (``rule_alerts``: None when the answer does
    not say whether the rule only alerts)."""
    merge = "merge the duplicates in Salesforce"
    if rule_alerts is False:
        return (
            f"the rule blocks the save: {merge}, or set the rule's action to Allow with an alert "
            f"(or leave the integration user out of its conditions), {THEN}"
        )
    if not allow_save:
        return f"the rule alerts: set {ALLOW_SAVE_SETTING}=true to save past it, or {merge}, {THEN}"
    if rule_alerts:
        return (
            f"refused although {DUPLICATE_RULE_HEADER} allowSave=true was sent (it needs "
            f"SALESFORCE_API_VERSION 52.0 or later): {merge} or change the rule, {THEN}"
        )
    return f"{merge}, or set the rule's action to Allow with an alert, {THEN}"
