"""What a worker process builds once: settings, the mapping, the CRM adapter, the lookup client."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import redis

from .config import Settings
from .crm.base import CrmAdapter
from .crm.dryrun import DryRunAdapter
from .identity import EmailLookup
from .mapping import Mapping, load_mapping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """The parts every job needs, built from the settings."""

    settings: Settings
    mapping: Mapping

    def adapter(self, conn: redis.Redis) -> CrmAdapter:
        """The CRM adapter for the mapping's CRM, or the dry run when it has no credentials."""
        token = self.settings.hubspot_access_token
        if self.mapping.crm == "hubspot" and token is not None:
            from .crm.hubspot import HubSpotAdapter, hubspot_budget

            budget = hubspot_budget(conn, self.settings.hubspot_requests_per_10s)
            return HubSpotAdapter(
                token.reveal(),
                self.settings.hubspot_api_base,
                budget,
                id_property=self.mapping.upsert_key,
            )
        if self.mapping.crm == "salesforce":  # Salesforce (issue 5)
            from .crm.salesforce import salesforce_adapter

            adapter = salesforce_adapter(self.settings, self.mapping, conn)
            if adapter is not None:
                return adapter
        return DryRunAdapter(conn, self.mapping, self.settings.dry_run_path)

    @functools.cached_property
    def lookup(self) -> EmailLookup | None:
        """The Instruqt API client, if an API key is configured."""
        if self.settings.instruqt_api_key is None:
            return None
        from .instruqt_api import InstruqtClient

        return InstruqtClient(  # one attempt per event: a waiting event is retried anyway
            self.settings.instruqt_api_key.reveal(),
            url=self.settings.instruqt_graphql_url,
            attempts=1,
        )


@functools.cache
def current_runtime() -> Runtime:
    """The process-wide runtime, built from the environment on first use."""
    settings = Settings.from_env()
    mapping = load_mapping(settings.mapping_path)
    log.info("loaded mapping %s (%s %s)", mapping.source, mapping.crm, mapping.object)
    return Runtime(settings, mapping)
