"""Delay queues, on every adapter: a message published to one goes back to its target queue after
the queue's TTL, unchanged and in publish order (DESIGN promise 5: parking a delivery on the broker)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from middleware.broker import make_broker
from middleware.broker.base import Broker, IncomingMessage, OutgoingMessage
from tests.contract import test_broker_contract as contract
from tests.contract.test_broker_contract import Topology, depth, eventually

broker_url = contract.broker_url  # every adapter, as in the broker contract
broker = contract.broker

TTL = 1.0


async def _consume_into(client: Broker, queue: str, seen: list[tuple[float, IncomingMessage]]) -> object:
    async def handler(message: IncomingMessage) -> None:
        seen.append((time.monotonic(), message))
        await message.ack()

    return await client.consume(queue, handler)


async def test_a_delayed_message_returns_to_its_queue_after_the_ttl_unchanged(
        broker: tuple[Broker, Topology]) -> None:
    client, topo = broker
    target = await topo.queue("work", kind="work")
    delay = await topo.queue("work.delay.1", kind="delay", dead_letter_to=target, message_ttl=TTL)
    seen: list[tuple[float, IncomingMessage]] = []
    consumer = await _consume_into(client, target, seen)
    published = time.monotonic()
    await client.publish(OutgoingMessage(b"\x00event", {"x-mw-attempts": 3, "x-mw-last-error": "HTTP 503"},
                                         "corr-1", "evt-1", "application/cloudevents+json"), queue=delay)
    await asyncio.sleep(TTL / 2)
    assert seen == []  # still waiting
    await eventually(lambda: _true(bool(seen)))
    returned_at, message = seen[0]
    assert returned_at - published >= TTL * 0.9
    assert message.body == b"\x00event"
    assert message.headers["x-mw-attempts"] == 3 and message.headers["x-mw-last-error"] == "HTTP 503"
    assert (message.correlation_id, message.message_id) == ("corr-1", "evt-1")
    assert message.content_type == "application/cloudevents+json"
    assert message.delivery_count == 0  # a fresh delivery: its wait counts nothing toward the delivery limit
    await eventually(lambda: _is_empty(client, delay))
    await consumer.cancel()  # type: ignore[attr-defined]
    await consumer.close()  # type: ignore[attr-defined]


async def test_delayed_messages_return_in_publish_order(broker: tuple[Broker, Topology]) -> None:
    client, topo = broker
    target = await topo.queue("work", kind="work")
    delay = await topo.queue("work.delay.1", kind="delay", dead_letter_to=target, message_ttl=TTL)
    seen: list[tuple[float, IncomingMessage]] = []
    consumer = await _consume_into(client, target, seen)
    for n in range(20):
        await client.publish(OutgoingMessage(str(n).encode()), queue=delay)
    await eventually(lambda: _true(len(seen) == 20))
    assert [int(m.body) for _, m in seen] == list(range(20))
    await consumer.close()  # type: ignore[attr-defined]


async def test_a_delay_queue_counts_its_waiting_messages(broker: tuple[Broker, Topology]) -> None:
    client, topo = broker
    target = await topo.queue("work", kind="work")
    delay = await topo.queue("work.delay.30", kind="delay", dead_letter_to=target, message_ttl=30)
    consumer = await _consume_into(client, target, [])
    for n in range(3):
        await client.publish(OutgoingMessage(str(n).encode()), queue=delay)
    await asyncio.sleep(0.3)  # the embedded broker's mover has looked at them meanwhile
    assert await depth(client, delay) == 3  # what `status` shows as parked
    assert await depth(client, target) == 0
    await consumer.close()  # type: ignore[attr-defined]


async def _true(value: bool) -> bool:
    return value


async def _is_empty(client: Broker, queue: str) -> bool:
    return await depth(client, queue) == 0


async def test_a_delayed_message_on_the_spool_survives_a_restart_and_keeps_its_due_time(tmp_path: Path) -> None:
    url = f"filesystem://{tmp_path}/broker"
    first = make_broker(url)
    await first.connect()
    await first.declare_queue("work", kind="work")
    await first.declare_queue("work.delay.1", kind="delay", dead_letter_to="work", message_ttl=TTL)
    consumer = await _consume_into(first, "work", [])  # this engine's mover holds the message until due
    published = time.monotonic()
    await first.publish(OutgoingMessage(b"parked", message_id="evt-1"), queue="work.delay.1")
    await asyncio.sleep(TTL / 4)
    await consumer.close()  # type: ignore[attr-defined]
    await first.close()  # before it was due: it goes back to the delay queue, not to "work"
    second = make_broker(url)
    await second.connect()
    await second.declare_queue("work", kind="work")
    await second.declare_queue("work.delay.1", kind="delay", dead_letter_to="work", message_ttl=TTL)
    seen: list[tuple[float, IncomingMessage]] = []
    consumer = await _consume_into(second, "work", seen)
    try:
        await eventually(lambda: _true(bool(seen)))
        assert [m.message_id for _, m in seen] == ["evt-1"]
        assert TTL * 0.9 <= seen[0][0] - published < TTL * 3  # due when it was first due, not a TTL later
    finally:
        await consumer.close()  # type: ignore[attr-defined]
        await second.close()
