"""Coalesced frame writes (middleware.broker.frames) on the real RabbitMQ: concurrent publishes share
socket writes and every message arrives, in order per publisher; a connection cut mid-stream loses
nothing and the reconnected connection coalesces too."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from middleware.broker import IncomingMessage, OutgoingMessage
from middleware.broker.amqp import AmqpBroker

from .test_broker_failover import Relay, relay, via  # noqa: F401  (relay: the fixture)

pytestmark = pytest.mark.rabbitmq

PUBLISHERS = 20


async def publish_all(broker: AmqpBroker, queue: str, each: int, cut: asyncio.Event | None = None,
                      cut_after: int = 0) -> None:
    """``PUBLISHERS`` tasks publishing ``each`` messages one after another (the engine's route workers)."""
    confirmed = 0

    async def publisher(p: int) -> None:
        nonlocal confirmed
        for n in range(each):
            await broker.publish(OutgoingMessage(body=b"x" * 200, message_id=f"{p}-{n}"), queue=queue)
            confirmed += 1
            if cut is not None and confirmed == cut_after:
                cut.set()

    await asyncio.gather(*(publisher(p) for p in range(PUBLISHERS)))


async def consume_ids(broker: AmqpBroker, queue: str, expected: set[str]) -> list[str]:
    received: list[str] = []

    async def handle(message: IncomingMessage) -> None:
        received.append(str(message.message_id))
        await message.ack()

    consumer = await broker.consume(queue, handle, prefetch=50)
    deadline = asyncio.get_running_loop().time() + 30
    while not expected <= set(received) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    await consumer.close()
    return received


async def test_concurrent_publishes_share_socket_writes_and_all_arrive_in_order(
        amqp_url: str, queue_prefix: str) -> None:
    broker = AmqpBroker(amqp_url)
    await broker.connect()
    queue = f"{queue_prefix}coalesce.{uuid.uuid4().hex[:6]}"
    try:
        factory = broker.transport_factory
        assert factory is not None and factory.writer is not None
        await broker.declare_queue(queue)
        frames, writes = factory.writer.frames, factory.writer.writes
        await publish_all(broker, queue, 50)
        frames, writes = factory.writer.frames - frames, factory.writer.writes - writes
        # without coalescing every frame is a write of its own; how many share one depends on the timing of the
        # confirms (the machine's load), but the first turn alone queues the 20 publishers' first publishes
        assert frames >= PUBLISHERS * 50 and writes < frames - PUBLISHERS // 2, (frames, writes)
        expected = {f"{p}-{n}" for p in range(PUBLISHERS) for n in range(50)}
        received = await consume_ids(broker, queue, expected)
        assert sorted(received) == sorted(expected)  # each once
        for p in range(PUBLISHERS):
            mine = [int(i.split("-")[1]) for i in received if i.startswith(f"{p}-")]
            assert mine == sorted(mine)
    finally:
        with contextlib.suppress(Exception):
            await broker.delete_queue(queue)
        await broker.close()


async def test_a_connection_cut_mid_stream_loses_nothing_and_the_new_connection_coalesces(
        amqp_url: str, queue_prefix: str, relay: Relay) -> None:  # noqa: F811  (the fixture)
    broker = AmqpBroker(via(amqp_url, relay.port))
    await broker.connect()
    queue = f"{queue_prefix}coalesce-cut.{uuid.uuid4().hex[:6]}"
    try:
        factory = broker.transport_factory
        assert factory is not None and factory.connections == 1
        await broker.declare_queue(queue)
        cut = asyncio.Event()

        async def cut_connection() -> None:
            await cut.wait()
            for writer in list(relay.writers):  # the connection resets; the relay still accepts the next
                writer.transport.abort()
            relay.writers.clear()

        cutter = asyncio.create_task(cut_connection())
        await publish_all(broker, queue, 50, cut, cut_after=300)  # every publish returns: confirmed once back
        await cutter
        assert broker.connection_losses == 1 and broker.connection_restores >= 1
        assert factory.connections >= 2 and factory.writer is not None
        # the new connection's writer carried the 700-odd publishes after the cut, sharing writes too
        assert factory.writer.frames > 500 and factory.writer.writes < factory.writer.frames, (
            factory.writer.frames, factory.writer.writes)
        expected = {f"{p}-{n}" for p in range(PUBLISHERS) for n in range(50)}
        received = await consume_ids(broker, queue, expected)
        assert set(received) == expected  # at least once: a publish cut before its confirm may be there twice
    finally:
        with contextlib.suppress(Exception):
            await broker.delete_queue(queue)
        await broker.close()
