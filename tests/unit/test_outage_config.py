"""Connector YAML for outages: retry.delays and retry.max_age (durations, ``forever``), breaker:
parsed into the connector's policies; the topology declares one delay queue per tier; a bad
value is reported at its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from middleware.delivery.base import BreakerPolicy, RetryPolicy
from middleware.project import check_project, load_project
from middleware.topology import RouteTopology
from tests.project_copy import copy_project

ENV = {"HTTP_INGEST_TOKEN": "t"}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path)


def _retry(project: Path, block: str) -> Path:
    path = project / "connectors" / "case-management.yaml"
    text = path.read_text()
    assert "retry_on: [connection, timeout, \"429\", 5xx]\n" in text
    path.write_text(text.replace('retry_on: [connection, timeout, "429", 5xx]\n',
                                 'retry_on: [connection, timeout, "429", 5xx]\n' + block))
    return path


def test_defaults_are_24h_and_5s_30s_5m_30m_and_5_failures_then_a_probe_every_30s(project: Path) -> None:
    spec = load_project(project, ENV).connectors["case-management"]
    assert (spec.retry.delays, spec.retry.max_age) == ((5, 30, 300, 1800), 86400.0)
    assert spec.breaker == BreakerPolicy(failures=5, probe_every=30.0)


def test_tiers_max_age_and_breaker_are_read_as_durations(project: Path) -> None:
    _retry(project, "  delays: [1s, 2, 1m, 1.5h]\n  max_age: forever\nbreaker: {failures: 3, probe_every: 500ms}\n")
    loaded = load_project(project, ENV)
    spec = loaded.connectors["case-management"]
    assert spec.retry.delays == (1, 2, 60, 5400) and spec.retry.max_age is None
    assert spec.breaker == BreakerPolicy(failures=3, probe_every=0.5)
    assert "breaker" not in spec.options  # not a key of the http connector itself
    adt = RouteTopology.of(loaded.routes["adt-inbound"], "P.")
    assert [q for _, q in adt.delay_queues("case-management")] == [
        f"P.adt-inbound.to.case-management.delay.{s}" for s in (1, 2, 60, 5400)]


def test_a_route_deliver_entry_may_override_tiers_and_max_age(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    text = route.read_text()
    assert "    retry: {attempts: 8}\n" in text
    route.write_text(text.replace("    retry: {attempts: 8}\n",
                                  "    retry: {attempts: 8, delays: [10s], max_age: 2h}\n"))
    rule = next(d for d in load_project(project, ENV).routes["adt-inbound"].deliver if d.connector == "bed-board")
    assert rule.retry == RetryPolicy(attempts=8, delays=(10,), max_age=7200.0)


@pytest.mark.parametrize(("block", "key"), [
    ("  max_age: 1 day\n", "max_age"), ("  delays: []\n", "delays"), ("  delays: [5 s]\n", "delays"),
    ("breaker: {failures: 0}\n", "failures"), ("breaker: {probe_every: soon}\n", "probe_every"),
    ("breaker: {probes: 3}\n", "probes"),
])
def test_a_bad_value_is_reported_at_its_line(project: Path, block: str, key: str) -> None:
    path = _retry(project, block)
    loaded, found = check_project(project, ENV)
    assert loaded is None
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if f"{key}" in text and
                text.strip().startswith((key, "breaker", "delays", "max_age")))
    assert {(p.file, p.line) for p in found} == {("connectors/case-management.yaml", line)}, found
