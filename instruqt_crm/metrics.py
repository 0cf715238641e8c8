"""Prometheus metrics kept in Redis, so every web and worker process (and dyno) adds to one set.

Processes count with ``incr``/``observe`` (cheap HINCRBY calls); ``/metrics`` renders them,
plus gauges read at scrape time (queue depths, dirty contacts, parked learners), through a
custom collector. Counting never breaks the caller: Redis errors are swallowed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .identity import PARKED_USERS
from .ledger import DIRTY_KEY
from .queueing import KEY_PREFIX, QUEUE_NAMES, STATS_KEY, queue, text

log = logging.getLogger(__name__)
PREFIX = f"{KEY_PREFIX}metrics:"
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
COUNTERS = {
    "webhook_requests": ("Webhook deliveries answered, by outcome.", ("outcome",)),
    "crm_requests": (
        "Requests sent to the CRM, by adapter and HTTP status.",
        ("adapter", "status"),
    ),
    "crm_rate_limited": ("429 answers from the CRM, by adapter and policy.", ("adapter", "policy")),
}


def incr(conn: redis.Redis, name: str, *labels: str, amount: int = 1) -> None:
    """Add to a counter (labels in the order declared in COUNTERS)."""
    with contextlib.suppress(redis.RedisError):
        conn.hincrby(PREFIX + name, "\x1f".join(labels), amount)


def observe(conn: redis.Redis, name: str, seconds: Sequence[float]) -> None:
    """Record observations in a histogram with LATENCY_BUCKETS."""
    if not seconds:
        return
    with contextlib.suppress(redis.RedisError), conn.pipeline(transaction=False) as pipe:
        key = PREFIX + name
        for value in seconds:
            for bound in LATENCY_BUCKETS:
                if value <= bound:
                    pipe.hincrby(key, str(bound), 1)
            pipe.hincrby(key, "+Inf", 1)
            pipe.hincrbyfloat(key, "sum", value)
        pipe.execute()


class RedisCollector:
    """Builds metric families from Redis at scrape time."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn

    def collect(self) -> Iterator[Metric]:
        """Every metric, read fresh."""
        for name, (doc, label_names) in COUNTERS.items():
            family = CounterMetricFamily(f"instruqt_crm_{name}", doc, labels=label_names)
            for field, value in self.conn.hgetall(PREFIX + name).items():
                family.add_metric(text(field).split("\x1f"), int(value))
            yield family
        yield from self._events()
        yield self._latency()
        yield from self._gauges()

    def _events(self) -> Iterator[Metric]:
        """Events by type and outcome, from the workers' counters."""
        family = CounterMetricFamily(
            "instruqt_crm_events",
            "Events processed, by type and outcome.",
            labels=("type", "outcome"),
        )
        for field, value in self.conn.hgetall(STATS_KEY).items():
            parts = text(field).split(":", 2)
            if parts[0] == "events" and len(parts) == 3:
                family.add_metric([parts[2], parts[1]], int(value))
        yield family

    def _latency(self) -> Metric:
        """Seconds from a contact's first unsent change to the CRM accepting it."""
        raw = {text(k): float(v) for k, v in self.conn.hgetall(PREFIX + "flush_latency").items()}
        buckets = [(str(b), raw.get(str(b), 0.0)) for b in LATENCY_BUCKETS]
        buckets.append(("+Inf", raw.get("+Inf", 0.0)))
        return HistogramMetricFamily(
            "instruqt_crm_flush_latency_seconds",
            "Time from a contact's first unsent change to the CRM accepting it.",
            buckets=buckets,
            sum_value=raw.get("sum", 0.0),
        )

    def _gauges(self) -> Iterator[Metric]:
        """Current depths: queues, dirty contacts, learners waiting for an email."""
        depth = GaugeMetricFamily("instruqt_crm_queue_depth", "Jobs waiting.", labels=("queue",))
        for name in QUEUE_NAMES:
            depth.add_metric([name], queue(name, self.conn).count)
        yield depth
        yield GaugeMetricFamily(
            "instruqt_crm_dirty_contacts",
            "Contacts with changes not yet sent.",
            value=int(self.conn.zcard(DIRTY_KEY)),
        )
        yield GaugeMetricFamily(
            "instruqt_crm_parked_learners",
            "Learners whose events wait for an email.",
            value=int(self.conn.zcard(PARKED_USERS)),
        )


def render(conn: redis.Redis) -> bytes:
    """The Prometheus text exposition of every metric."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(conn))
    return generate_latest(registry)
