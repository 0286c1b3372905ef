"""broker.tls on a real amqps:// connection: a TLS terminator made in the test (trustme certificates,
client certificates required) in front of the real RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme

from middleware.broker import make_broker
from middleware.broker.base import OutgoingMessage
from middleware.errors import BrokerError
from middleware.tls import TlsOptions

pytestmark = pytest.mark.rabbitmq


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def amqps(amqp_url: str, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """``(amqps:// URL, folder with ca.pem and client.pem)``: TLS on a local port, forwarded to RabbitMQ."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("middleware-client").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as a hardened RabbitMQ listener would be
    plain = urlsplit(amqp_url)
    tasks: set[asyncio.Task[None]] = set()

    async def forward(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        broker_reader, broker_writer = await asyncio.open_connection(plain.hostname, plain.port or 5672)
        for task in (asyncio.create_task(_pipe(client_reader, broker_writer)),
                     asyncio.create_task(_pipe(broker_reader, client_writer))):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(forward, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    yield f"amqps://{plain.username}:{plain.password}@127.0.0.1:{port}/", tmp_path
    server.close()
    for task in list(tasks):
        task.cancel()
    with contextlib.suppress(Exception):
        await server.wait_closed()


async def test_amqps_with_broker_tls_publishes_and_consumes(amqps: tuple[str, Path], queue_prefix: str) -> None:
    url, certs = amqps
    broker = make_broker(url, TlsOptions(ca_file=str(certs / "ca.pem"), cert_file=str(certs / "client.pem")))
    await broker.connect()
    queue = f"{queue_prefix}tls"
    try:
        await broker.declare_queue(queue)
        await broker.publish(OutgoingMessage(body=b"over tls", headers={}), queue=queue)
        for _ in range(50):
            if (message := await broker.get(queue)) is not None:
                break
            await asyncio.sleep(0.05)
        assert message is not None and message.body == b"over tls"
        await message.ack()
    finally:
        await broker.delete_queue(queue)
        await broker.close()


async def test_amqps_without_our_ca_is_refused_with_the_reason(amqps: tuple[str, Path]) -> None:
    url, certs = amqps
    broker = make_broker(url, TlsOptions(cert_file=str(certs / "client.pem")))
    with pytest.raises(BrokerError, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncio.wait_for(broker.connect(), 20)


async def test_amqps_without_a_client_certificate_is_refused(amqps: tuple[str, Path]) -> None:
    url, certs = amqps
    broker = make_broker(url, TlsOptions(ca_file=str(certs / "ca.pem")))
    with pytest.raises(BrokerError, match="cannot connect to RabbitMQ") as raised:
        await asyncio.wait_for(broker.connect(), 20)
    assert "broker.tls" in str(raised.value)  # the server just hangs up: the hint names the likely cause
