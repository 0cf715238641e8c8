"""Salesforce play records: one ``Instruqt_Play__c`` per participant id, linked to the learner.

``PLAY_FIELDS`` and ``LOOKUPS`` define the object (``salesforce_setup`` builds its metadata
from them). ``SalesforcePlays`` is the engine's adapter for play changes (keyed by
participant id, fields named as in ``instruqt_crm.engine.plays``): it finds each learner's
Contact or Lead (written in this flush, else one lookup per object and batch), then upserts
the plays on ``Participant_Id__c`` through the learner adapter's writes: ≤ 200 per request,
per-record outcomes, lock retries, the same request budget and error mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from instruqt_crm.errors import Category
from instruqt_crm.mapping import PropertySpec

from .base import ContactChange, Outcome, PropertyInfo
from .salesforce_routing import BATCH_SIZE, Target, field_name, format_value

if TYPE_CHECKING:
    from .salesforce import SalesforceAdapter

PLAY_OBJECT = "Instruqt_Play__c"
PLAY_KEY = "Participant_Id__c"
STATUS_FIELD = "Status__c"
STATUSES = ("Started", "Completed", "Stopped")
LOOKUPS = {"Contact": "Contact__c", "Lead": "Lead__c"}  # learner object -> lookup field


def _spec(kind: str, label: str, description: str) -> PropertySpec:
    return PropertySpec.model_validate({"type": kind, "label": label, "description": description})


PLAY_FIELDS: dict[str, PropertySpec] = {  # API name -> definition (Status__c: a picklist)
    PLAY_KEY: _spec("string", "Participant ID", "Instruqt's id of this play (external id)."),
    "Track__c": _spec("string", "Track", "Slug (or id) of the track played."),
    STATUS_FIELD: _spec("string", "Status", "Started, Completed or Stopped."),
    "Started_At__c": _spec("datetime", "Started at", "Time of the play's earliest event."),
    "Completed_At__c": _spec("datetime", "Completed at", "Time the track was completed."),
    "Challenges_Completed__c": _spec(
        "number", "Challenges completed", "How many distinct challenges were completed."
    ),
    "Minutes_Spent__c": _spec(
        "number",
        "Minutes spent",
        "Minutes played as Instruqt reports them (else from the start to the completion, "
        "the stop or the latest event).",
    ),
}
REQUIRED_FIELDS = (*PLAY_FIELDS, *LOOKUPS.values())


class SalesforcePlays:
    """Play records as a CRM adapter: upserted on ``Participant_Id__c``, linked to the learner."""

    name = "salesforce-plays"
    batch_size = BATCH_SIZE

    def __init__(self, learners: SalesforceAdapter) -> None:
        self.learners = learners

    def __repr__(self) -> str:
        return f"SalesforcePlays({self.learners!r})"

    def upsert(self, changes: Sequence[ContactChange]) -> list[Outcome]:
        """Write a batch of plays; a play whose learner has no Contact or Lead is rejected."""
        owners = {c.email: ContactChange(c.email, c.email, {}, c.user_id) for c in changes}
        records = self.learners.located(list(owners.values()))
        outcomes: dict[str, Outcome] = {}
        targets = []
        for change in changes:
            learner = records.get(change.email)
            if learner is None:
                reason = (
                    f"{PLAY_OBJECT} {change.key}: no Contact or Lead found for {change.email} "
                    "(its record was not written, or was deleted); sent again with its next event"
                )
                outcomes[change.key] = Outcome(change.key, "rejected", reason, Category.VALIDATION)
            else:
                fields = self.record(change, *learner)
                targets.append(Target(change.key, PLAY_OBJECT, None, fields, PLAY_KEY))
        if targets:
            outcomes.update(self.learners.write(targets))
        return [outcomes[change.key] for change in changes]

    @staticmethod
    def record(change: ContactChange, sobject: str, record_id: str) -> dict[str, Any]:
        """The fields of one play record: its key, its changed fields, both lookups."""
        fields = {
            field_name(name): format_value(value) for name, value in change.properties.items()
        }
        links = {lookup: record_id if kind == sobject else None for kind, lookup in LOOKUPS.items()}
        return {PLAY_KEY: change.key, **fields, **links}

    def describe(self) -> dict[str, PropertyInfo]:
        """The play object's fields by API name (none when the org has no such object)."""
        return self.learners.fields_of(PLAY_OBJECT) or {}
