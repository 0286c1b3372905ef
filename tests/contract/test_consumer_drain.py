"""The consumer stop contract, on every adapter: cancel stops new deliveries while running handlers
can still ack; close hands back what handlers still hold without counting a failed delivery."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from middleware.broker.base import Broker, IncomingMessage, OutgoingMessage

from . import test_broker_contract as contract
from .test_broker_contract import Topology, depth, eventually

broker_url, broker = contract.broker_url, contract.broker  # the contract's fixtures: every adapter


async def _get(client: Broker, queue: str) -> IncomingMessage | None:
    for _ in range(150):
        if (message := await client.get(queue)) is not None:
            return message
        await asyncio.sleep(0.02)
    return None


async def test_cancel_lets_running_handlers_finish_and_ack(broker: tuple[Broker, Topology]) -> None:
    """After cancel() the handlers in flight still ack on their channel: nothing goes back."""
    client, topo = broker
    queue = await topo.queue("work")
    release = asyncio.Event()
    started: list[bytes] = []
    acked: list[bytes] = []

    async def slow(message: IncomingMessage) -> None:
        started.append(message.body)
        await release.wait()
        await message.ack()
        acked.append(message.body)

    for n in range(3):
        await client.publish(OutgoingMessage(f"m{n}".encode()), queue=queue)
    consumer = await client.consume(queue, slow, prefetch=3)
    await eventually(lambda: _true(len(started) == 3 and consumer.in_flight == 3))
    await consumer.cancel()
    await client.publish(OutgoingMessage(b"after-cancel"), queue=queue)
    release.set()
    await eventually(lambda: _true(len(acked) == 3 and consumer.in_flight == 0))
    await consumer.close()
    assert sorted(acked) == [b"m0", b"m1", b"m2"]
    await eventually(lambda: _is(depth(client, queue), 1))  # only the message published after cancel
    left = await _get(client, queue)
    assert left is not None and left.body == b"after-cancel" and left.delivery_count == 0
    await left.ack()


async def test_close_hands_back_held_messages_uncounted(broker: tuple[Broker, Topology]) -> None:
    """close() stops handlers that never finish; their messages return unchanged, not counted as a
    failed delivery, and never dead-lettered, even on their last allowed delivery."""
    client, topo = broker
    dlq = await topo.queue("dlq", kind="dead-letter")
    queue = await topo.queue("work", dead_letter_to=dlq, delivery_limit=1)
    await client.publish(OutgoingMessage(b"last", {"x-k": "w"}, "corr-l", "id-l"), queue=queue)
    failed = await _get(client, queue)
    assert failed is not None and failed.delivery_count == 0
    await failed.reject(requeue=True)  # a failed delivery: the next one is its last allowed one
    await client.publish(OutgoingMessage(b"fresh", {"x-k": "v"}, "corr-f", "id-f", "text/plain"), queue=queue)
    counts: dict[bytes, int] = {}
    cancelled: list[bytes] = []

    async def stuck(message: IncomingMessage) -> None:
        counts[message.body] = message.delivery_count
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(message.body)
            raise

    consumer = await client.consume(queue, stuck, prefetch=5)
    await eventually(lambda: _true(len(counts) == 2 and consumer.in_flight == 2))
    assert counts == {b"fresh": 0, b"last": 1}
    await consumer.cancel()
    await consumer.close()
    assert sorted(cancelled) == [b"fresh", b"last"] and consumer.in_flight == 0
    await eventually(lambda: _is(depth(client, queue), 2))
    back = {}
    for _ in range(2):
        message = await _get(client, queue)
        assert message is not None
        back[message.body] = message
    assert back[b"fresh"].delivery_count == 0  # a shutdown is not a failed delivery
    assert back[b"last"].delivery_count <= 1  # RabbitMQ: a fresh copy (0); embedded broker: unchanged
    fresh = back[b"fresh"]
    assert (fresh.headers["x-k"], fresh.correlation_id, fresh.message_id, fresh.content_type) == (
        "v", "corr-f", "id-f", "text/plain")
    assert back[b"last"].headers["x-k"] == "w" and back[b"last"].correlation_id == "corr-l"
    for message in back.values():
        await message.ack()
    assert await depth(client, dlq) == 0


async def test_close_is_idempotent_and_cancel_after_close_is_harmless(broker: tuple[Broker, Topology]) -> None:
    client, topo = broker
    queue = await topo.queue("work")

    async def ack(message: IncomingMessage) -> None:
        await message.ack()

    consumer = await client.consume(queue, ack, prefetch=1)
    await consumer.close()
    await consumer.close()
    await consumer.cancel()
    await client.publish(OutgoingMessage(b"x"), queue=queue)
    await asyncio.sleep(0.3)
    assert await depth(client, queue) == 1


async def _true(value: bool) -> bool:
    return value


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
