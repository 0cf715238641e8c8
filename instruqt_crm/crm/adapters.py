"""Which CRM adapter runs, decided in one place, and the adapter built for it.

The mapping names the CRM; its credentials decide whether the real adapter runs or the dry
run (which writes what it would send to a file). The worker, ``status``, the status page and
the CLI's checks and setup all ask here, and /metrics for the budget left.
"""

from __future__ import annotations

from typing import Literal

import redis

from instruqt_crm.config import Settings
from instruqt_crm.mapping import Mapping
from instruqt_crm.ratelimit import RequestBudget

from .base import CrmAdapter
from .dryrun import DryRunAdapter
from .hubspot import HubSpotAdapter, hubspot_budget
from .salesforce import SalesforceAdapter, salesforce_budget
from .salesforce_auth import Connection, credentials_from

AdapterName = Literal["hubspot", "salesforce", "dry-run"]


def adapter_name(settings: Settings, mapping: Mapping) -> AdapterName:
    """``hubspot`` or ``salesforce`` when the mapping's CRM has credentials, else ``dry-run``."""
    if mapping.crm == "hubspot" and settings.hubspot_access_token is not None:
        return "hubspot"
    if mapping.crm == "salesforce" and credentials_from(settings).flow:
        return "salesforce"
    return "dry-run"


def request_budget_for(
    settings: Settings, mapping: Mapping, conn: redis.Redis
) -> RequestBudget | None:
    """The request budget all workers share for the adapter ``adapter_name`` picks (None for
    the dry run, which spends none); building it sends nothing to the CRM."""
    name = adapter_name(settings, mapping)
    if name == "hubspot":
        return hubspot_budget(conn, settings.hubspot_requests_per_10s)
    if name == "salesforce":
        return salesforce_budget(conn, settings.salesforce_requests_per_minute)
    return None


def build_adapter(
    settings: Settings, mapping: Mapping, conn: redis.Redis | None, attempts: int = 5
) -> CrmAdapter:
    """The adapter ``adapter_name`` picks. With ``conn`` it spends the request budget all
    workers share (and Salesforce tokens are cached there); without, it has no budget (the
    CLI's one-off checks and setup) and the dry run cannot be built."""
    name = adapter_name(settings, mapping)
    if name == "hubspot":
        assert settings.hubspot_access_token is not None
        return HubSpotAdapter(
            settings.hubspot_access_token.get_secret_value(),
            settings.hubspot_api_base,
            request_budget_for(settings, mapping, conn) if conn else None,
            attempts=attempts,
            id_property=mapping.upsert_key,
            daily_warn_percent=settings.hubspot_daily_warn_percent,
        )
    if name == "salesforce":
        budget = request_budget_for(settings, mapping, conn) if conn else None
        connection = Connection(credentials_from(settings), cache=conn)
        return SalesforceAdapter(
            connection,
            mapping,
            budget,
            attempts=attempts,
            allow_duplicate_save=settings.salesforce_allow_duplicate_save,
        )
    if conn is None:
        raise ValueError(f"no credentials for the {mapping.crm} CRM: only a dry run, with Redis")
    return DryRunAdapter(conn, mapping, settings.dry_run_path)
