"""The MLLP gateway on the real RabbitMQ: ACK after confirm, AE + dead letter, AR, enhanced mode,
framing errors, idle timeout, many connections, and python-hl7's ``mllp_send`` as an independent client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from middleware.broker import naming
from middleware.broker.amqp import AmqpBroker
from middleware.broker.base import Broker, OutgoingMessage
from middleware.deadletter import DeadLetter
from middleware.ingest import MllpListener, MllpTls
from middleware.ingest.mllp import MllpGateway
from middleware.project import Project

from ..unit.test_mllp import Client, adt, frame, segments

pytestmark = pytest.mark.rabbitmq

REPO = Path(__file__).resolve().parents[2]
MLLP_SEND = Path(sys.executable).parent / "mllp_send"

Start = Callable[..., Awaitable[MllpGateway]]


class RecordingBroker(AmqpBroker):
    """The real adapter, noting when each publish was confirmed; ``gate`` can hold confirms back."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.confirmed: dict[str, float] = {}
        self.gate: asyncio.Event | None = None

    async def publish(self, message: OutgoingMessage, **kwargs: Any) -> None:
        await super().publish(message, **kwargs)
        if self.gate is not None:
            await self.gate.wait()
        self.confirmed[str(message.correlation_id)] = time.perf_counter()


class FailingBroker(AmqpBroker):
    """The real adapter whose publishes fail as when RabbitMQ is unreachable."""

    async def publish(self, message: OutgoingMessage, **kwargs: Any) -> None:
        from middleware.errors import BrokerError

        raise BrokerError("publish failed, connection lost: ConnectionError")


@pytest.fixture
async def start_gateway(rabbit_project: Project, broker: Broker) -> AsyncIterator[Start]:
    """Start gateways for the adt-inbound route on port 0, each on its own connection; stop them after.

    The ``broker`` fixture deletes the project's queues at the end.
    """
    started: list[tuple[MllpGateway, Broker]] = []
    route = rabbit_project.routes["adt-inbound"]

    async def start(broker_class: type[AmqpBroker] = RecordingBroker, **options: Any) -> MllpGateway:
        confirm_timeout = options.pop("confirm_timeout", 10.0)
        listener = MllpListener(**{"name": "test", "port": 0, "queue": route.source_queue, **options})
        gateway_broker = broker_class(rabbit_project.settings.broker_url)
        await gateway_broker.connect()
        gateway = MllpGateway(listener, gateway_broker, rabbit_project.settings, route,
                              confirm_timeout=confirm_timeout, drain_timeout=5.0)
        await gateway.start()
        started.append((gateway, gateway_broker))
        return gateway

    yield start
    for gateway, gateway_broker in started:
        await gateway.stop()
        await gateway_broker.close()


def inbound(project: Project) -> str:
    return naming.inbound_queue(project.routes["adt-inbound"].source_queue, project.settings.queue_prefix)


def dlq(project: Project) -> str:
    return naming.dead_letter_queue("adt-inbound", project.settings.queue_prefix)


async def drain(broker: Broker, queue: str) -> list[Any]:
    got = []
    while (message := await broker.get(queue)) is not None:
        await message.ack()
        got.append(message)
    return got


async def test_aa_after_confirm_echoes_msh10_and_body_is_byte_identical(
        start_gateway: Start, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start_gateway()
    client = await Client.connect(gateway.port)
    message = adt("CTRL-0001")
    ack = segments(await client.send(message))
    await client.close()
    assert ack["MSA"][1:3] == ["AA", "CTRL-0001"]
    assert ack["MSH"][9] == "ACK^A01^ACK"
    [got] = await drain(broker, inbound(rabbit_project))
    assert got.body == message
    assert got.correlation_id == "CTRL-0001"
    assert got.headers["x-mw-ingest"] == "mllp:test"
    assert got.content_type == "x-application/hl7-v2+er7"


async def test_garbage_gets_ae_with_err_and_raw_bytes_in_dead_letter_queue(
        start_gateway: Start, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start_gateway()
    client = await Client.connect(gateway.port)
    garbage = b"this is not HL7 \xff\xfe at all\rPID|1||X"
    ack = segments(await client.send(garbage))
    # a message whose MSH reads but whose body does not parse: AE echoes its control id
    broken = adt("BROKEN-1").replace(b"\rEVN|", b"\revn-broken|")
    ack2 = segments(await client.send(broken))
    await client.close()
    assert ack["MSA"][1:3] == ["AE", ""]
    assert ack["ERR"][3].split("^")[0] == "102" and ack["ERR"][4] == "E"
    assert "MSH" in ack["ERR"][7]  # the parse error's text, not the message's content
    assert ack2["MSA"][1:3] == ["AE", "BROKEN-1"]
    assert "segment 2" in ack2["MSA"][3]
    assert "Müller".encode() not in ack2["ERR"][7].encode("latin-1")
    letters = [DeadLetter.from_message(m) for m in await drain(broker, dlq(rabbit_project))]
    assert [d.body for d in letters] == [garbage, broken]
    assert {d.stage for d in letters} == {"parse"}
    assert {d.route for d in letters} == {"adt-inbound"}
    assert {d.error_class for d in letters} == {"ParseError"}
    assert {d.replay_queue for d in letters} == {inbound(rabbit_project)}
    assert letters[1].correlation_id == "BROKEN-1"
    assert letters[0].headers["x-mw-ingest"] == "mllp:test"
    assert (await broker.queue_info(inbound(rabbit_project))).messages == 0


async def test_ar_when_the_broker_is_unavailable(start_gateway: Start, broker: Broker,
                                                 rabbit_project: Project) -> None:
    failing = await start_gateway(FailingBroker)
    client = await Client.connect(failing.port)
    ack = segments(await client.send(adt("DOWN-1")))
    await client.close()
    assert ack["MSA"][1:3] == ["AR", "DOWN-1"]
    assert ack["ERR"][3].split("^")[0] == "207"
    # a gateway whose connection was closed under it answers AR too, and keeps serving
    closed = await start_gateway()
    await closed.broker.close()
    client = await Client.connect(closed.port)
    ack = segments(await client.send(adt("DOWN-2")))
    ack_garbage = segments(await client.send(b"garbage"))
    await client.close()
    assert ack["MSA"][1:3] == ["AR", "DOWN-2"]
    assert ack_garbage["MSA"][1] == "AR"  # could not even dead-letter it: the sender keeps it
    assert (await broker.queue_info(inbound(rabbit_project))).messages == 0


async def test_ar_when_the_confirm_does_not_come_in_time(start_gateway: Start) -> None:
    gateway = await start_gateway(confirm_timeout=0.3)
    assert isinstance(gateway.broker, RecordingBroker)
    gateway.broker.gate = asyncio.Event()  # confirms held back forever
    client = await Client.connect(gateway.port)
    ack = segments(await client.send(adt("SLOW-1")))
    await client.close()
    assert ack["MSA"][1:3] == ["AR", "SLOW-1"]


async def test_ack_is_never_written_before_the_confirm(start_gateway: Start, broker: Broker,
                                                       rabbit_project: Project) -> None:
    gateway = await start_gateway()
    recorder = gateway.broker
    assert isinstance(recorder, RecordingBroker)
    # 1. confirms held back: no ACK arrives until they are released
    recorder.gate = asyncio.Event()
    client = await Client.connect(gateway.port)
    await client.send_raw(frame(adt("HELD-1")))
    with pytest.raises(TimeoutError):
        await client.read_ack(timeout=0.5)
    recorder.gate.set()
    assert segments(await client.read_ack())["MSA"][1:3] == ["AA", "HELD-1"]
    await client.close()
    recorder.gate = None
    # 2. many concurrent messages: every ACK write comes after that message's confirm
    written: dict[str, float] = {}
    original_write = gateway._write

    async def recording_write(writer: asyncio.StreamWriter, ack: bytes) -> None:
        written[segments(ack)["MSA"][2]] = time.perf_counter()
        await original_write(writer, ack)

    gateway._write = recording_write  # type: ignore[method-assign]

    async def sender(n: int) -> None:
        c = await Client.connect(gateway.port)
        for i in range(10):
            assert segments(await c.send(adt(f"ORD-{n}-{i}")))["MSA"][1] == "AA"
        await c.close()

    await asyncio.gather(*(sender(n) for n in range(10)))
    assert len(written) == 100
    assert all(written[cid] >= recorder.confirmed[cid] for cid in written)
    assert (await broker.queue_info(inbound(rabbit_project))).messages == 101


async def test_enhanced_mode_commit_acks_follow_msh15(start_gateway: Start, broker: Broker,
                                                      rabbit_project: Project) -> None:
    gateway = await start_gateway()
    client = await Client.connect(gateway.port)
    assert segments(await client.send(adt("ENH-AL", accept="AL", application="NE")))["MSA"][1:3] == ["CA", "ENH-AL"]
    assert segments(await client.send(adt("ENH-SU", accept="SU", application="AL")))["MSA"][1] == "CA"
    bad = adt("ENH-ER-BAD", accept="ER").replace(b"\rEVN|", b"\revn|")
    assert segments(await client.send(bad))["MSA"][1:3] == ["CE", "ENH-ER-BAD"]
    for silent in (adt("ENH-NE", accept="NE", application="AL"), adt("ENH-ER-OK", accept="ER")):
        await client.send_raw(frame(silent))
        with pytest.raises(TimeoutError):
            await client.read_ack(timeout=0.5)
    # the connection still works after the silent ones
    assert segments(await client.send(adt("ORIG-1")))["MSA"][1:3] == ["AA", "ORIG-1"]
    await client.close()
    ids = [m.correlation_id for m in await drain(broker, inbound(rabbit_project))]
    assert ids == ["ENH-AL", "ENH-SU", "ENH-NE", "ENH-ER-OK", "ORIG-1"]
    assert [m.correlation_id for m in await drain(broker, dlq(rabbit_project))] == ["ENH-ER-BAD"]


async def test_ack_mode_none_publishes_without_answering(start_gateway: Start, broker: Broker,
                                                         rabbit_project: Project) -> None:
    gateway = await start_gateway(ack="none")
    client = await Client.connect(gateway.port)
    await client.send_raw(frame(adt("QUIET-1")) + frame(b"garbage"))
    with pytest.raises(TimeoutError):
        await client.read_ack(timeout=0.5)
    await client.close()
    assert [m.correlation_id for m in await drain(broker, inbound(rabbit_project))] == ["QUIET-1"]
    assert len(await drain(broker, dlq(rabbit_project))) == 1


async def test_framing_errors_are_answered_or_closed_and_the_listener_keeps_serving(
        start_gateway: Start, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start_gateway(max_message_bytes=4000)
    # junk before the start block is skipped
    client = await Client.connect(gateway.port)
    await client.send_raw(b"junk\r\n\x00\x00" + frame(adt("JUNK-1")))
    assert segments(await client.read_ack())["MSA"][1:3] == ["AA", "JUNK-1"]
    # no start block: answered AE, dead-lettered, connection still usable
    await client.send_raw(adt("NOSTART-1") + b"\x1c\r")
    ack = segments(await client.read_ack())
    assert ack["MSA"][1:3] == ["AE", "NOSTART-1"] and "start block" in ack["ERR"][7]
    assert segments(await client.send(adt("AFTER-1")))["MSA"][1] == "AA"
    await client.close()
    # oversize: AE, then the gateway closes the connection
    client = await Client.connect(gateway.port)
    huge = adt("HUGE-1") + b"NTE|1||" + b"x" * 10_000 + b"\r"
    await client.send_raw(frame(huge))
    ack = segments(await client.read_ack())
    assert ack["MSA"][1:3] == ["AE", "HUGE-1"] and "4000" in ack["ERR"][7]
    assert await client.closed_by_peer()
    await client.close()
    # oversize without any end block at all: same
    client = await Client.connect(gateway.port)
    await client.send_raw(b"\x0b" + b"y" * 10_000)
    assert segments(await client.read_ack())["MSA"][1:3] == ["AE", ""]
    assert await client.closed_by_peer()
    await client.close()
    # missing end block, then the sender disconnects: nothing published
    client = await Client.connect(gateway.port)
    await client.send_raw(b"\x0b" + adt("CUT-1"))
    await client.close()
    # a start block inside a frame: the cut-off frame is dropped, the next one handled
    client = await Client.connect(gateway.port)
    await client.send_raw(b"\x0b" + adt("CUT-2")[:40] + frame(adt("WHOLE-1")))
    assert segments(await client.read_ack())["MSA"][1:3] == ["AA", "WHOLE-1"]
    await client.close()
    # the listener still serves new connections
    client = await Client.connect(gateway.port)
    assert segments(await client.send(adt("LAST-1")))["MSA"][1:3] == ["AA", "LAST-1"]
    await client.close()
    ids = [m.correlation_id for m in await drain(broker, inbound(rabbit_project))]
    assert ids == ["JUNK-1", "AFTER-1", "WHOLE-1", "LAST-1"]
    assert [m.correlation_id for m in await drain(broker, dlq(rabbit_project))] == ["NOSTART-1"]


async def test_idle_connections_are_closed(start_gateway: Start) -> None:
    gateway = await start_gateway(idle_timeout=0.3)
    client = await Client.connect(gateway.port)
    assert segments(await client.send(adt("IDLE-1")))["MSA"][1] == "AA"
    started = time.monotonic()
    assert await client.closed_by_peer(timeout=5.0)
    assert time.monotonic() - started < 3.0
    await client.close()


async def test_many_concurrent_connections_are_all_acked(start_gateway: Start, broker: Broker,
                                                         rabbit_project: Project) -> None:
    gateway = await start_gateway()
    clients = await asyncio.gather(*(Client.connect(gateway.port) for _ in range(25)))

    async def run(n: int, client: Client) -> list[str]:
        got = []
        for i in range(4):
            ack = segments(await client.send(adt(f"C{n}-{i}")))
            assert ack["MSA"][1] == "AA"
            got.append(ack["MSA"][2])
        await client.close()
        return got

    results = await asyncio.gather(*(run(n, c) for n, c in enumerate(clients)))
    assert results == [[f"C{n}-{i}" for i in range(4)] for n in range(25)]
    assert (await broker.queue_info(inbound(rabbit_project))).messages == 100


async def test_stop_finishes_in_flight_messages_then_closes(start_gateway: Start) -> None:
    gateway = await start_gateway()
    assert isinstance(gateway.broker, RecordingBroker)
    gateway.broker.gate = asyncio.Event()
    client = await Client.connect(gateway.port)
    await client.send_raw(frame(adt("INFLIGHT-1")))
    await asyncio.sleep(0.2)
    stopping = asyncio.create_task(gateway.stop())
    await asyncio.sleep(0.2)
    with pytest.raises(OSError):  # no longer accepting
        await Client.connect(gateway.port)
    gateway.broker.gate.set()
    assert segments(await client.read_ack())["MSA"][1:3] == ["AA", "INFLIGHT-1"]
    await stopping
    assert await client.closed_by_peer()
    await client.close()


async def test_python_hl7_mllp_send_gets_aa_and_message_lands_on_the_queue(
        start_gateway: Start, broker: Broker, rabbit_project: Project, tmp_path: Path) -> None:
    gateway = await start_gateway()
    message = adt("HL7PY-1")
    path = tmp_path / "message.hl7"
    path.write_bytes(message.replace(b"\r", b"\n"))
    result = await asyncio.to_thread(
        subprocess.run, [str(MLLP_SEND), "--port", str(gateway.port), "--file", str(path), "--loose", "127.0.0.1"],
        capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    ack = segments(result.stdout.strip(b"\r\n\x0b\x1c").replace(b"\n", b"\r"))
    assert ack["MSA"][1:3] == ["AA", "HL7PY-1"]
    [got] = await drain(broker, inbound(rabbit_project))
    assert got.body == message.rstrip(b"\r")  # --loose strips the trailing CR
    assert got.correlation_id == "HL7PY-1"


async def test_engine_starts_configured_listeners_and_stops_them_first(rabbit_project: Project,
                                                                       broker: Broker) -> None:
    from middleware.engine import Engine

    listener = dataclasses.replace(rabbit_project.settings.mllp[0], port=0)
    project = dataclasses.replace(rabbit_project,
                                  settings=dataclasses.replace(rabbit_project.settings,
                                                               ingest={**rabbit_project.settings.ingest,
                                                                       "mllp": (listener,)}))
    engine = Engine(project)
    await engine.start()
    try:
        [gateway] = [g for g in engine.gateways if isinstance(g, MllpGateway)]  # ingest.http starts too
        client = await Client.connect(gateway.port)
        assert segments(await client.send(adt("ENGINE-1")))["MSA"][1:3] == ["AA", "ENGINE-1"]
        await client.close()
    finally:
        await engine.stop()
    assert engine.gateways == []
    demo_engine = Engine(project, gateways=False)
    assert demo_engine.gateways == []


# -- hardened listener: allowed_peers, max_connections, buffer budget, frame timeout, TLS ----------


def mllp_logs(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "middleware.ingest.mllp" and r.getMessage() == event]


async def test_allowed_peers_closes_other_addresses_at_accept(start_gateway: Start, broker: Broker,
                                                              rabbit_project: Project,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "middleware.ingest.mllp")
    gateway = await start_gateway(allowed_peers=("127.0.0.2/32", "10.0.0.0/8"))
    allowed = await Client.connect(gateway.port, local_addr=("127.0.0.2", 0))
    assert segments(await allowed.send(adt("PEER-OK")))["MSA"][1:3] == ["AA", "PEER-OK"]
    await allowed.close()
    other = await Client.connect(gateway.port, local_addr=("127.0.0.1", 0))
    with contextlib.suppress(ConnectionError):
        await other.send_raw(frame(adt("PEER-NO")))
    assert await other.closed_by_peer()
    await other.close()
    [refused] = mllp_logs(caplog, "mllp peer not allowed, closing")
    assert refused.peer.startswith("127.0.0.1:")  # type: ignore[attr-defined]
    assert "PEER-NO" not in caplog.text and "Müller" not in caplog.text
    assert [m.correlation_id for m in await drain(broker, inbound(rabbit_project))] == ["PEER-OK"]


async def test_max_connections_closes_the_extra_ones_and_frees_the_slot_on_close(
        start_gateway: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "middleware.ingest.mllp")
    gateway = await start_gateway(max_connections=2)
    first, second = await Client.connect(gateway.port), await Client.connect(gateway.port)
    for n, client in enumerate((first, second)):
        assert segments(await client.send(adt(f"SLOT-{n}")))["MSA"][1] == "AA"
    extra = await Client.connect(gateway.port)
    assert await extra.closed_by_peer(timeout=2.0)
    await extra.close()
    assert len(mllp_logs(caplog, "mllp max_connections reached, closing")) == 1
    await first.close()
    await asyncio.sleep(0.2)
    third = await Client.connect(gateway.port)
    assert segments(await third.send(adt("SLOT-3")))["MSA"][1:3] == ["AA", "SLOT-3"]
    assert segments(await second.send(adt("SLOT-4")))["MSA"][1] == "AA"
    await third.close()
    await second.close()


async def test_buffer_budget_drops_the_biggest_half_open_frames_and_a_normal_sender_gets_aa(
        start_gateway: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "middleware.ingest.mllp")
    gateway = await start_gateway(max_message_bytes=20_000, max_buffered_bytes=50_000)
    half_open = []
    for size in (15_000, 15_000, 15_000, 15_000, 19_000, 15_000):
        client = await Client.connect(gateway.port)
        await client.send_raw(b"\x0bMSH|^~\\&|" + b"x" * (size - 10))
        half_open.append(client)
        await asyncio.sleep(0.1)
        assert gateway._budget.total <= 50_000
    closed = [await c.closed_by_peer(timeout=0.5) for c in half_open]
    assert sum(closed) == 3  # 96,000 bytes held: the 19,000 one and two others are dropped to fit 50,000
    assert closed[4]
    normal = await Client.connect(gateway.port)
    assert segments(await normal.send(adt("AFTER-FLOOD")))["MSA"][1:3] == ["AA", "AFTER-FLOOD"]
    assert len(mllp_logs(caplog, "mllp buffer limit reached, dropping this connection's unfinished frame")) >= 3
    for client in [*half_open, normal]:
        with contextlib.suppress(ConnectionError):
            await client.close()
    await asyncio.sleep(0.2)
    assert gateway._budget.total == 0


async def test_a_frame_trickled_slower_than_frame_timeout_is_closed(start_gateway: Start,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "middleware.ingest.mllp")
    gateway = await start_gateway(frame_timeout=0.5, idle_timeout=5)
    client = await Client.connect(gateway.port)
    started = time.monotonic()
    await client.send_raw(b"\x0bMSH|")
    with contextlib.suppress(ConnectionError):
        while time.monotonic() - started < 5 and not client.reader.at_eof():
            await client.send_raw(b"x")  # never idle: a byte every 0.1 s
            await asyncio.sleep(0.1)
    assert await client.closed_by_peer(timeout=1.0)
    assert 0.4 < time.monotonic() - started < 2.0
    assert len(mllp_logs(caplog, "mllp frame not finished in time, closing")) == 1
    await client.close()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA, a server certificate for 127.0.0.1, and client contexts with and without certificates."""
    import trustme

    folder = tmp_path_factory.mktemp("certs")
    ca, foreign = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))

    def client(cert_from: trustme.CA | None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        if cert_from is not None:
            cert_from.issue_cert("sender.example").configure_cert(context)
        return context

    return {"cert_file": str(folder / "server.pem"), "key_file": str(folder / "server.key"),
            "ca_file": str(folder / "ca.pem"), "no_cert": client(None), "ca_cert": client(ca),
            "foreign_cert": client(foreign)}


async def tls_refused(port: int, context: ssl.SSLContext) -> bool:
    """True when the gateway ends the TLS connection without answering a message."""
    try:
        client = await Client.connect(port, ssl=context, server_hostname="127.0.0.1")
        await client.send_raw(frame(adt("TLS-REFUSED")))
        got = await asyncio.wait_for(client.reader.read(), 5.0)
    except (ssl.SSLError, ConnectionError):
        return True
    return got == b""


async def test_tls_with_a_server_certificate_serves_tls_and_refuses_plain_tcp(
        start_gateway: Start, certificates: dict[str, Any], broker: Broker, rabbit_project: Project,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "middleware.ingest.mllp")
    gateway = await start_gateway(tls=MllpTls(certificates["cert_file"], certificates["key_file"]))
    client = await Client.connect(gateway.port, ssl=certificates["no_cert"], server_hostname="127.0.0.1")
    assert segments(await client.send(adt("TLS-1")))["MSA"][1:3] == ["AA", "TLS-1"]
    await client.close()
    plain = await Client.connect(gateway.port)
    await plain.send_raw(frame(adt("PLAIN-1")))
    assert await plain.closed_by_peer()
    await plain.close()
    assert mllp_logs(caplog, "mllp tls handshake failed, closing")
    assert [m.correlation_id for m in await drain(broker, inbound(rabbit_project))] == ["TLS-1"]


async def test_mutual_tls_requires_a_client_certificate_signed_by_the_ca(
        start_gateway: Start, certificates: dict[str, Any], broker: Broker, rabbit_project: Project) -> None:
    gateway = await start_gateway(tls=MllpTls(certificates["cert_file"], certificates["key_file"],
                                              certificates["ca_file"], require_client_cert=True))
    client = await Client.connect(gateway.port, ssl=certificates["ca_cert"], server_hostname="127.0.0.1")
    assert segments(await client.send(adt("MTLS-1")))["MSA"][1:3] == ["AA", "MTLS-1"]
    await client.close()
    assert await tls_refused(gateway.port, certificates["no_cert"])
    assert await tls_refused(gateway.port, certificates["foreign_cert"])
    assert [m.correlation_id for m in await drain(broker, inbound(rabbit_project))] == ["MTLS-1"]


async def test_optional_client_certificates_are_checked_when_offered(
        start_gateway: Start, certificates: dict[str, Any], broker: Broker, rabbit_project: Project) -> None:
    gateway = await start_gateway(tls=MllpTls(certificates["cert_file"], certificates["key_file"],
                                              certificates["ca_file"], require_client_cert=False))
    for n, context in enumerate((certificates["no_cert"], certificates["ca_cert"])):
        client = await Client.connect(gateway.port, ssl=context, server_hostname="127.0.0.1")
        assert segments(await client.send(adt(f"OPT-{n}")))["MSA"][1] == "AA"
        await client.close()
    assert await tls_refused(gateway.port, certificates["foreign_cert"])
    assert [m.correlation_id for m in await drain(broker, inbound(rabbit_project))] == ["OPT-0", "OPT-1"]


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


async def test_300_half_open_1mb_frames_keep_the_engine_under_200_mb_and_a_sender_still_gets_aa(
        broker: Broker, rabbit_env: dict[str, str], tmp_path: Path) -> None:
    """The issue's figure: 300 frames of ~1 MB that never end took `middleware run` from 65 to 431 MB."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "middleware", "run", "--project", str(REPO), env=rabbit_env, cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    logs: list[dict[str, Any]] = []
    listening = asyncio.get_running_loop().create_future()

    async def read_logs() -> None:  # keep draining stderr: a full pipe would stall the engine
        assert process.stderr is not None
        async for line in process.stderr:
            if line.startswith(b"{"):
                entry = json.loads(line)
                logs.append(entry)
                if entry.get("event") == "mllp listening" and not listening.done():
                    listening.set_result(entry["port"])

    reader = asyncio.create_task(read_logs())
    attackers: list[Client] = []
    try:
        port = await asyncio.wait_for(listening, 60)
        await asyncio.sleep(0.5)
        baseline = peak_rss_mib(process.pid)
        chunk = b"x" * 65536

        async def half_open(n: int) -> None:
            client = await Client.connect(port)
            attackers.append(client)
            with contextlib.suppress(ConnectionError):
                await client.send_raw(b"\x0b" + adt(f"HALF-{n}"))
                for _ in range(15):  # ~1 MB, under max_message_bytes (1 MiB), and no end block
                    await client.send_raw(chunk)

        await asyncio.gather(*(half_open(n) for n in range(300)))
        await asyncio.sleep(1.0)  # let the engine read what is still in flight
        normal = await Client.connect(port)
        ack = segments(await normal.send(adt("NORMAL-1"), timeout=30))
        await normal.close()
        peak = peak_rss_mib(process.pid)
        print(f"middleware run peak RSS: {baseline:.0f} MiB idle, {peak:.0f} MiB after 300 half-open 1 MB frames")
        assert ack["MSA"][1:3] == ["AA", "NORMAL-1"]
        assert peak < 200, f"peak RSS {peak:.0f} MiB (idle {baseline:.0f} MiB)"
        dropped = [e for e in logs if e.get("event", "").startswith("mllp buffer limit reached")]
        assert len(dropped) > 200  # 64 MiB of the 300 MB are held; the rest were dropped
        assert all("HALF-" not in json.dumps(e) for e in logs)  # no message content in the logs
    finally:
        for client in attackers:
            with contextlib.suppress(Exception):
                client.writer.transport.abort()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
