"""What every job is handed: the settings, the mapping, the CRM adapter, the email lookup.

The worker process builds one at start from the environment and installs it; the job
functions (``jobs``), which RQ calls without arguments, ask for it with ``current()`` and pass
it on. Tests build one from ``Settings`` and install it the same way.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import redis

from instruqt_crm.config import Settings
from instruqt_crm.crm.adapters import build_adapter
from instruqt_crm.crm.base import CrmAdapter
from instruqt_crm.instruqt_api import InstruqtClient
from instruqt_crm.journal import trail
from instruqt_crm.mapping import Mapping, load_mapping

from .identity import LearnerLookup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """The parts every job needs, built from the settings."""

    settings: Settings
    mapping: Mapping

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        """The settings and the mapping they name (MappingError if it is unusable; a
        SettingsError when email lookups lack their team)."""
        settings.require_lookup_team()
        mapping = load_mapping(settings.mapping_path)
        log.info("loaded mapping %s (%s %s)", mapping.source, mapping.crm, mapping.object)
        return cls(settings, mapping)

    def adapter(self, conn: redis.Redis) -> CrmAdapter:
        """The CRM adapter that runs (see ``crm.adapters``), spending the shared budget."""
        return build_adapter(self.settings, self.mapping, conn)

    @functools.cached_property
    def lookup(self) -> LearnerLookup | None:
        """The Instruqt API client, if an API key is configured."""
        key, team = self.settings.instruqt_api_key, self.settings.instruqt_team_slug
        if key is None or team is None:
            return None
        return InstruqtClient(  # one attempt per event: a waiting event is retried anyway
            key.get_secret_value(), team, url=self.settings.instruqt_graphql_url, attempts=1
        )


_installed: Runtime | None = None


def install(runtime: Runtime | None) -> None:
    """Hand ``runtime`` to every job this process runs (None: build it on first use), and
    bound the learners' trails its jobs write by its settings."""
    global _installed
    _installed = runtime
    trail.configure(None if runtime is None else trail.Limits.from_settings(runtime.settings))


def current() -> Runtime:
    """The installed runtime; built from the environment (and installed) if none was."""
    runtime = _installed
    if runtime is None:
        runtime = Runtime.from_settings(Settings.from_env())
        install(runtime)
    return runtime
