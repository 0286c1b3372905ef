"""A broker that refuses publishes for a while (what a cluster node stop does until a queue's new leader
is elected) never costs a message a delivery attempt nor dead-letters it: the worker hands it back
uncounted and it goes through once the broker takes publishes again. On the real RabbitMQ: the
refusal is a real ``basic.nack``, from a queue with ``x-max-length: 0`` and ``x-overflow:
reject-publish`` in the publish's way."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from middleware.broker import amqp, naming
from middleware.broker.amqp import AmqpBroker
from middleware.broker.base import Broker, OutgoingMessage
from middleware.delivery import Connector, Delivery
from middleware.delivery.base import ConnectorSpec, RetryPolicy
from middleware.errors import DeliveryError
from middleware.observe import Metrics
from middleware.project import Project
from middleware.workers import DeliveryWorker, RouteWorker

from .conftest import REPO, counting_consumer

pytestmark = pytest.mark.rabbitmq
A04 = (REPO / "samples" / "adt-inbound" / "a04-register.hl7").read_bytes()
ROUTE = "adt-inbound"
LIMIT = 1  # the first return of a message would be its last allowed delivery: counting one fails the test


@pytest.fixture(autouse=True)
def short_patience(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amqp, "PUBLISH_RETRY_SECONDS", 0.5)  # refused this long: handed back
    monkeypatch.setattr(amqp, "PUBLISH_RETRY_STEP", 0.1)


@pytest.fixture
async def extra_queues(broker: Broker) -> AsyncIterator[list[str]]:
    """Queues a test declares outside the project's topology; deleted afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        await broker.delete_queue(name)


async def refusing_queue(broker: Broker, name: str) -> None:
    """A queue that nacks every message published to it (classic, full at 0 messages, reject-publish)."""
    assert isinstance(broker, AmqpBroker)
    await broker.channel.declare_queue(name, durable=True, arguments={
        "x-queue-type": "classic", "x-max-length": 0, "x-overflow": "reject-publish"})


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        met = condition()
        if await met if inspect.isawaitable(met) else met:
            return
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def depth(broker: Broker, queue: str) -> int:
    return (await broker.queue_info(queue)).messages


async def test_route_worker_refused_event_publishes_hand_the_message_back_uncounted(
        rabbit_project: Project, broker: Broker, extra_queues: list[str]) -> None:
    route = rabbit_project.routes[ROUTE]
    prefix = rabbit_project.settings.queue_prefix
    dlq, inbound = naming.dead_letter_queue(ROUTE, prefix), naming.inbound_queue(route.source_queue, prefix)
    exchange, delivery = naming.events_exchange(prefix), naming.delivery_queue(ROUTE, "case-management", prefix)
    await broker.declare_queue(dlq, kind="dead-letter")
    await broker.declare_queue(inbound, kind="work", dead_letter_to=dlq, delivery_limit=LIMIT)
    await broker.declare_exchange(exchange)
    await broker.declare_queue(delivery, kind="work", dead_letter_to=dlq, delivery_limit=LIMIT)
    await broker.bind(delivery, exchange, f"{ROUTE}.#")
    blocker = f"{prefix}refusing"
    extra_queues.append(blocker)
    await refusing_queue(broker, blocker)
    await broker.bind(blocker, exchange, f"{ROUTE}.#")  # every event publish of the route is nacked
    worker = RouteWorker(route, broker, Metrics(), prefix=prefix, delivery_limit=LIMIT)
    consumer, counts = await counting_consumer(broker, inbound, worker.handle)
    try:
        await broker.publish(OutgoingMessage(A04, correlation_id="corr-refused"), queue=inbound)
        await until(lambda: len(counts) >= 3, "the refused message was not handed back and redelivered")
        await broker.delete_queue(blocker)  # the broker takes publishes again
        await until(lambda: depth(broker, delivery), "the event never reached its delivery queue")
        await until(lambda: _empty(broker, inbound), "the inbound message was not acked")
    finally:
        await consumer.close()
    assert set(counts) == {0}  # handed back each time, never counted
    assert (await broker.queue_info(dlq)).messages == 0
    event = await broker.get(delivery)
    assert event is not None and event.correlation_id == "corr-refused"
    await event.ack()


async def test_delivery_worker_refused_park_hands_the_message_back_uncounted(
        rabbit_project: Project, broker: Broker, extra_queues: list[str]) -> None:
    route = rabbit_project.routes[ROUTE]
    prefix = rabbit_project.settings.queue_prefix
    dlq, delivery = naming.dead_letter_queue(ROUTE, prefix), naming.delivery_queue(ROUTE, "case-management", prefix)
    delay = naming.delay_queue(ROUTE, "case-management", 5, prefix)
    await broker.declare_queue(dlq, kind="dead-letter")
    await broker.declare_queue(delivery, kind="work", dead_letter_to=dlq, delivery_limit=LIMIT)
    extra_queues.append(delay)
    await refusing_queue(broker, delay)  # parking there is nacked
    retry = RetryPolicy(attempts=1, delays=(5,))
    worker = DeliveryWorker(route, _SinkDown(ConnectorSpec("case-management", "sink-down", {}, retry=retry)),
                            broker, Metrics(), prefix=prefix, delivery_limit=LIMIT)
    consumer, counts = await counting_consumer(broker, delivery, worker.handle)
    try:
        event = OutgoingMessage(b'{"id": "evt-1"}', {"x-mw-route": ROUTE, "x-mw-event-type": "patient.registered"},
                                "corr-evt", "evt-1", "application/cloudevents+json")
        await broker.publish(event, queue=delivery)
        await until(lambda: len(counts) >= 3, "the message whose parking was refused was not handed back")
        await broker.delete_queue(delay)  # the delay queue as the engine declares it: parking works again
        await broker.declare_queue(delay, kind="delay", dead_letter_to=delivery, message_ttl=5)
        await until(lambda: depth(broker, delay), "the message was never parked")
    finally:
        await consumer.close()
    assert set(counts) == {0}
    assert (await broker.queue_info(dlq)).messages == 0
    parked = await broker.get(delay)
    assert parked is not None and parked.message_id == "evt-1"
    await parked.ack()


async def _empty(broker: Broker, queue: str) -> bool:
    return await depth(broker, queue) == 0


class _SinkDown(Connector):
    """Every send fails as a sink that is down does (retryable): the worker parks the event."""

    async def send(self, delivery: Delivery) -> None:
        raise DeliveryError("sink down (simulated)", retryable=True, status=503)



async def test_a_hand_back_the_broker_refuses_requeues_instead_of_holding_the_message(
        rabbit_project: Project, broker: Broker) -> None:
    """If the confirmed copy of a hand-back is refused, the original goes back at once (counted once)
    rather than staying unacked on a channel that lives on, taking a prefetch slot."""
    queue = naming.inbound_queue("refused-hand-back", rabbit_project.settings.queue_prefix)
    await broker.declare_queue(queue, kind="work", delivery_limit=5)
    try:
        await broker.publish(OutgoingMessage(b"body", message_id="m-1"), queue=queue)
        message = await broker.get(queue)
        assert isinstance(message, amqp.AmqpIncoming)
        message._queue = f"{queue}.missing"  # the copy is unroutable: the broker returns it (mandatory)
        await message.hand_back()
        again = await broker.get(queue)
        assert again is not None and again.message_id == "m-1" and again.delivery_count == 1
        await again.ack()
    finally:
        await broker.delete_queue(queue)
