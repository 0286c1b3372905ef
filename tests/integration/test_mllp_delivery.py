"""The mllp connector end to end on the real RabbitMQ: the shipped adt-inbound route delivers its bed-board
events over MLLP to the project's own MLLP gateway (ACK after confirm), which puts them as HL7 v2 on a
receiving route's queue; a receiver answering AE turns the event into a dead letter with its text."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from middleware import topology
from middleware.broker import make_broker, naming
from middleware.broker.base import Broker, IncomingMessage, OutgoingMessage
from middleware.deadletter import DeadLetter
from middleware.delivery import ConnectorSpec, RetryPolicy
from middleware.delivery.mllp import control_id
from middleware.delivery.outbound import Outbound, compile_map, compile_when
from middleware.engine import Engine
from middleware.formats import hl7v2
from middleware.ingest import MllpListener
from middleware.ingest.mllp import MllpGateway
from middleware.project import Project
from middleware.route import DeliveryRule, Route, transform
from middleware.topology import RouteTopology, Topology

from ..unit.test_mllp_connector import Receiver, ack
from .conftest import REPO

pytestmark = pytest.mark.rabbitmq

SAMPLES = REPO / "samples" / "adt-inbound"
FAST = RetryPolicy(attempts=2, initial=0.01, max=0.02, multiplier=2, jitter=0.0)


@pytest.fixture
async def receiving(rabbit_project: Project, broker: Broker) -> AsyncIterator[tuple[Route, MllpGateway]]:
    """The bed board's side: an MLLP gateway feeding a route of its own (queue ``bedboard.adt``), not consumed."""
    route = dataclasses.replace(rabbit_project.routes["adt-inbound"], name="bed-board-receiver",
                                source_queue="bedboard.adt", deliver=())
    prefix = rabbit_project.settings.queue_prefix
    await topology.declare(broker, RouteTopology.of(route, prefix), delivery_limit=10)
    gateway_broker = make_broker(rabbit_project.settings.broker_url)
    await gateway_broker.connect()
    gateway = MllpGateway(MllpListener(name="bed-board", port=0, queue=route.source_queue), gateway_broker,
                          rabbit_project.settings, route, confirm_timeout=10.0, drain_timeout=5.0)
    await gateway.start()
    yield route, gateway
    await gateway.stop()
    await gateway_broker.close()
    await topology.delete(broker, Topology.of([route], prefix))


async def run_engine(project: Project, port: int) -> Engine:
    bed_board = ConnectorSpec("bed-board", "mllp", {"host": "127.0.0.1", "port": port, "timeout": 2,
                                                    "sending_application": "MIDDLEWARE", "sending_facility": "GHH",
                                                    "receiving_application": "BEDBOARD"}, retry=FAST)
    engine = Engine(project, connector_specs={"bed-board": bed_board}, gateways=False)
    await engine.start()
    return engine


async def publish_sample(broker: Broker, project: Project, name: str) -> None:
    queue = naming.inbound_queue(project.routes["adt-inbound"].source_queue, project.settings.queue_prefix)
    await broker.publish(OutgoingMessage((SAMPLES / name).read_bytes(), correlation_id=f"it-{name}"), queue=queue)


async def wait_message(broker: Broker, queue: str, timeout: float = 20.0) -> IncomingMessage:
    """The next message on ``queue`` (acked), waiting for it up to ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        message = await broker.get(queue)
        if message is not None:
            await message.ack()
            return message
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing arrived on {queue}")


async def test_an_admission_arrives_at_the_receiving_route_as_an_a01_with_the_same_patient(
        rabbit_project: Project, broker: Broker, receiving: tuple[Route, MllpGateway]) -> None:
    route, gateway = receiving
    engine = await run_engine(rabbit_project, gateway.port)
    try:
        await publish_sample(broker, rabbit_project, "a01-admit.hl7")
        queue = naming.inbound_queue(route.source_queue, rabbit_project.settings.queue_prefix)
        raw = (await wait_message(broker, queue)).body
    finally:
        await engine.stop()
    message = hl7v2.parse(raw)
    assert message.message_type == "ADT^A01"
    assert message.get("MSH-3") == "MIDDLEWARE" and message.get("MSH-5") == "BEDBOARD"
    [original] = transform(rabbit_project.routes["adt-inbound"], (SAMPLES / "a01-admit.hl7").read_bytes()).events
    assert message.get("MSH-10") == control_id(original["id"])
    [received] = transform(route, raw).events  # what the bed board reads is what we had
    assert received["data"] == original["data"]


async def test_an_ae_from_the_receiver_dead_letters_the_event_with_its_text(
        rabbit_project: Project, broker: Broker) -> None:
    receiver = await Receiver(lambda m: ack(m, "AE", "unknown ward WARD7")).start()
    engine = await run_engine(rabbit_project, receiver.port)
    try:
        await publish_sample(broker, rabbit_project, "a01-admit.hl7")
        dlq = naming.dead_letter_queue("adt-inbound", rabbit_project.settings.queue_prefix)
        letter = DeadLetter.from_message(await wait_message(broker, dlq))
    finally:
        await engine.stop()
        await receiver.stop()
    assert letter.stage == "deliver"
    assert letter.connector == "bed-board"
    assert "answered AE: unknown ward WARD7" in letter.error
    assert len(receiver.received) == 1  # not retried



async def test_an_event_without_a_template_dead_letters_with_the_reason_and_is_not_sent(
        rabbit_project: Project, broker: Broker) -> None:
    receiver = await Receiver(lambda m: ack(m, "AA")).start()
    engine = await run_engine(rabbit_project, receiver.port)
    try:
        await publish_sample(broker, rabbit_project, "a40-merge.hl7")  # patient.merged: no built-in template
        dlq = naming.dead_letter_queue("adt-inbound", rabbit_project.settings.queue_prefix)
        letter = DeadLetter.from_message(await wait_message(broker, dlq))
    finally:
        await engine.stop()
        await receiver.stop()
    assert letter.stage == "deliver" and letter.connector == "bed-board"
    assert "no HL7 template for event type 'patient.merged'" in letter.error
    assert letter.attempts == 1
    assert receiver.received == []


async def test_a_deliver_entrys_when_and_map_shape_what_the_template_writes(
        rabbit_project: Project, broker: Broker, receiving: tuple[Route, MllpGateway]) -> None:
    route, gateway = receiving
    outbound = Outbound(when=compile_when({"type": "patient.admitted"}),
                        map=compile_map({"patient.mrn": "data.patient.mrn",
                                         "patient.name.family": "data.patient.name.given",  # visible in PID-5.1
                                         "encounter.location.bed": "data.encounter.location.bed"}))
    adt = rabbit_project.routes["adt-inbound"]
    project = dataclasses.replace(rabbit_project, routes={
        **rabbit_project.routes, "adt-inbound": dataclasses.replace(adt, deliver=(DeliveryRule("bed-board",
                                                                                               outbound=outbound),))})
    engine = await run_engine(project, gateway.port)
    queue = naming.inbound_queue(route.source_queue, rabbit_project.settings.queue_prefix)
    try:
        await publish_sample(broker, rabbit_project, "a08-update.hl7")  # not patient.admitted: skipped
        await publish_sample(broker, rabbit_project, "a01-admit.hl7")
        raw = (await wait_message(broker, queue)).body
        await asyncio.sleep(0.5)
        assert await broker.get(queue) is None  # the A08 was not sent
    finally:
        await engine.stop()
    message = hl7v2.parse(raw)
    assert message.message_type == "ADT^A01"
    assert (message.get("PID-3.1"), message.get("PID-5.1"), message.get("PV1-3.3")) == ("MRN-4711", "Anna", "B")
    assert message.get("PID-7") is None  # not in the map, so not sent
