"""The adapter protocol every CRM speaks, and the change/outcome types that cross it.

Adapters raise the errors of ``instruqt_crm.errors``: ``RetryableError``/``RateLimited`` for
a whole batch that may succeed later, ``BatchRejected`` when the CRM refused a whole batch
because of some record in it (the engine splits the batch to find it), and
``PermanentError`` when nothing will work until an operator acts (a bad token, a missing
scope).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from instruqt_crm.errors import Category
from instruqt_crm.ratelimit import RequestBudget

Value = str | int | float | bool | None
Status = Literal["synced", "rejected", "retry"]


@dataclass(frozen=True)
class ContactChange:
    """The properties to write on one learner's record (only those that changed).

    A play record's change has the same shape: ``key`` is the participant id, ``email`` and
    ``user_id`` name the learner whose record the play links to.
    """

    key: str
    email: str
    properties: dict[str, Value]
    user_id: str | None = None
    first_name: str | None = None  # the learner's name, as Instruqt gave it: for creating a
    last_name: str | None = None  # record that needs one (a Salesforce Lead), never updates


@dataclass(frozen=True)
class Outcome:
    """What the CRM did with one change."""

    key: str
    status: Status
    reason: str = ""
    category: Category = Category.VALIDATION  # for a rejection
    record_id: str | None = None


@dataclass(frozen=True)
class PropertyInfo:
    """A property (field) as the CRM describes it."""

    name: str
    type: str
    extra: dict[str, str] = field(default_factory=dict)


class CrmAdapter(Protocol):
    """What the sync engine needs from a CRM."""

    name: str
    batch_size: int

    def upsert(self, changes: Sequence[ContactChange]) -> list[Outcome]:
        """Write a batch; one outcome per change, in any order, keyed by ``change.key``."""
        ...

    def describe(self) -> dict[str, PropertyInfo]:
        """The record properties the CRM knows, by name."""
        ...


@runtime_checkable
class PlayRecords(Protocol):
    """Optional: an adapter that also keeps one record per play (Salesforce)."""

    def play_adapter(self) -> CrmAdapter | None:
        """The adapter writing play records (changes keyed by participant id), or None."""
        ...


@dataclass(frozen=True)
class CurrentValues:
    """What the CRM holds for some learners: per change key, the record's values as text
    (None: no such record), and how many requests reading them took."""

    found: dict[str, dict[str, str] | None]
    requests: int


@runtime_checkable
class ReadsCurrentValues(Protocol):
    """Optional: an adapter that can read records' current values (to continue a learner
    whose ledger state expired from what the CRM holds)."""

    def current_values(
        self, changes: Sequence[ContactChange], names: Sequence[str]
    ) -> CurrentValues:
        """The ``names`` properties of the records the changes would write, within the budget."""
        ...


def request_budget(adapter: object) -> RequestBudget | None:
    """The shared request budget an adapter spends (None for one without: the dry run)."""
    budget = getattr(adapter, "budget", None)
    return budget if isinstance(budget, RequestBudget) else None


def missing_properties(known: dict[str, PropertyInfo], names: Iterable[str]) -> list[str]:
    """The names (mapped properties) that the CRM's ``known`` properties lack, sorted."""
    return sorted(name for name in names if name not in known)
