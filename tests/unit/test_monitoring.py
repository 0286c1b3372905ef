"""config/monitoring: every metric the Grafana dashboard and the Prometheus alerts use is one the engine
exports (names and labels read from the engine's Metrics registry now, not from a list), and the
rules pass promtool (skipped without promtool, failed under CI)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from middleware.observe import Metrics

from ..conftest import under_ci

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "config" / "monitoring"
PROMETHEUS_BUILTINS = {"up"}  # set by Prometheus for every scrape target, not by the engine
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus to every series it scrapes
_NAME = re.compile(r"\b(middleware_[a-z0-9_]+)")
_SELECTOR = re.compile(r"\b(middleware_[a-z0-9_]+)\{([^}]*)\}")


def exported() -> dict[str, set[str]]:
    """Every series name the engine's /metrics can carry (from its registry), with its label names."""
    metrics = Metrics()
    label_names = {attribute._name: set(attribute._labelnames) for attribute in vars(metrics).values()
                   if hasattr(attribute, "_labelnames") and hasattr(attribute, "_name")}
    suffixes = {"counter": ["_total", "_created"], "gauge": [""],
                "histogram": ["_bucket", "_sum", "_count", "_created"], "summary": ["", "_sum", "_count", "_created"]}
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        labels = label_names.get(family.name, set()) | ({"le"} if family.type == "histogram" else set())
        for suffix in suffixes.get(family.type, [""]):
            series[family.name + suffix] = labels
    return series


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return data


def dashboard_expressions() -> list[str]:
    board = dashboard()
    found = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append(query["query"])
    return found


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every expression of the alerts and the dashboard."""
    return ([(f"alerts.yaml {rule['alert']}", rule["expr"]) for rule in alert_rules()]
            + [("grafana-dashboard.json", expr) for expr in dashboard_expressions()])


def test_every_metric_name_used_is_one_the_engine_exports() -> None:
    names = exported()
    unknown = sorted({f"{where}: {name}" for where, expr in expressions() for name in _NAME.findall(expr)
                      if name not in names})
    assert not unknown, "metrics the engine does not export (see middleware/observe.py Metrics):\n" + "\n".join(unknown)


def test_every_label_in_a_selector_is_one_the_metric_carries() -> None:
    names = exported()
    wrong = []
    for where, expr in expressions():
        for name, matchers in _SELECTOR.findall(expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                if label not in names.get(name, set()) | SCRAPE_LABELS:
                    wrong.append(f"{where}: {name} has no label {label!r}")
    assert not wrong, "\n".join(wrong)


def test_only_engine_metrics_and_prometheus_up_are_queried() -> None:
    functions = {"sum", "rate", "increase", "delta", "histogram_quantile", "time", "by", "and", "or", "label_values",
                 "on", "without", "max", "min", "avg", "count"}
    others = {f"{where}: {token}" for where, expr in expressions()
              for token in re.findall(r"\b([a-z_][a-z0-9_]*)\s*[{(\[]", expr)
              if not token.startswith("middleware_") and token not in functions | PROMETHEUS_BUILTINS}
    assert not others, sorted(others)


def test_the_alerts_cover_silence_sla_dead_letters_breakers_and_a_stopped_engine() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for wanted, metric in (("MiddlewareFeedSilent", "middleware_sla_feed_silent"),
                           ("MiddlewareSlaDeliveryLate", "middleware_sla_deliver_within_breaches_total"),
                           ("MiddlewareDeadLettersGrowing", "middleware_queue_messages"),
                           ("MiddlewareBreakerOpen", "middleware_breaker_open"),
                           ("MiddlewareEngineDown", "up")):
        assert metric in rules[wanted]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_dashboard_has_throughput_age_errors_dlq_depth_and_breaker_panels() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
            assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    every = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for metric in ("middleware_messages_received_total", "middleware_events_delivered_total",
                   "middleware_delivery_message_age_seconds_bucket", "middleware_dead_lettered_total",
                   "middleware_queue_messages{role=\"dead-letter\"", "middleware_breaker_open"):
        assert metric in every, metric


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not installed (apt-get install prometheus): alert rules not checked"
        if under_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    promtool = _promtool()
    for command in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts.test.yaml"]):
        result = subprocess.run([promtool, *command], cwd=MONITORING, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
