"""Several broker URLs (the nodes of a cluster) on the real RabbitMQ: a node that does not answer is
skipped at connect, and when the connected node goes away the adapter reconnects to the next one, its
consumer restored, nothing lost. The "node" that goes away is a TCP relay in front of the local RabbitMQ,
closed with its connections (what the client sees when a node stops); tests/cluster/cluster.sh and
bench/cluster.py do the same with a real 3-node cluster."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
from yarl import URL

from middleware.broker import IncomingMessage, OutgoingMessage, amqp, make_broker
from middleware.broker.amqp import AmqpBroker
from middleware.broker.failover import split_urls
from middleware.errors import BrokerError

pytestmark = pytest.mark.rabbitmq


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Relay:
    """A TCP relay to RabbitMQ: a node that can go away (listener and every connection closed)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.target)
        self.writers |= {client_writer, server_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()  # like a node that stops: connections reset
        await self.server.wait_closed()


@pytest.fixture
async def relay(amqp_url: str) -> AsyncIterator[Relay]:
    url = URL(amqp_url)
    node = Relay((url.host or "127.0.0.1", url.port or 5672))
    await node.start()
    yield node
    if node.server is not None and node.server.is_serving():
        await node.stop()


def via(amqp_url: str, port: int) -> str:
    return str(URL(amqp_url).with_host("127.0.0.1").with_port(port))


def test_a_url_list_is_split_on_commas() -> None:
    assert split_urls("amqp://a:1/, amqp://b:2/,") == ["amqp://a:1/", "amqp://b:2/"]
    assert split_urls("amqp://guest:guest@localhost:5672/") == ["amqp://guest:guest@localhost:5672/"]
    with pytest.raises(ValueError):
        split_urls(" , ")


async def test_a_dead_node_first_in_the_list_is_skipped(amqp_url: str, queue_prefix: str) -> None:
    dead = via(amqp_url, free_port())  # nothing listens there
    broker = make_broker(f"{dead},{amqp_url}")
    await broker.connect()
    queue = f"{queue_prefix}failover.first"
    try:
        assert isinstance(broker, AmqpBroker) and broker.connected
        assert broker.node.endswith(f":{URL(amqp_url).port or 5672}/")
        await broker.declare_queue(queue)
        await broker.publish(OutgoingMessage(body=b"hello", message_id="m1"), queue=queue)
        assert (await broker.queue_info(queue)).messages == 1
    finally:
        await broker.delete_queue(queue)
        await broker.close()


async def test_a_node_that_takes_the_connection_but_never_answers_is_skipped(
        amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster node was seen to accept TCP and never answer the AMQP handshake while another node
    stopped: each connection attempt is bounded, so the adapter moves on to the next node."""
    monkeypatch.setattr(amqp, "CONNECT_TIMEOUT_SECONDS", 0.5)
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # keeps the connection open, says nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    broker = make_broker(f"{via(amqp_url, port)},{amqp_url}")
    try:
        await asyncio.wait_for(broker.connect(), 10)
        assert isinstance(broker, AmqpBroker) and broker.connected and held
        assert broker.node.endswith(f":{URL(amqp_url).port or 5672}/")
    finally:
        await broker.close()
        for writer in held:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def test_every_node_dead_is_a_broker_error_naming_the_check(amqp_url: str) -> None:
    urls = ",".join(via(amqp_url, free_port()) for _ in range(2))
    with pytest.raises(BrokerError) as raised:
        await make_broker(urls).connect()
    assert "cannot connect to RabbitMQ" in str(raised.value)


async def test_when_the_node_goes_away_it_reconnects_to_the_next_and_its_consumer_resumes(
        amqp_url: str, queue_prefix: str, relay: Relay) -> None:
    broker = make_broker(f"{via(amqp_url, relay.port)},{amqp_url}")
    await broker.connect()
    assert isinstance(broker, AmqpBroker)
    queue = f"{queue_prefix}failover.{uuid.uuid4().hex[:6]}"
    received: list[str] = []

    async def handle(message: IncomingMessage) -> None:
        received.append(str(message.message_id))
        await message.ack()

    try:
        assert broker.node.endswith(f":{relay.port}/")  # on the relay ("node 1")
        await broker.declare_queue(queue)
        consumer = await broker.consume(queue, handle)
        for n in range(50):
            await broker.publish(OutgoingMessage(body=b"x", message_id=f"before-{n}"), queue=queue)
        await relay.stop()  # node 1 goes away
        for n in range(50):  # publishes wait for the connection to come back (on node 2), then go on
            await broker.publish(OutgoingMessage(body=b"x", message_id=f"after-{n}"), queue=queue)
        deadline = asyncio.get_running_loop().time() + 30
        while len(set(received)) < 100 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert broker.node.endswith(f":{URL(amqp_url).port or 5672}/")  # now on "node 2"
        assert broker.connection_losses >= 1 and broker.connection_restores >= 1
        assert set(received) == {f"before-{n}" for n in range(50)} | {f"after-{n}" for n in range(50)}
        await consumer.close()
    finally:
        with contextlib.suppress(Exception):
            await broker.delete_queue(queue)
        await broker.close()
