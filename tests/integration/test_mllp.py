"""The MLLP gateway on the real RabbitMQ: ACK after confirm, AE + dead letter, AR, enhanced mode,
framing errors, idle timeout, many connections, and python-hl7's ``mllp_send`` as an independent client.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from middleware.ingest import MllpListener
from middleware.ingest.mllp import MllpGateway
from middleware.project import Project

from ..unit.test_mllp import Client, adt, frame, segments

pytestmark = pytest.mark.rabbitmq

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
                                  settings=dataclasses.replace(rabbit_project.settings, mllp=(listener,)))
    engine = Engine(project)
    await engine.start()
    try:
        [gateway] = engine.gateways
        client = await Client.connect(gateway.port)
        assert segments(await client.send(adt("ENGINE-1")))["MSA"][1:3] == ["AA", "ENGINE-1"]
        await client.close()
    finally:
        await engine.stop()
    assert engine.gateways == []
    demo_engine = Engine(project, gateways=False)
    assert demo_engine.gateways == []
