"""The amqp connector on the real RabbitMQ: confirmed publish with the ids and headers kept, routing-key
templates, unroutable and missing exchanges dead-letter (not retried), a broker that is down is retried,
and a lost connection is replaced on the next send. Everything declared uses the test's prefix and is deleted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from middleware.broker import naming
from middleware.broker.base import Broker, OutgoingMessage
from middleware.delivery import ConnectorSpec, Delivery, RetryPolicy
from middleware.delivery.amqp import AmqpConnector, routing_key
from middleware.delivery.base import connector_problems
from middleware.engine import Engine
from middleware.errors import DeliveryError
from middleware.project import Project

from .conftest import REPO
from .test_amqps import amqps as tls_terminator  # noqa: F401  (a fixture: mutual TLS in front of RabbitMQ)

pytestmark = pytest.mark.rabbitmq

FAST = RetryPolicy(attempts=2, initial=0.01, max=0.02, multiplier=2, jitter=0.0)
EVENT = {"specversion": "1.0", "id": "ev-amqp-1", "type": "patient.admitted.v1", "subject": "Patient/MRN-1",
         "source": "urn:middleware:route:adt-inbound", "correlationid": "corr-amqp",
         "data": {"patient": {"mrn": "MRN-1"}}}
DELIVERY = Delivery(json.dumps(EVENT).encode(), "ev-amqp-1", "corr-amqp", "adt-inbound", "patient.admitted.v1")


@pytest.fixture
async def channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(amqp_url)
    yield await connection.channel()
    await connection.close()


@pytest.fixture
async def downstream(channel: AbstractChannel, queue_prefix: str) -> AsyncIterator[dict[str, str]]:
    """A topic exchange with one queue bound for ``patient.#`` (the test's prefix); deleted afterwards."""
    exchange = await channel.declare_exchange(f"{queue_prefix}downstream", aio_pika.ExchangeType.TOPIC,
                                              auto_delete=False)
    queue = await channel.declare_queue(f"{queue_prefix}downstream.patients", durable=False)
    await queue.bind(exchange, "patient.#")
    yield {"exchange": exchange.name, "queue": queue.name}
    await queue.delete(if_unused=False, if_empty=False)
    await exchange.delete()


@pytest.fixture
async def connectors(amqp_url: str) -> AsyncIterator[Callable[..., AmqpConnector]]:
    made: list[AmqpConnector] = []

    def make(**options: Any) -> AmqpConnector:
        connector = AmqpConnector(ConnectorSpec("downstream", "amqp", {"url": amqp_url, "timeout": 3, **options},
                                                retry=FAST))
        made.append(connector)
        return connector

    yield make
    for connector in made:
        await connector.close()


async def take(channel: AbstractChannel, queue: str, tries: int = 50) -> AbstractIncomingMessage:
    for _ in range(tries):
        message = await (await channel.get_queue(queue, ensure=False)).get(fail=False)
        if message is not None:
            await message.ack()
            return message
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing arrived on {queue}")


async def test_an_event_is_published_with_confirms_and_keeps_its_ids_and_headers(
        connectors: Callable[..., AmqpConnector], downstream: dict[str, str], channel: AbstractChannel) -> None:
    connector = connectors(exchange=downstream["exchange"], headers={"x-site": "north"})
    await connector.start()
    await connector.send(DELIVERY)
    message = await take(channel, downstream["queue"])
    assert message.body == DELIVERY.body
    assert message.routing_key == "patient.admitted.v1"
    assert message.message_id == "ev-amqp-1"
    assert message.correlation_id == "corr-amqp"
    assert message.type == "patient.admitted.v1"
    assert message.content_type == "application/cloudevents+json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers["x-mw-event-type"] == "patient.admitted.v1"
    assert message.headers["x-correlation-id"] == "corr-amqp"
    assert message.headers["x-site"] == "north"


async def test_the_routing_key_is_a_template_over_the_event(
        connectors: Callable[..., AmqpConnector], downstream: dict[str, str], channel: AbstractChannel) -> None:
    connector = connectors(exchange=downstream["exchange"], routing_key="patient.{data.patient.mrn}")
    await connector.send(DELIVERY)
    assert (await take(channel, downstream["queue"])).routing_key == "patient.MRN-1"
    assert routing_key("{subject}/{source}", EVENT) == "Patient/MRN-1/urn:middleware:route:adt-inbound"


async def test_the_default_exchange_routes_to_the_queue_named_by_the_key(
        connectors: Callable[..., AmqpConnector], downstream: dict[str, str], channel: AbstractChannel) -> None:
    connector = connectors(exchange="", routing_key=downstream["queue"])
    await connector.send(DELIVERY)
    assert (await take(channel, downstream["queue"])).message_id == "ev-amqp-1"


async def test_unroutable_is_not_retried_and_the_connector_keeps_working(
        connectors: Callable[..., AmqpConnector], downstream: dict[str, str], channel: AbstractChannel) -> None:
    connector = connectors(exchange=downstream["exchange"], routing_key="{data.patient.mrn}")  # bound: patient.#
    with pytest.raises(DeliveryError, match="unroutable") as caught:
        await connector.send(DELIVERY)
    assert not caught.value.retryable
    assert "MRN-1" in caught.value.message  # the routing key, to see what was tried
    connector.routing_key = "patient.x"
    await connector.send(DELIVERY)
    assert (await take(channel, downstream["queue"])).routing_key == "patient.x"


async def test_a_missing_exchange_is_not_retried_and_the_next_send_opens_a_new_channel(
        connectors: Callable[..., AmqpConnector], downstream: dict[str, str], queue_prefix: str,
        channel: AbstractChannel) -> None:
    connector = connectors(exchange=f"{queue_prefix}no-such-exchange")
    with pytest.raises(DeliveryError, match=r"closed the channel \(ChannelNotFoundEntity") as caught:
        await connector.send(DELIVERY)
    assert not caught.value.retryable
    connector.exchange_name = downstream["exchange"]
    connector._exchange = None
    await connector.send(DELIVERY)
    assert (await take(channel, downstream["queue"])).message_id == "ev-amqp-1"


async def test_a_missing_routing_key_value_is_not_retried(connectors: Callable[..., AmqpConnector],
                                                         downstream: dict[str, str]) -> None:
    connector = connectors(exchange=downstream["exchange"], routing_key="patient.{data.encounter.class}")
    with pytest.raises(DeliveryError, match=r"has no data\.encounter\.class") as caught:
        await connector.send(DELIVERY)
    assert not caught.value.retryable


async def test_a_broker_that_is_down_is_retryable_and_start_does_not_fail() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    connector = AmqpConnector(ConnectorSpec("down", "amqp", {"url": f"amqp://guest:guest@127.0.0.1:{port}/",
                                                             "exchange": "x", "timeout": 2}))
    await connector.start()  # logged, not raised: the engine starts and each send tries again
    with pytest.raises(DeliveryError, match="cannot connect") as caught:
        await connector.send(DELIVERY)
    assert caught.value.retryable
    await connector.close()


async def test_a_lost_connection_is_replaced_on_the_next_send(
        connectors: Callable[..., AmqpConnector], downstream: dict[str, str], channel: AbstractChannel) -> None:
    connector = connectors(exchange=downstream["exchange"])
    await connector.send(DELIVERY)
    assert connector._connection is not None
    await connector._connection.close()  # as when RabbitMQ restarts or the network drops
    await connector.send(DELIVERY)
    assert len([await take(channel, downstream["queue"]) for _ in range(2)]) == 2


def test_tls_with_a_plain_amqp_url_is_reported_by_validate() -> None:
    [(key, message)] = connector_problems("amqp", {"url": "amqp://h/", "exchange": "x", "tls": {"verify": True}})
    assert key == ("tls",)
    assert "amqps://" in message


async def test_the_engine_delivers_a_routes_events_to_the_exchange(
        rabbit_project: Project, broker: Broker, downstream: dict[str, str], channel: AbstractChannel,
        amqp_url: str) -> None:
    bus = ConnectorSpec("bed-board", "amqp", {"url": amqp_url, "exchange": downstream["exchange"]}, retry=FAST)
    engine = Engine(rabbit_project, connector_specs={"bed-board": bus}, gateways=False)
    await engine.start()
    try:
        queue = naming.inbound_queue(rabbit_project.routes["adt-inbound"].source_queue,
                                     rabbit_project.settings.queue_prefix)
        raw = (REPO / "samples" / "adt-inbound" / "a01-admit.hl7").read_bytes()
        await broker.publish(OutgoingMessage(raw, correlation_id="it-amqp"), queue=queue)
        message = await take(channel, downstream["queue"], tries=400)
    finally:
        await engine.stop()
    event = json.loads(message.body)
    assert event["type"] == message.type == message.routing_key == "patient.admitted.v1"
    assert message.message_id == event["id"]
    assert message.correlation_id == "it-amqp"
    assert message.headers["x-mw-route"] == "adt-inbound"


async def test_a_document_made_by_an_outbound_map_keeps_its_content_type_and_the_events_type_as_key(
        connectors: Callable[..., AmqpConnector], downstream: dict[str, str], channel: AbstractChannel) -> None:
    connector = connectors(exchange=downstream["exchange"])
    mapped = Delivery(b'{"mrn": "MRN-1"}', "ev-amqp-2", "corr-amqp", "adt-inbound", "patient.admitted.v1",
                      content_type="application/json")
    await connector.send(mapped)
    message = await take(channel, downstream["queue"])
    assert message.body == b'{"mrn": "MRN-1"}'
    assert message.content_type == "application/json"
    assert message.routing_key == "patient.admitted.v1"


async def test_amqps_with_the_connectors_tls_publishes_through_a_tls_listener(
        tls_terminator: tuple[str, Path],  # noqa: F811  (the fixture imported above)
        downstream: dict[str, str], channel: AbstractChannel) -> None:
    url, certs = tls_terminator
    connector = AmqpConnector(ConnectorSpec("secure", "amqp", {
        "url": url, "exchange": downstream["exchange"], "timeout": 5,
        "tls": {"ca_file": str(certs / "ca.pem"), "cert_file": str(certs / "client.pem")}}))
    try:
        await connector.send(DELIVERY)
    finally:
        await connector.close()
    assert (await take(channel, downstream["queue"])).message_id == "ev-amqp-1"
    untrusted = AmqpConnector(ConnectorSpec("untrusted", "amqp", {"url": url, "exchange": "x", "timeout": 5}))
    with pytest.raises(DeliveryError, match="server certificate not trusted") as caught:
        await untrusted.send(DELIVERY)
    await untrusted.close()
    assert not caught.value.retryable  # retrying cannot fix a missing CA
