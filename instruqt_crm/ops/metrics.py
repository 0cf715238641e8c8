"""``/metrics``: the counters every process keeps in Redis, plus gauges read at scrape time.

The counters and histograms are written by ``journal.counters``; the gauges (inbox depth and
lag, queue depths, contacts and plays waiting to be sent, learners waiting for an email, open
failures by category, the time since the last successful flush, the CRM request budget left,
a CRM's pause and its daily request use, Redis's memory use and limit) are read from the
engine's state and Redis when Prometheus scrapes, through a custom collector. The alert
rules in ``docs/alerts.yml`` use them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any, get_args

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.crm import hubspot_daily
from instruqt_crm.crm.adapters import AdapterName, adapter_name, request_budget_for
from instruqt_crm.engine import flush, identity, inbox, ledger, memory, plays
from instruqt_crm.engine.queueing import QUEUE_NAMES, queue
from instruqt_crm.errors import Category
from instruqt_crm.journal import counters, failures
from instruqt_crm.mapping import MappingError, load_mapping


class RedisCollector:
    """Builds metric families from Redis at scrape time (with ``settings``, the CRM request
    budget of the adapter the mapping file picks, too)."""

    def __init__(self, conn: redis.Redis, settings: Settings | None = None) -> None:
        self.conn = conn
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        """Every metric, read fresh."""
        for name, (doc, label_names) in counters.COUNTERS.items():
            family = CounterMetricFamily(f"instruqt_crm_{name}", doc, labels=label_names)
            for field, value in self.conn.hgetall(keys.metric(name)).items():
                family.add_metric(keys.text(field).split(counters.LABEL_SEPARATOR), int(value))
            yield family
        stats = counters.stats(self.conn)
        yield self._events(stats)
        yield self._skipped(stats)
        yield self._identity(stats)
        yield self._latency()
        yield from self._gauges()
        yield from self._alerting()
        yield from self._budget()
        yield from self._redis_memory()
        yield from self._crm_limits()

    def _events(self, stats: dict[str, Any]) -> Metric:
        """Events by type and outcome, from the workers' statistics."""
        family = CounterMetricFamily(
            "instruqt_crm_events",
            "Events processed, by type and outcome.",
            labels=("type", "outcome"),
        )
        for event_type, outcomes in stats["events_by_type"].items():
            for outcome, value in outcomes.items():
                family.add_metric([event_type, outcome], value)
        return family

    def _skipped(self, stats: dict[str, Any]) -> Metric:
        """Events a mapping condition skipped (developer plays, ...), by the condition."""
        family = CounterMetricFamily(
            "instruqt_crm_events_skipped",
            "Events skipped by a mapping condition, by its name (developer_play, ...).",
            labels=("reason",),
        )
        for reason, value in stats["skipped"].items():
            family.add_metric([reason], value)
        return family

    def _identity(self, stats: dict[str, Any]) -> Metric:
        """Where learners' emails were found (or why not), parameter/Instruqt mismatches."""
        family = CounterMetricFamily(
            "instruqt_crm_identity",
            "Email resolutions by source (lookup, cache, params, ...; params-mismatch: an "
            "event's parameter email that was not Instruqt's).",
            labels=("source",),
        )
        for source, value in stats["identity"].items():
            family.add_metric([source], value)
        return family

    def _latency(self) -> Metric:
        """Seconds from a contact's first unsent change to the CRM accepting it."""
        stored = self.conn.hgetall(keys.metric("flush_latency"))
        raw = {keys.text(k): float(v) for k, v in stored.items()}
        buckets = [(str(b), raw.get(str(b), 0.0)) for b in counters.LATENCY_BUCKETS]
        buckets.append(("+Inf", raw.get("+Inf", 0.0)))
        return HistogramMetricFamily(
            "instruqt_crm_flush_latency_seconds",
            "Time from a contact's first unsent change to the CRM accepting it.",
            buckets=buckets,
            sum_value=raw.get("sum", 0.0),
        )

    def _gauges(self) -> Iterator[Metric]:
        """Current depths: inbox, queues, contacts and plays unsent, learners without email."""
        yield GaugeMetricFamily(
            "instruqt_crm_inbox_depth",
            "Events accepted and not yet handled by a worker.",
            value=inbox.depth(self.conn),
        )
        yield GaugeMetricFamily(
            "instruqt_crm_backfill_depth",
            "Events a backfill queued, not yet handled (taken while no live event waits).",
            value=inbox.depth(self.conn, inbox.BACKFILL),
        )
        depth = GaugeMetricFamily("instruqt_crm_queue_depth", "Jobs waiting.", labels=("queue",))
        for name in QUEUE_NAMES:
            depth.add_metric([name], queue(name, self.conn).count)
        yield depth
        yield GaugeMetricFamily(
            "instruqt_crm_dirty_contacts",
            "Contacts with changes not yet sent.",
            value=ledger.dirty_count(self.conn),
        )
        yield GaugeMetricFamily(
            "instruqt_crm_backfill_held_contacts",
            "Contacts a running backfill changed, sent when it is done.",
            value=ledger.held_count(self.conn),
        )
        yield GaugeMetricFamily(
            "instruqt_crm_dirty_plays",
            "Play records (Salesforce) with changes not yet sent.",
            value=plays.dirty_count(self.conn),
        )
        yield GaugeMetricFamily(
            "instruqt_crm_parked_learners",
            "Learners whose events wait for an email.",
            value=identity.parked_count(self.conn),
        )

    def _alerting(self) -> Iterator[Metric]:
        """What the alert rules watch: open failures, the inbox's lag, the last flush."""
        open_failures = GaugeMetricFamily(
            "instruqt_crm_failures_open",
            "Failures waiting for an operator (requeue or purge), by category.",
            labels=("category",),
        )
        found = failures.open_counts(self.conn)
        for category in Category:  # every category, 0 included: a rule sees it drop
            open_failures.add_metric([category.value], found.get(category, 0))
        yield open_failures
        yield GaugeMetricFamily(
            "instruqt_crm_inbox_lag_seconds",
            "Age of the oldest event accepted and not yet handled (0: the inbox is empty).",
            value=inbox.lag(self.conn),
        )
        last = flush.last_success(self.conn)
        yield GaugeMetricFamily(
            "instruqt_crm_seconds_since_last_flush",
            "Seconds since a flush last had the CRM accept a contact (+Inf: none has yet).",
            value=math.inf if last is None else max(0.0, time.time() - last),
        )

    def _budget(self) -> Iterator[Metric]:
        """The request budget left for the CRM the mapping file targets (none in a dry run,
        or when the file cannot be loaded)."""
        if self.settings is None:
            return
        try:
            mapping = load_mapping(self.settings.mapping_path)
        except MappingError:
            return
        budget = request_budget_for(self.settings, mapping, self.conn)
        if budget is None:
            return
        labels = [adapter_name(self.settings, mapping)]
        remaining = GaugeMetricFamily(
            "instruqt_crm_crm_budget_remaining",
            "CRM requests the shared budget could grant now (0 while paused), by adapter.",
            labels=("adapter",),
        )
        remaining.add_metric(labels, budget.remaining())
        limit = GaugeMetricFamily(
            "instruqt_crm_crm_budget_limit",
            "CRM requests the budget grants per window "
            "(HUBSPOT_REQUESTS_PER_10S or SALESFORCE_REQUESTS_PER_MINUTE), by adapter.",
            labels=("adapter",),
        )
        limit.add_metric(labels, budget.limit)
        yield remaining
        yield limit

    def _crm_limits(self) -> Iterator[Metric]:
        """Each CRM budget's pause (its end, 0 when none) and the daily request use read last."""
        paused = GaugeMetricFamily(
            "instruqt_crm_crm_paused_until_seconds",
            "When the pause of every request to the CRM ends (epoch seconds; 0: not paused), "
            "by adapter and the rate-limit policy that caused it (DAILY, ...).",
            labels=("adapter", "policy"),
        )
        daily = {
            "used": "Requests counted against the CRM account's daily limit, as last read.",
            "limit": "The CRM account's daily request limit, as last read.",
            "usage_ratio": "Share of the daily request limit used, as last read.",
            "usage_warning": "1 when the daily use passed the warning share "
            "(HUBSPOT_DAILY_WARN_PERCENT), else 0.",
            "resets_at_seconds": "When the daily request limit resets (epoch seconds).",
        }
        families = {
            name: GaugeMetricFamily(f"instruqt_crm_crm_daily_{name}", doc, labels=("adapter",))
            for name, doc in daily.items()
        }
        now = time.time()
        for adapter in get_args(AdapterName):  # each CRM's budget is named after its adapter
            if adapter == "dry-run":
                continue
            until, policy = self.conn.hmget(keys.budget_pause(adapter), ["until", "policy"])
            ends = float(keys.text(until)) if until is not None else 0.0
            if ends > now:
                paused.add_metric([adapter, keys.text(policy or "")], ends)
            else:
                paused.add_metric([adapter, ""], 0.0)
            reading = hubspot_daily.reading(self.conn, adapter)
            if reading is None:
                continue
            resets = reading["resets_at"]
            values = {
                "used": reading["used"],
                "limit": reading["limit"],
                "usage_ratio": reading["share"],
                "usage_warning": int(reading["warning"]),
                "resets_at_seconds": hubspot_daily.ahead(resets, now) if resets else 0.0,
            }
            for name, value in values.items():
                families[name].add_metric([adapter], value)
        yield paused
        yield from families.values()

    def _redis_memory(self) -> Iterator[Metric]:
        """Redis's memory use and limit (INFO memory), for an alert before it is full."""
        found = memory.read(self.conn)
        if not found.told:  # INFO refused: no figure rather than a false zero
            return
        yield GaugeMetricFamily(
            "instruqt_crm_redis_used_memory_bytes",
            "Memory Redis uses (INFO used_memory).",
            value=found.used,
        )
        yield GaugeMetricFamily(
            "instruqt_crm_redis_max_memory_bytes",
            "Redis's memory limit (INFO maxmemory; 0: no limit set).",
            value=found.limit or 0,
        )


def render(conn: redis.Redis, settings: Settings | None = None) -> bytes:
    """The Prometheus text exposition of every metric."""
    counters.flush_tallies(conn)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(conn, settings))
    return generate_latest(registry)
