"""`middleware status` on the embedded broker (a spool folder), run as an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from middleware.cli.status import Status, engine_holds_spool, format_age, parse_counters, spool_queues
from middleware.observe import Metrics, serve_metrics
from middleware.project import load_project
from tests.project_copy import copy_project

REPO = Path(__file__).resolve().parents[2]
ADT = REPO / "samples" / "adt-inbound"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path, "samples")


@pytest.fixture
def env() -> dict[str, str]:
    """The embedded default broker; metrics pointed at a port where nothing listens."""
    values = {k: v for k, v in os.environ.items() if not k.startswith("MIDDLEWARE_")}
    return {**values, "METRICS_PORT": str(free_port())}


def middleware(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "middleware", *args, "--project", str(project)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=project)


def status_json(project: Path, env: dict[str, str]) -> dict[str, Any]:
    result = middleware(project, env, "status", "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def queues(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {q["queue"]: q for route in report["routes"] for q in route["queues"]}


def test_before_anything_ran_every_queue_is_not_declared(project: Path, env: dict[str, str]) -> None:
    report = status_json(project, env)
    assert report["broker"] == f"filesystem://{project / 'var' / 'broker'}"
    assert all(not q["declared"] for q in queues(report).values())
    assert report["engine_metrics"]["reachable"] is False
    assert not (project / "var" / "broker").exists()  # status only looks
    text = middleware(project, env, "status")
    assert text.returncode == 0, text.stderr
    assert "not declared" in text.stdout and "engine metrics: not reachable" in text.stdout


def test_published_messages_wait_with_their_depth_and_age(project: Path, env: dict[str, str]) -> None:
    published = middleware(project, env, "publish", str(ADT / "a01-admit.hl7"), str(ADT / "a03-discharge.hl7"),
                           "--queue", "ehr.adt")
    assert published.returncode == 0, published.stderr
    time.sleep(0.5)
    report = status_json(project, env)
    found = queues(report)
    inbound = found["ehr.adt"]
    assert (inbound["declared"], inbound["messages"], inbound["consumers"]) == (True, 2, 0)
    assert 0.5 <= inbound["oldest_age_seconds"] < 120
    assert found["adt-inbound.to.bed-board"]["messages"] == 0
    assert found["adt-inbound.to.bed-board"]["oldest_age_seconds"] is None
    adt = next(r for r in report["routes"] if r["route"] == "adt-inbound")
    assert adt["dead_letters"] == 0
    text = middleware(project, env, "status").stdout
    assert "ehr.adt" in text and "delivery → bed-board" in text


def test_dead_letters_from_a_demo_run_are_counted(project: Path, env: dict[str, str]) -> None:
    demo = middleware(project, env, "demo", "--json")
    assert demo.returncode == 0, demo.stderr
    env = {**env, "MIDDLEWARE_BROKER_URL": f"filesystem://{project / 'var' / 'demo' / 'broker'}"}
    report = status_json(project, env)
    dead = {r["route"]: r["dead_letters"] for r in report["routes"]}
    assert dead == {"adt-inbound": 1, "fhir-inbound": 1, "orders-inbound": 0, "results-inbound": 1,
                    "scheduling-inbound": 0, "referrals-rest": 1, "eligibility-x12": 1, "enrolment-x12": 1,
                    "eligibility-batch": 1}
    assert queues(report)["adt-inbound.dlq"]["oldest_age_seconds"] is not None
    assert all(q["messages"] == 0 for q in queues(report).values() if q["role"] != "dead-letter")


def test_spool_file_names_give_depth_and_oldest_age(tmp_path: Path) -> None:
    folder = tmp_path / "queues"
    folder.mkdir()
    now = 2_000_000_000_000_000_000
    for stamp, queue in ((now - 5_000_000_000, "ehr.adt"), (now - 1_000_000_000, "ehr.adt"),
                         (now - 9_000_000_000, "t1.ehr.adt"), (now - 7_000_000_000, "adt-inbound.dlq")):
        (folder / f"{stamp:020d}_abc.{queue}.msg").write_text("{}")
    (folder / f".{now:020d}_abc.ehr.adt.msg.tmp").write_text("")  # half written: not a message yet
    assert spool_queues(tmp_path, now) == {"ehr.adt": (2, 5.0), "t1.ehr.adt": (1, 9.0), "adt-inbound.dlq": (1, 7.0)}
    assert [format_age(s) for s in (2.5, 42, 252, 7380, 190000, None)] == ["2.5s", "42s", "4m12s", "2h03m",
                                                                            "2d04h", "-"]


def test_a_running_engine_is_seen_from_its_spool_lock(project: Path, env: dict[str, str]) -> None:
    spool = project / "var" / "broker"
    (spool / "queues").mkdir(parents=True)
    assert engine_holds_spool(spool) is False
    with (spool / "consumer.lock").open("ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a consuming engine holds
        if engine_holds_spool(spool) is None:
            pytest.skip("no /proc/locks here")
        found = queues(status_json(project, env))
    assert found["ehr.adt"]["consumers"] == 1 and found["adt-inbound.to.bed-board"]["consumers"] == 1
    assert found["adt-inbound.dlq"]["consumers"] == 0
    assert engine_holds_spool(spool) is False


async def test_engine_rates_come_from_its_metrics_endpoint(project: Path) -> None:
    port = free_port()
    loaded = load_project(project, {})
    loaded = dataclasses.replace(loaded, settings=dataclasses.replace(loaded.settings, metrics_port=port))
    metrics = Metrics()
    runner = await serve_metrics(metrics, "127.0.0.1", port)
    metrics.dead_lettered.labels(route="adt-inbound", stage="parse").inc(2)
    metrics.dead_lettered.labels(route="adt-inbound", stage="deliver").inc()

    async def traffic() -> None:
        while True:
            metrics.received.labels(route="adt-inbound").inc(10)
            metrics.events.labels(route="adt-inbound", type="patient.admitted.v1").inc(10)
            metrics.delivered.labels(route="adt-inbound", connector="bed-board").inc(10)
            metrics.delivered.labels(route="adt-inbound", connector="case-management").inc(10)
            await asyncio.sleep(0.1)

    feeding = asyncio.create_task(traffic())
    status = Status(loaded)
    try:
        await status.open()
        report = await status.report()
    finally:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
        await status.close()
        await runner.cleanup()
    assert report.metrics is not None and report.metrics_url == f"http://127.0.0.1:{port}/metrics"
    adt = report.metrics["adt-inbound"]
    assert 40 <= adt["received_per_s"] <= 200 and 40 <= adt["events_per_s"] <= 200
    assert adt["delivered_per_s"] == pytest.approx(2 * adt["received_per_s"], rel=0.3)
    assert adt["dead_lettered_total"] == {"deliver": 1, "parse": 2}
    assert report.metrics["orders-inbound"]["received_per_s"] == 0
    assert report.as_json()["engine_metrics"]["reachable"] is True


def test_metrics_page_counters_are_summed_per_route() -> None:
    page = """# TYPE middleware_events_delivered counter
middleware_events_delivered_total{connector="a",route="r1"} 3.0
middleware_events_delivered_total{connector="b",route="r1"} 4.0
middleware_events_delivered_created{connector="b",route="r1"} 1.7e9
# TYPE middleware_dead_lettered counter
middleware_dead_lettered_total{route="r1",stage="map"} 2.0
"""
    counters = parse_counters(page, 0.0)
    assert counters.delivered == {"r1": 7.0} and counters.dead_lettered == {"r1": {"map": 2.0}}


def test_an_unreachable_broker_is_one_error_line_and_exit_1(project: Path, env: dict[str, str]) -> None:
    env = {**env, "MIDDLEWARE_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}
    result = middleware(project, env, "status")
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot connect to RabbitMQ"), lines
