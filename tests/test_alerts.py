"""docs/alerts.yml: Prometheus alert rules that load, on metrics and labels /metrics exposes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from instruqt_crm.config import Settings
from instruqt_crm.crm.hubspot_daily import DailyLimit, DailyUsage
from instruqt_crm.errors import Category
from instruqt_crm.journal import failures
from instruqt_crm.journal.failures import Kind
from instruqt_crm.receiver.app import create_app
from samples.signing import SECRET

RULES = Path(__file__).resolve().parent.parent / "docs" / "alerts.yml"
METRIC = re.compile(r"\binstruqt_crm_[a-z0-9_]+\b")
GROUPING = re.compile(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)")
TEMPLATE_LABEL = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")
DURATION = re.compile(r"\d+[smhd]")
SEVERITIES = {"warning", "critical"}


def rules() -> list[dict[str, Any]]:
    """Every rule of every group."""
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def exposed(conn: redis.Redis, redis_url: str) -> dict[str, set[str]]:
    """The samples /metrics exposes with every gauge a rule reads filled in: name -> labels."""
    settings = Settings.from_env(
        {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url, "HUBSPOT_ACCESS_TOKEN": "pat"}
    )
    failures.record(conn, Kind.EVENT, Category.MAPPING, "template failed", "msg_1", "{}")
    DailyLimit(conn, "hubspot", 80).record(DailyUsage(used=10, limit=1000))
    page = create_app(settings, conn=conn).test_client().get("/metrics")
    assert page.status_code == 200
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(page.get_data(as_text=True)):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def test_the_rules_are_complete_alerts() -> None:
    """Each rule: a unique name, an expression, how long it must hold, a severity, and words
    that say what it means and what to do."""
    found = rules()
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names)) and len(names) >= 10
    for rule in found:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"InstruqtCrm[A-Z][A-Za-z]+", rule["alert"])
        assert METRIC.search(rule["expr"]), rule["alert"]
        assert DURATION.fullmatch(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        assert all(text.strip() for text in rule["annotations"].values()), rule["alert"]


def test_the_memory_rules_stay() -> None:
    names = {rule["alert"] for rule in rules()}
    assert {"InstruqtCrmRedisMemoryHigh", "InstruqtCrmRedisMemoryUrgent"} <= names


def test_every_metric_and_label_a_rule_uses_is_exposed(
    redis_conn: redis.Redis, redis_url: str
) -> None:
    samples = exposed(redis_conn, redis_url)
    for rule in rules():
        used = set(METRIC.findall(rule["expr"]))
        assert used <= set(samples), f"{rule['alert']}: {sorted(used - set(samples))} not exposed"
        labels = set().union(*(samples[name] for name in used))
        grouped = {
            label.strip()
            for group in GROUPING.findall(rule["expr"])
            for label in group.split(",")
            if label.strip()
        }
        shown = set(TEMPLATE_LABEL.findall(" ".join(rule["annotations"].values())))
        assert grouped | shown <= labels, f"{rule['alert']}: {sorted((grouped | shown) - labels)}"


def test_the_alerting_gauges_are_ruled_on() -> None:
    """The gauges exposed for alerting each have a rule."""
    ruled = {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    wanted = {
        "instruqt_crm_failures_open",
        "instruqt_crm_inbox_lag_seconds",
        "instruqt_crm_seconds_since_last_flush",
        "instruqt_crm_parked_learners",
        "instruqt_crm_crm_budget_remaining",
        "instruqt_crm_crm_paused_until_seconds",
        "instruqt_crm_crm_daily_usage_ratio",
        "instruqt_crm_crm_daily_usage_warning",
        "instruqt_crm_redis_used_memory_bytes",
    }
    assert wanted <= ruled, sorted(wanted - ruled)


def test_promtool_checks_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus); the tests above check the "
                    "rules' structure and names")  # fmt: skip
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout
