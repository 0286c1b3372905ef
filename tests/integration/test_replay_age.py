"""On the real RabbitMQ: a replayed dead letter's age counts from when the message first came in, not
from the replay: the age histograms, the deliver_within SLA and the journal all see the first receipt,
for a dead letter of the deliver stage (replayed with `middleware dlq replay`) and one the gateway
dead-lettered at ingest (replayed onto the inbound queue)."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from middleware.broker import naming
from middleware.broker.base import Broker
from middleware.deadletter import DeadLetter
from middleware.engine import Engine
from middleware.ingest.http import HttpGateway
from middleware.journal.config import Sla
from middleware.project import Project

from ..conftest import Sink
from .conftest import one_dead_letter
from .test_journal_trace import adt

pytestmark = pytest.mark.rabbitmq
Cli = Callable[..., subprocess.CompletedProcess[str]]
ROUTE = "adt-inbound"
WAIT = 1.5  # seconds a dead letter waits before its replay; deliver_within is 1 s


@pytest.fixture
async def sla_engine(rabbit_project: Project, broker: Broker) -> AsyncIterator[Engine]:
    """The shipped project with ``sla: {deliver_within: 1s}`` on adt-inbound."""
    routes = {**rabbit_project.routes, ROUTE: dataclasses.replace(rabbit_project.routes[ROUTE],
                                                                  sla=Sla(deliver_within=1.0))}
    running = Engine(dataclasses.replace(rabbit_project, routes=routes))
    await running.start()
    yield running
    await running.stop()


def sample(engine: Engine, name: str, **labels: str) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


async def post(engine: Engine, body: bytes) -> float:
    """POST ``body`` to the HTTP gateway; returns the time its 202 came back (after its receipt)."""
    gateway = next(g for g in engine.gateways if isinstance(g, HttpGateway))
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{gateway.port}/v1/routes/{ROUTE}/messages", data=body,
            headers={"Content-Type": "x-application/hl7-v2+er7",
                     "Authorization": "Bearer integration-test-token"}) as response:
        assert response.status in (202, 422), await response.text()
    return time.time()


async def dead_letter(broker: Broker, project: Project) -> DeadLetter:
    """The one dead letter of the route, read and given back (for the replay)."""
    message = await one_dead_letter(broker, naming.dead_letter_queue(ROUTE, project.settings.queue_prefix))
    letter = DeadLetter.from_message(message)
    await message.reject(requeue=True)
    return letter


def journal_received_at(env: dict[str, str], outcome: str, connector: str | None) -> list[float]:
    path = env["MIDDLEWARE_JOURNAL_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT received_at FROM mw_journal WHERE outcome = ? AND connector IS ?",
                          (outcome, connector)).fetchall()
    return [row[0] for row in rows]


async def replay(cli: Cli) -> float:
    started = time.time()
    result = await asyncio.to_thread(cli, "dlq", "replay", "--all", "--route", ROUTE)
    assert "replayed 1" in result.stdout, result.stdout
    return started


async def test_a_replayed_delivery_dead_letter_is_as_old_as_its_first_receipt(
        sla_engine: Engine, broker: Broker, rabbit_project: Project, sink: Sink, cli: Cli,
        rabbit_env: dict[str, str]) -> None:
    sink.script = [400]  # case-management refuses it for good: a deliver-stage dead letter
    received_by = await post(sla_engine, adt(f"AGE{uuid.uuid4().hex[:10]}"))
    letter = await dead_letter(broker, rabbit_project)
    assert letter.stage == "deliver" and letter.connector == "case-management"
    await asyncio.sleep(WAIT)
    replayed_at = await replay(cli)
    await sink.wait_for(2)

    labels = {"route": ROUTE, "connector": "case-management"}
    for _ in range(200):
        if sample(sla_engine, "middleware_delivery_message_age_seconds_count", **labels) == 1:
            break
        await asyncio.sleep(0.05)
    assert sample(sla_engine, "middleware_delivery_message_age_seconds_count", **labels) == 1
    age = sample(sla_engine, "middleware_delivery_message_age_seconds_sum", **labels)
    assert age >= replayed_at - received_by >= WAIT  # from the first receipt, not from the replay
    assert sample(sla_engine, "middleware_sla_deliver_within_breaches_total", **labels) == 1
    await asyncio.sleep(1.0)  # the journal writes every 0.5 s
    [first] = journal_received_at(rabbit_env, "dead_lettered", "case-management")
    assert first <= received_by and journal_received_at(rabbit_env, "delivered", "case-management") == [first]


async def test_a_replayed_ingest_dead_letter_is_as_old_as_its_first_receipt(
        sla_engine: Engine, broker: Broker, rabbit_project: Project, sink: Sink, cli: Cli) -> None:
    """The gateway dead-letters a message it cannot frame; replayed as is, it fails again at the
    route worker: its route-stage age is still measured from the first receipt."""
    received_by = await post(sla_engine, b"MSH|^~|EHR|GHH|ADT|GHH|20260101120000||ADT^A01|X1|P|2.5\rPID|1\r")
    letter = await dead_letter(broker, rabbit_project)
    assert letter.stage == "parse" and letter.headers.get("x-mw-received-at") is not None
    assert float(letter.headers["x-mw-received-at"]) <= received_by
    await asyncio.sleep(WAIT)
    replayed_at = await replay(cli)
    for _ in range(200):
        if sample(sla_engine, "middleware_route_message_age_seconds_count", route=ROUTE) == 1:
            break
        await asyncio.sleep(0.05)
    assert sample(sla_engine, "middleware_route_message_age_seconds_count", route=ROUTE) == 1
    age = sample(sla_engine, "middleware_route_message_age_seconds_sum", route=ROUTE)
    assert age >= replayed_at - received_by >= WAIT
