"""The mapping file as pydantic models: what a RevOps engineer may write, and nothing else."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import date, datetime
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from .checks import mapping_problems
from .errors import short_repr, suggest
from .merge import MERGE_POLICIES, canonical_policy
from .templates import check_template
from .values import VALUE_TYPES, ValueType

CRMS: tuple[str, ...] = ("hubspot", "salesforce")
OBJECTS: tuple[str, ...] = ("contact", "Contact", "Lead", "auto")
EventClass = Literal["mapped", "ignored", "unknown"]
Policy = Literal["latest", "first", "set_once", "min", "max", "union", "count"]
DEFER_CHECKS = "defer_checks"


def _one_of(kind: str, options: tuple[str, ...]) -> Callable[[Any], Any]:
    """A before-validator accepting only ``options``, with a did-you-mean hint."""

    def check(value: Any) -> Any:
        if isinstance(value, str) and value in options:
            return value
        if isinstance(value, str):
            hint = suggest(value, options) or f"; expected one of {', '.join(options)}"
            raise ValueError(f"unknown {kind} {short_repr(value)}{hint}")
        raise ValueError(f"{kind} must be one of {', '.join(options)}, not {short_repr(value)}")

    return check


def _version(value: Any) -> Any:
    """Only version 1 exists."""
    if value == 1 and not isinstance(value, bool):
        return 1
    raise ValueError(f"unsupported version {short_repr(value)}; this release reads version 1")


def _template_text(value: Any) -> Any:
    """Accept a constant number, boolean or date where a template is expected."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | date | datetime):
        return value.isoformat() if isinstance(value, date | datetime) else str(value)
    return value


def _checked_template(value: str) -> str:
    """Compile the template now, so a syntax error stops the load, not an event."""
    check_template(value)
    return value


def _empty_as(factory: Callable[[], Any]) -> BeforeValidator:
    """Treat an empty YAML value (``key:`` with everything below commented out) as empty."""
    return BeforeValidator(lambda value: factory() if value is None else value)


Template = Annotated[
    str,
    BeforeValidator(_template_text),
    AfterValidator(_checked_template),
    WithJsonSchema({"type": ["string", "number", "boolean"], "description": "Jinja2 template"}),
]
PolicyName = Annotated[
    Policy, BeforeValidator(_one_of("policy", MERGE_POLICIES)), AfterValidator(canonical_policy)
]
TypeName = Annotated[ValueType, BeforeValidator(_one_of("type", VALUE_TYPES))]


class _Model(BaseModel):
    """Strict, frozen, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PropertySpec(_Model):
    """A CRM property the mapping writes: its type, how it is labelled, how values merge."""

    type: TypeName = Field("string", description="string | number | datetime | date | bool")
    label: str = Field("", description="Label shown in the CRM (default: from the name).")
    description: str = Field("", description="Help text shown in the CRM.")
    merge: PolicyName = Field(
        "latest",
        description="latest | first | set_once | min | max | union | count (see the YAML comments)",
    )

    @property
    def input_type(self) -> str:
        """The type rule values are coerced to: ``count`` counts distinct text values."""
        return "string" if self.merge == "count" else self.type


class RuleProperty(_Model):
    """One property a rule writes: a template, and optionally its (declared) merge policy."""

    value: Template = Field(description="Jinja2 template; rendering empty means no change.")
    merge: PolicyName | None = Field(None, description="Must equal the property's declared merge.")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        """``name: "{{ template }}"`` is short for ``name: {value: "{{ template }}"}``."""
        if isinstance(data, str | int | float | bool | date):
            return {"value": data}
        if not isinstance(data, dict):
            raise ValueError(
                f"expected a template or a mapping with 'value', not {short_repr(data)}"
            )
        return data

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """Offer both the short (template) and the long (mapping) form to editors."""
        long_form = handler(core_schema)
        short_form = {"type": ["string", "number", "boolean"], "description": "Jinja2 template"}
        return {"anyOf": [short_form, long_form]}


class Rule(_Model):
    """What to write when an event of a matching type arrives."""

    description: str = Field("", description="A note for humans; ignored by the sync.")
    when: Template | None = Field(None, description="Apply only when this renders truthy.")
    properties: dict[str, RuleProperty] = Field(description="property name -> template")


class Identity(_Model):
    """How an event's user becomes a CRM email (and an optional extra match property)."""

    email_params: list[str] = Field(
        default_factory=lambda: ["email"], description="custom parameters holding the email"
    )
    lookup: bool = Field(True, description="Ask Instruqt's GraphQL API for the email.")
    match_key: str | None = Field(None, description="A declared property that also matches.")


class PlaysOptions(_Model):
    """Play records (Salesforce ``Instruqt_Play__c``, one per participant id): what events mean."""

    enabled: bool = Field(True, description="Write one play record per participant id.")
    completed: list[str] = Field(
        default_factory=lambda: ["track.completed"],
        description="Event types (or globs) that complete a play.",
    )
    stopped: list[str] = Field(
        default_factory=lambda: ["track.stopped"],
        description="Event types (or globs) that stop a play.",
    )
    challenge_completed: list[str] = Field(
        default_factory=lambda: ["track.challenge_completed", "track.challenge_attempted"],
        description="Event types (or globs) that complete their challenge_id "
        "(never when the event says completed: false).",
    )


class HubSpotOptions(_Model):
    """HubSpot-only settings."""

    upsert_by: Literal["email", "match_key"] = Field(
        "email",
        description="What contacts are upserted on: the email (default), or identity.match_key "
        "(a unique string property; the email is then written as a property, so a learner "
        "whose email changes keeps one contact).",
    )


class SalesforceOptions(_Model):
    """Salesforce-only settings."""

    lead_defaults: dict[str, str] = Field(
        default_factory=lambda: {"LastName": "[not provided]", "Company": "[not provided]"},
        description="Fields required to create a Lead (LastName, Company), used only on create.",
    )
    plays: Annotated[PlaysOptions | None, _empty_as(dict)] = Field(
        None, description="Play records; absent (or enabled: false) writes none."
    )


def default_label(name: str) -> str:
    """A readable label from a property name (``instruqt_user_id`` -> ``Instruqt user id``)."""
    base = name.removesuffix("__c").replace("_", " ").strip()
    return base[:1].upper() + base[1:].lower()


class Mapping(_Model):
    """A whole mapping file: which events write which CRM properties, and how values merge."""

    model_config = ConfigDict(title="Instruqt CRM mapping")

    version: Annotated[Literal[1], BeforeValidator(_version)] = Field(description="Always 1.")
    crm: Annotated[Literal["hubspot", "salesforce"], BeforeValidator(_one_of("crm", CRMS))]
    object: Annotated[
        Literal["contact", "Contact", "Lead", "auto"], BeforeValidator(_one_of("object", OBJECTS))
    ] = Field(description="hubspot: contact; salesforce: Contact | Lead | auto")
    identity: Annotated[Identity, _empty_as(dict)] = Field(
        default_factory=lambda: Identity.model_validate({})
    )
    properties: dict[str, PropertySpec] = Field(description="Every property written, once.")
    events: Annotated[dict[str, Rule], _empty_as(dict)] = Field(
        default_factory=dict, description="type or glob -> rule"
    )
    ignore: Annotated[list[str], _empty_as(list)] = Field(
        default_factory=list, description="types or globs skipped"
    )
    skip_developer_plays: bool = Field(
        True,
        description="Skip events of developer plays (is_developer_play: true): a track "
        "author testing a track is not a learner. Counted as skipped (developer_play).",
    )
    skip: Annotated[dict[str, Template], _empty_as(dict)] = Field(
        default_factory=dict,
        description="name -> condition: a mapped event for which the condition renders "
        "true-ish is skipped, counted as skipped under the name",
    )
    extra_event_fields: Annotated[list[str], _empty_as(list)] = Field(
        default_factory=list,
        description="Top-level fields your events carry beyond those Instruqt documents for "
        "their types: templates may read them (check refuses a template reading a field no "
        "event of its rule's types carries).",
    )
    hubspot: HubSpotOptions | None = None
    salesforce: SalesforceOptions | None = None

    _source: str = PrivateAttr("<memory>")
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @property
    def upsert_key(self) -> str:
        """The HubSpot property contacts are upserted on (``email`` unless the mapping says)."""
        if self.hubspot is not None and self.hubspot.upsert_by == "match_key":
            return self.identity.match_key or "email"
        return "email"

    @model_validator(mode="after")
    def _complete(self, info: ValidationInfo) -> Mapping:
        """Fill in default labels; then check cross-references unless the loader does it."""
        for name, spec in list(self.properties.items()):
            if not spec.label:
                self.properties[name] = spec.model_copy(update={"label": default_label(name)})
        if info.context and info.context.get(DEFER_CHECKS):
            return self
        problems = mapping_problems(self)
        if problems:
            raise ValueError(
                "; ".join(f"{'.'.join(map(str, p.path))}: {p.message}" for p in problems)
            )
        return self

    @property
    def source(self) -> str:
        """Where the mapping was loaded from."""
        return self._source

    @property
    def digest(self) -> str:
        """A short hash of what the mapping does (its validated content, not its comments or
        layout): two files with the same digest sync the same way."""
        content = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(content.encode()).hexdigest()[:12]

    @property
    def warnings(self) -> list[str]:
        """Load-time warnings (``file:LINE: key: message``): suspicious but valid."""
        return list(self._warnings)

    @property
    def plays(self) -> PlaysOptions | None:
        """The play-record options when this mapping writes play records, else None."""
        options = self.salesforce.plays if self.salesforce is not None else None
        return options if options is not None and options.enabled else None

    def ignored_by(self, event_type: str) -> str | None:
        """The first ignore pattern matching ``event_type``, if any."""
        return next((p for p in self.ignore if fnmatchcase(event_type, p)), None)

    def rules_for(self, event_type: str) -> list[tuple[str, Rule]]:
        """Every rule whose pattern matches, in file order (ignore patterns not considered)."""
        return [(p, rule) for p, rule in self.events.items() if fnmatchcase(event_type, p)]

    def classify(self, event_type: str) -> EventClass:
        """``ignored`` (an ignore pattern matches), ``mapped`` (a rule does) or ``unknown``."""
        if self.ignored_by(event_type) is not None:
            return "ignored"
        return "mapped" if self.rules_for(event_type) else "unknown"
