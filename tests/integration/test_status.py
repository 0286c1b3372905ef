"""`middleware status` on the real RabbitMQ, against a running engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from middleware.broker import OutgoingMessage, naming
from middleware.broker.base import Broker
from middleware.engine import Engine
from middleware.observe import serve_metrics
from middleware.project import Project

from .conftest import REPO

pytestmark = pytest.mark.rabbitmq
SAMPLES = REPO / "samples" / "adt-inbound"
Cli = Callable[..., subprocess.CompletedProcess[str]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def status_json(cli: Cli) -> dict[str, Any]:
    result = await asyncio.to_thread(cli, "status", "--json")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def by_queue(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {q["queue"]: q for route in report["routes"] for q in route["queues"]}


async def wait_for_depth(broker: Broker, queue: str, expected: int, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await broker.queue_info(queue)).messages < expected:
        assert asyncio.get_running_loop().time() < deadline, f"{queue} never reached {expected} messages"
        await asyncio.sleep(0.1)


async def test_queues_not_declared_yet_are_shown_as_such(cli: Cli, rabbit_project: Project) -> None:
    report = await status_json(cli)
    assert report["broker"].startswith("amqp://***@")
    assert all(not q["declared"] for q in by_queue(report).values())
    assert report["engine_metrics"] == {"url": None, "reachable": False, "window_seconds": None}  # METRICS_PORT=0
    text = await asyncio.to_thread(cli, "status")
    assert "not declared" in text.stdout and "engine metrics: not reachable" in text.stdout


async def test_depth_consumers_and_dead_letters_of_a_running_engine(
        engine: Engine, broker: Broker, cli: Cli, rabbit_project: Project) -> None:
    prefix = rabbit_project.settings.queue_prefix
    await asyncio.to_thread(cli, "publish", str(SAMPLES / "malformed-no-msh.hl7"), "--queue", "ehr.adt")
    await wait_for_depth(broker, naming.dead_letter_queue("adt-inbound", prefix), 1)
    report = await status_json(cli)
    queues = by_queue(report)
    inbound = queues[f"{prefix}ehr.adt"]
    assert inbound["declared"] and inbound["messages"] == 0 and inbound["consumers"] >= 1
    delivery = queues[f"{prefix}adt-inbound.to.bed-board"]
    assert delivery["declared"] and delivery["consumers"] >= 1
    dlq = queues[f"{prefix}adt-inbound.dlq"]
    assert (dlq["messages"], dlq["consumers"]) == (1, 0)
    assert inbound["oldest_age_seconds"] is None and "AMQP cannot read" in report["oldest_age"]
    routes = {r["route"]: r for r in report["routes"]}
    assert routes["adt-inbound"]["dead_letters"] == 1 and routes["orders-inbound"]["dead_letters"] == 0
    text = (await asyncio.to_thread(cli, "status")).stdout
    assert "oldest: n/a" in text and f"{prefix}adt-inbound.dlq" in text


async def test_rates_and_dead_letter_totals_from_the_engine_metrics(
        engine: Engine, broker: Broker, cli: Cli, rabbit_project: Project, rabbit_env: dict[str, str]) -> None:
    port = free_port()
    runner = await serve_metrics(engine.metrics, "127.0.0.1", port)  # what `middleware run` serves
    rabbit_env["METRICS_PORT"] = str(port)  # the cli fixture runs with this environment
    prefix = rabbit_project.settings.queue_prefix
    await asyncio.to_thread(cli, "publish", str(SAMPLES / "malformed-no-msh.hl7"), "--queue", "ehr.adt")
    await wait_for_depth(broker, naming.dead_letter_queue("adt-inbound", prefix), 1)
    body = (SAMPLES / "a08-update.hl7").read_bytes()

    async def traffic() -> None:
        while True:
            await broker.publish(OutgoingMessage(body, correlation_id="status-test"), queue=f"{prefix}ehr.adt")
            await asyncio.sleep(0.05)

    feeding = asyncio.create_task(traffic())
    try:
        report = await status_json(cli)
    finally:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
        await runner.cleanup()
    assert report["engine_metrics"]["reachable"] is True
    assert report["engine_metrics"]["url"] == f"http://127.0.0.1:{port}/metrics"
    adt = next(r for r in report["routes"] if r["route"] == "adt-inbound")["engine"]
    assert adt["received_per_s"] > 0 and adt["events_per_s"] > 0
    assert adt["dead_lettered_total"] == {"parse": 1}
    assert adt["received_total"] >= 2
