"""Fault injection on the real RabbitMQ: SIGKILL mid-flight, a connector that always crashes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from middleware.broker import naming
from middleware.broker.base import Broker
from middleware.deadletter import DeadLetter
from middleware.delivery import Connector, Delivery
from middleware.delivery.base import ConnectorSpec
from middleware.engine import Engine
from middleware.project import Project

from ..conftest import Sink
from .conftest import REPO

pytestmark = pytest.mark.rabbitmq
SAMPLES = REPO / "samples" / "adt-inbound"
ADT = ["a01-admit.hl7", "a02-transfer.hl7", "a03-discharge.hl7", "a04-register.hl7", "a08-update.hl7",
       "a11-cancel-admit.hl7", "a13-cancel-discharge.hl7", "a40-merge.hl7"]
Cli = Callable[..., subprocess.CompletedProcess[str]]


def start_run(env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "middleware", "run", "--project", str(REPO)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd)


async def test_sigkill_mid_flight_loses_nothing(broker: Broker, rabbit_env: dict[str, str], sink: Sink, cli: Cli,
                                                tmp_path: Path) -> None:
    """Kill -9 the engine while deliveries are in flight; a new engine delivers every event (promise 2)."""
    sink.delay = 1.0  # deliveries hang in the sink: they are in flight when the process dies
    first = start_run(rabbit_env, tmp_path)
    try:
        await asyncio.to_thread(cli, "publish", *(str(SAMPLES / name) for name in ADT), "--queue", "ehr.adt")
        await sink.wait_for(1, timeout=30)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert first.returncode == -signal.SIGKILL
    in_flight = {headers["Idempotency-Key"] for headers, _ in sink.requests}  # none was answered
    before = len(sink.requests)
    sink.delay = 0.0
    second = start_run(rabbit_env, tmp_path)
    try:
        for _ in range(300):
            redelivered = {headers["Idempotency-Key"] for headers, _ in sink.requests[before:]}
            if len(redelivered) >= len(ADT):
                break
            await asyncio.sleep(0.1)
        assert redelivered >= in_flight and len(redelivered) == len(ADT)  # every event, at least once
        assert len({json.loads(body)["type"] for _, body in sink.requests[before:]}) == len(ADT)
        lines = (tmp_path / "bed-board.jsonl").read_text().splitlines()
        assert {json.loads(line)["id"] for line in lines} == redelivered
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.to_thread(second.wait, 30)
    assert second.returncode == 0


class _ExplodingConnector(Connector):
    """A connector with a bug: every send raises something that is not a DeliveryError."""

    calls = 0

    async def send(self, delivery: Delivery) -> None:
        type(self).calls += 1
        raise ZeroDivisionError("connector bug")


async def test_connector_bug_is_bounded_and_does_not_stall_other_sinks(
        broker: Broker, rabbit_project: Project, sink: Sink, tmp_path: Path,
        connector_type: Callable[[str, type], None]) -> None:
    """A connector that crashes on every message: redelivered delivery_limit times, then dead-lettered
    with its reason (promise 4); the other connector of the route is not held up (promise 5)."""
    connector_type("explodes", _ExplodingConnector)  # like any connector type, for this test only
    settings = dataclasses.replace(rabbit_project.settings, delivery_limit=3)
    crashing = ConnectorSpec("case-management", "explodes", {})
    project = dataclasses.replace(rabbit_project, settings=settings)
    engine = Engine(project, connector_specs={"case-management": crashing}, gateways=False)
    _ExplodingConnector.calls = 0
    await engine.start()
    try:
        from middleware.cli.publish import publish_files

        [published] = await publish_files(project, [SAMPLES / "a01-admit.hl7"], "ehr.adt")
        queue = naming.dead_letter_queue("adt-inbound", settings.queue_prefix)
        for _ in range(200):
            if (await broker.queue_info(queue)).messages:
                break
            await asyncio.sleep(0.05)
        message = await broker.get(queue)
        assert message is not None
        letter = DeadLetter.from_message(message)
        await message.ack()
    finally:
        await engine.stop()
    assert _ExplodingConnector.calls == 3
    assert letter.stage == "deliver" and letter.connector == "case-management" and letter.attempts == 3
    assert "ZeroDivisionError" in letter.error and letter.correlation_id == published.correlation_id
    assert len((tmp_path / "bed-board.jsonl").read_text().splitlines()) == 1  # the other sink got its event


async def test_connection_cut_reconnects_and_resumes(engine: Engine, sink: Sink, cli: Cli) -> None:
    """RabbitMQ drops the engine's connection (as in a network cut or a broker restart): the
    engine reconnects, restores its consumers and delivers what is published afterwards (promise 3)."""
    await asyncio.to_thread(cli, "publish", str(SAMPLES / "a01-admit.hl7"), "--queue", "ehr.adt")
    await sink.wait_for(1)
    name = getattr(engine.broker, "connection_name", "")
    listed = await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "list_connections", "-q", "pid",
                                                      "client_properties"], capture_output=True, text=True, timeout=60)
    [pid] = [line.split("\t")[0] for line in listed.stdout.splitlines() if name and name in line]
    closed = await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "close_connection", pid, "fault injection"],
                                     capture_output=True, text=True, timeout=60)
    assert closed.returncode == 0, closed.stderr
    await asyncio.to_thread(cli, "publish", str(SAMPLES / "a03-discharge.hl7"), "--queue", "ehr.adt")
    await sink.wait_for(2, timeout=60)
    assert json.loads(sink.requests[1][1])["type"] == "patient.discharged.v1"
