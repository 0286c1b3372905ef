"""`middleware status` during a sink outage: parked deliveries per delivery (the sum of its delay
queues' depths) and each connector's breaker state from the engine's /metrics."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from middleware import topology
from middleware.broker import make_broker
from middleware.broker.base import OutgoingMessage
from middleware.cli.status import Status, parse_counters, render
from middleware.observe import Metrics, serve_metrics
from middleware.project import load_project
from middleware.topology import RouteTopology
from tests.project_copy import copy_project
from tests.unit.test_status import free_port


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path)


async def test_parked_deliveries_are_the_sum_of_the_delay_queues(project: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDDLEWARE_")}
    env["METRICS_PORT"] = str(free_port())
    loaded = load_project(project, {**env, "HTTP_INGEST_TOKEN": "t"})
    adt = RouteTopology.of(loaded.routes["adt-inbound"])
    broker = make_broker(loaded.settings.broker_url)  # the project's embedded spool
    await broker.connect()
    try:
        await topology.declare(broker, adt, loaded.settings.delivery_limit)
        for seconds, count in ((30, 1), (300, 2)):
            for _ in range(count):
                await broker.publish(OutgoingMessage(b"{}"), queue=adt.delay("case-management", seconds))
    finally:
        await broker.close()
    result = subprocess.run([sys.executable, "-m", "middleware", "status", "--json", "--project", str(project)],
                            capture_output=True, text=True, timeout=120, env=env, cwd=project)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    route = next(r for r in report["routes"] if r["route"] == "adt-inbound")
    assert route["parked"] == {"case-management": 3, "bed-board": 0}
    roles = {q["queue"]: q["role"] for q in route["queues"]}
    assert roles["adt-inbound.to.case-management.delay.300"] == "delay"
    table = subprocess.run([sys.executable, "-m", "middleware", "status", "--project", str(project)],
                           capture_output=True, text=True, timeout=120, env=env, cwd=project).stdout
    row = next(line for line in table.splitlines() if "delivery → case-management" in line)
    assert "3" in row.split("delivery → case-management")[1].split()
    assert ".delay." not in table  # folded into the delivery's parked count


async def test_an_open_breaker_shows_in_the_json_and_beside_its_deliveries(project: Path) -> None:
    port = free_port()
    loaded = load_project(project, {"HTTP_INGEST_TOKEN": "t"})
    loaded = dataclasses.replace(loaded, settings=dataclasses.replace(loaded.settings, metrics_port=port))
    metrics = Metrics()
    metrics.breaker_open.labels("case-management").set(1)
    metrics.breaker_open.labels("bed-board").set(0)
    runner = await serve_metrics(metrics, "127.0.0.1", port)
    status = Status(loaded)
    try:
        await status.open()
        report = await status.report()
    finally:
        await status.close()
        await runner.cleanup()
    assert report.breakers == {"bed-board": "closed", "case-management": "open"}
    assert report.as_json()["breakers"] == report.breakers
    out = io.StringIO()
    render(report, Console(file=out, width=250))
    lines = out.getvalue().splitlines()
    assert any("delivery → case-management (breaker open)" in line for line in lines)
    assert not any("bed-board (breaker" in line for line in lines)


def test_the_breaker_gauge_is_read_from_the_metrics_page() -> None:
    page = """# TYPE middleware_breaker_open gauge
middleware_breaker_open{connector="a"} 1.0
middleware_breaker_open{connector="b"} 0.0
"""
    assert parse_counters(page, 0.0).breakers == {"a": 1.0, "b": 0.0}
