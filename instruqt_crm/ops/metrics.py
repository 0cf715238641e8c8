"""``/metrics``: the counters every process keeps in Redis, plus gauges read at scrape time.

The counters and histograms are written by ``journal.counters``; the gauges (inbox and queue
depths, contacts and plays waiting to be sent, learners waiting for an email) are read from
the engine's state when Prometheus scrapes, through a custom collector.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from instruqt_crm import keys
from instruqt_crm.engine import identity, inbox, ledger, plays
from instruqt_crm.engine.queueing import QUEUE_NAMES, queue
from instruqt_crm.journal import counters


class RedisCollector:
    """Builds metric families from Redis at scrape time."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn

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
            "instruqt_crm_dirty_plays",
            "Play records (Salesforce) with changes not yet sent.",
            value=plays.dirty_count(self.conn),
        )
        yield GaugeMetricFamily(
            "instruqt_crm_parked_learners",
            "Learners whose events wait for an email.",
            value=identity.parked_count(self.conn),
        )


def render(conn: redis.Redis) -> bytes:
    """The Prometheus text exposition of every metric."""
    counters.flush_tallies(conn)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(conn))
    return generate_latest(registry)
