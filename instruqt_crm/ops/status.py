"""Operational figures in one JSON-ready dict, for ``instruqt-crm status`` and the status page."""

from __future__ import annotations

import time
from typing import Any

import redis
from rq import Worker

from instruqt_crm import keys
from instruqt_crm.config import Settings
from instruqt_crm.crm import hubspot_daily
from instruqt_crm.crm.adapters import adapter_name, request_budget_for
from instruqt_crm.engine import flush, identity, inbox, ledger, mapping_record, memory, plays
from instruqt_crm.engine.queueing import QUEUE_NAME, queue
from instruqt_crm.engine.runtime import Runtime
from instruqt_crm.journal import counters, failures
from instruqt_crm.journal.failures import FAILED_QUEUE
from instruqt_crm.journal.trail import when
from instruqt_crm.keys import text
from instruqt_crm.mapping import Mapping, MappingError, load_mapping

QUEUES = {"jobs": QUEUE_NAME, "failed": FAILED_QUEUE}  # events and flushes share one queue
MAX_PARKED_SCAN = 1000


def queue_figures(conn: redis.Redis) -> dict[str, dict[str, int]]:
    """Per queue: jobs waiting, scheduled for later, running, and in RQ's failed registry."""
    figures = {}
    for short, name in QUEUES.items():
        jobs = queue(name, conn)
        figures[short] = {
            "queued": jobs.count,
            "scheduled": jobs.scheduled_job_registry.get_job_count(cleanup=False),
            "started": jobs.started_job_registry.get_job_count(cleanup=False),
            "failed": jobs.failed_job_registry.get_job_count(cleanup=False),
        }
    return figures


def parked_event_count(conn: redis.Redis, limit: int = MAX_PARKED_SCAN) -> int:
    """How many events wait for an email (counted over at most ``limit`` learners)."""
    users = [text(u) for u in conn.zrange(keys.PARKED_USERS, 0, limit - 1)]
    return identity.parked_event_count(conn, users)


def last_flush(conn: redis.Redis, now: float) -> dict[str, float | None]:
    """When a flush last wrote something to the CRM, and how long ago."""
    at = flush.last_success(conn)
    return {"at": at, "age_seconds": None if at is None else max(0.0, now - at)}


def _parts(source: Runtime | Settings) -> tuple[Settings, Mapping | None, str | None]:
    """Settings, the mapping (None if it cannot be loaded) and why not."""
    if isinstance(source, Runtime):
        return source.settings, source.mapping, None
    try:
        return source, load_mapping(source.mapping_path), None
    except MappingError as exc:
        return source, None, exc.problems[0] if exc.problems else str(exc)


def crm_figures(conn: redis.Redis, settings: Settings, mapping: Mapping | None) -> dict[str, Any]:
    """Which CRM the mapping targets, which adapter runs, and the request budget left."""
    if mapping is None:
        return {"crm": None, "adapter": "dry-run"}
    name = adapter_name(settings, mapping)
    figures: dict[str, Any] = {"crm": mapping.crm, "adapter": name}
    budget = request_budget_for(settings, mapping, conn)
    if budget is not None:
        pause = budget.pause()
        figures["budget"] = {
            "remaining": budget.remaining(),
            "limit": budget.limit,
            "window_seconds": budget.window,
            "paused_until": pause[0] if pause else None,
            "pause_reason": pause[1] if pause else None,
            "pause_policy": pause[2] if pause else None,
        }
        figures["daily"] = hubspot_daily.reading(conn, budget.name) if name == "hubspot" else None
    return figures


def collect(conn: redis.Redis, source: Runtime | Settings) -> dict[str, Any]:
    """Every figure an operator watches, read fresh from Redis (JSON-serialisable)."""
    settings, mapping, mapping_error = _parts(source)
    now = time.time()
    return {
        "at": now,
        "mapping": {
            "path": str(mapping.source if mapping is not None else settings.mapping_path),
            "crm": mapping.crm if mapping is not None else None,
            "error": mapping_error,
            "digest": mapping.digest if mapping is not None else None,
            "running": running_mappings(conn),
        },
        "workers": Worker.count(connection=conn),
        "redis": memory.read(conn).figures(),
        "inbox": {
            "events": inbox.depth(conn),
            "lag_seconds": inbox.lag(conn),
            "backfill_events": inbox.depth(conn, inbox.BACKFILL),
        },
        "queues": queue_figures(conn),
        "contacts": {"dirty": ledger.dirty_count(conn), "held": ledger.held_count(conn)},
        "plays": {"dirty": plays.dirty_count(conn)},
        "identity": {
            "waiting_learners": identity.parked_count(conn),
            "waiting_events": parked_event_count(conn),
        },
        "failures": {"open": failures.open_counts(conn), "recorded": failures.counts(conn)},
        "counters": counters.stats(conn),
        "last_flush": last_flush(conn, now),
        "crm": crm_figures(conn, settings, mapping),
    }


def running_mappings(conn: redis.Redis) -> dict[str, list[str]]:
    """The mappings the live workers run (the digest each recorded at start): digest -> workers."""
    live = [worker.name for worker in Worker.all(connection=conn)]
    found: dict[str, list[str]] = {}
    for name, entry in sorted(mapping_record.running(conn, live).items()):
        found.setdefault(str(entry.get("digest")), []).append(name)
    return found


def mapping_lines(mapping: dict[str, Any]) -> list[str]:
    """The mapping file, and whether the workers run it (or another: they need a restart)."""
    crm_name = mapping["crm"] or f"not loadable: {mapping['error']}"
    digest = f", {mapping['digest']}" if mapping["digest"] else ""
    lines = [f"Mapping       {mapping['path']} ({crm_name}{digest})"]
    running = mapping["running"]
    if not running:
        return [*lines, "Workers run   no mapping recorded (no worker started yet)"]
    for each, workers in sorted(running.items()):
        same = "the file's" if each == mapping["digest"] else "NOT the file's: restart them"
        lines.append(f"Workers run   {each} ({same}) on {len(workers)} worker(s)")
    return lines


def redis_lines(found: dict[str, Any]) -> list[str]:
    """How full Redis is and its eviction policy; the warning or refusal they call for."""
    notes = [found["refusal"], found["warning"]]
    return [f"Redis         {found['summary']}"] + [f"  WARNING: {n}" for n in notes if n]


def inbox_line(found: dict[str, Any]) -> str:
    """How many events wait in the inbox, and for how long the oldest has."""
    line = f"Inbox         {found['events']} event(s) accepted, not yet handled"
    line += f" (oldest {found['lag_seconds']:.0f} s)" if found["events"] else ""
    backfill = found.get("backfill_events", 0)
    return line + (f"; {backfill} backfill event(s) behind them" if backfill else "")


def held_note(held: int) -> str:
    """``; 40 more when the backfill is done``, or nothing."""
    return f"; {held} more when the backfill is done" if held else ""


def pairs(counts: dict[str, int]) -> str:
    """``a 1, b 2`` sorted by name, or ``none``."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def render(figures: dict[str, Any]) -> list[str]:
    """The figures as short aligned lines of text."""
    q, crm = figures["queues"], figures["crm"]
    flushed = figures["last_flush"]
    age = flushed["age_seconds"]
    lines = [
        *mapping_lines(figures["mapping"]),
        f"Workers       {figures['workers']}",
        *redis_lines(figures["redis"]),
        inbox_line(figures["inbox"]),
    ]
    for name, jobs in q.items():
        if name == "failed":  # its failed registry is the list of failures
            lines.append(
                f"Queue {name:<7} {jobs['failed']} failure(s) listed, {jobs['queued']} "
                f"requeued waiting for a worker ({FAILED_QUEUE} on the dashboard)"
            )
            continue
        lines.append(
            f"Queue {name:<7} {jobs['queued']} queued, {jobs['scheduled']} scheduled, "
            f"{jobs['started']} running, {jobs['failed']} in RQ's failed registry"
        )
    waiting = figures["identity"]
    lines += [
        f"Contacts      {figures['contacts']['dirty']} waiting to be sent"
        + held_note(figures["contacts"].get("held", 0)),
        f"Plays         {figures['plays']['dirty']} play record(s) waiting to be sent",
        f"Identity      {waiting['waiting_learners']} learner(s) waiting for an email "
        f"({waiting['waiting_events']} event(s))",
        f"Failures      open: {pairs(figures['failures']['open'])}; "
        f"recorded ever: {pairs(figures['failures']['recorded'])}",
        f"Events        {pairs(figures['counters']['events'])}",
        f"Skipped       by mapping conditions: {pairs(figures['counters']['skipped'])}",
        f"Last flush    {when(flushed['at'])}" + (f" ({age:.0f} s ago)" if age is not None else ""),
    ]
    budget = crm.get("budget")
    line = f"CRM           {crm['crm'] or 'unknown'} via {crm['adapter']}"
    if budget:
        line += (
            f"; {budget['remaining']} of {budget['limit']} requests left "
            f"per {budget['window_seconds']:g} s"
        )
        if budget["paused_until"]:
            line += f" (paused until {when(budget['paused_until'])}: {budget['pause_reason']})"
    lines.append(line)
    if crm.get("daily"):
        lines.append(daily_line(crm["daily"], figures["at"]))
    return lines


def daily_line(daily: dict[str, Any], now: float) -> str:
    """The CRM account's daily request use, its reset and the warning, in one line."""
    line = (
        f"Daily limit   {daily['used']} of {daily['limit']} requests used "
        f"({100 * daily['share']:.0f} %, read {when(daily['read_at'])})"
    )
    if daily["resets_at"] is not None:
        line += f"; resets at {when(hubspot_daily.ahead(daily['resets_at'], now))}"
    if daily["warning"]:
        line += f"; WARNING: past {daily['warn_percent']:g} %"
    return line
