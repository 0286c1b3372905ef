"""The mllp connector against a tiny local MLLP server that answers AA, CA, AE, AR, the wrong ACK or nothing:
each ACK path, the persistent connection and its reconnect, TLS (trustme), and retries through send_with_retry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import pytest
import trustme

from middleware.delivery import ConnectorSpec, Delivery, RetryPolicy
from middleware.delivery.mllp import MllpConnector, control_id, read_ack
from middleware.delivery.retry import send_with_retry
from middleware.errors import DeliveryError
from middleware.ingest.mllp_framing import FrameDecoder, frame

FAST = RetryPolicy(attempts=3, initial=0.01, max=0.02, multiplier=2, jitter=0.0)
EVENT_ID = "6f1c9b0e-2a4d-5c3b-8e7f-1a2b3c4d5e6f"
EVENT = {"specversion": "1.0", "id": EVENT_ID, "type": "patient.admitted.v1", "time": "2026-11-24T08:29:00Z",
         "source": "urn:middleware:route:adt-inbound", "correlationid": "corr-9",
         "data": {"patient": {"mrn": "MRN-1", "name": {"family": "Doe"}}}}


def delivery(event_id: str = EVENT_ID) -> Delivery:
    return Delivery(json.dumps({**EVENT, "id": event_id}).encode(), event_id, "corr-9", "adt-inbound",
                    "patient.admitted.v1")


def ack(message: bytes, code: str, text: str = "", control: str | None = None, err: str = "") -> bytes:
    msh10 = control if control is not None else message.split(b"\r")[0].split(b"|")[9].decode()
    segments = ["MSH|^~\\&|RECV|FAC|MIDDLEWARE||20261125093000||ACK^A01^ACK|A1|P|2.5.1",
                f"MSA|{code}|{msh10}" + (f"|{text}" if text else "")]
    if err:
        segments.append(f"ERR|||102^Data type error^HL70357|E||||{err}")
    return ("\r".join(segments) + "\r").encode()


Answer = Callable[[bytes], bytes | None]  # None: say nothing (the client times out)


@dataclass
class Receiver:
    """A tiny MLLP server: ``answer`` decides each reply; it records messages and connections."""

    answer: Answer
    received: list[bytes] = field(default_factory=list)
    connections: int = 0
    close_after_each: bool = False
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self, context: ssl.SSLContext | None = None) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        decoder = FrameDecoder(1 << 20)
        try:
            while chunk := await reader.read(65536):
                decoder.feed(chunk)
                while (got := decoder.next()) is not None:
                    self.received.append(got.body)
                    reply = self.answer(got.body)
                    if reply is not None:
                        writer.write(frame(reply))
                        await writer.drain()
                    if self.close_after_each:
                        writer.close()
                        return
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Any]]:
    started: list[Receiver] = []
    connectors: list[MllpConnector] = []

    async def start(answer: Answer, context: ssl.SSLContext | None = None, **options: Any) -> tuple[Receiver,
                                                                                                   MllpConnector]:
        receiver = await Receiver(answer, close_after_each=options.pop("close_after_each", False)).start(context)
        started.append(receiver)
        connector = MllpConnector(ConnectorSpec("bed-board-mllp", "mllp", {
            "host": "127.0.0.1", "port": receiver.port, "timeout": 3, **options}, retry=FAST))
        connectors.append(connector)
        await connector.start()
        return receiver, connector

    yield start
    for connector in connectors:
        await connector.close()
    for receiver in started:
        await receiver.stop()


async def test_aa_is_delivered_and_the_message_is_hl7_that_python_hl7_parses(receivers: Any) -> None:
    receiver, connector = await receivers(lambda m: ack(m, "AA"))
    await connector.send(delivery())
    [sent] = receiver.received
    message = hl7.parse(sent.decode())
    assert str(message.segment("MSH")[10]) == control_id(EVENT_ID)
    assert str(message["PID.F3.R1.C1"]) == "MRN-1"


async def test_ca_commit_accept_counts_as_delivered(receivers: Any) -> None:
    _, connector = await receivers(lambda m: ack(m, "CA"))
    await connector.send(delivery())


@pytest.mark.parametrize(("err", "text", "reason"), [
    ("", "PID-3 unknown patient", "PID-3 unknown patient"),
    ("Bed B is not free", "", "Bed B is not free"),
])
async def test_ae_is_not_retried_and_carries_the_receivers_text(receivers: Any, err: str, text: str,
                                                                reason: str) -> None:
    receiver, connector = await receivers(lambda m: ack(m, "AE", text, err=err))
    with pytest.raises(DeliveryError) as caught:
        await send_with_retry(connector, delivery(), FAST)
    assert not caught.value.retryable
    assert "answered AE" in caught.value.message and reason in caught.value.message
    assert len(receiver.received) == 1  # sent once


async def test_ar_is_retried_and_a_later_aa_delivers(receivers: Any) -> None:
    answers = iter(["AR", "CR", "AA"])
    receiver, connector = await receivers(lambda m: ack(m, next(answers), "busy"))
    attempts = await send_with_retry(connector, delivery(), FAST)
    assert attempts == 3
    assert len(receiver.received) == 3
    assert len(set(receiver.received)) == 1 or all(m.split(b"|")[9] == receiver.received[0].split(b"|")[9]
                                                   for m in receiver.received)  # the same MSH-10 every try


async def test_ar_every_time_ends_retryable_after_the_policy(receivers: Any) -> None:
    _, connector = await receivers(lambda m: ack(m, "AR", "queue full"))
    with pytest.raises(DeliveryError) as caught:
        await send_with_retry(connector, delivery(), FAST)
    assert caught.value.retryable and caught.value.attempts == 3
    assert "answered AR: queue full" in caught.value.message


async def test_no_ack_times_out_retryably_and_the_connection_is_not_reused(receivers: Any) -> None:
    receiver, connector = await receivers(lambda m: None, timeout=0.5)
    with pytest.raises(DeliveryError, match=r"no ACK within 0.5s") as caught:
        await connector.send(delivery())
    assert caught.value.retryable
    receiver.answer = lambda m: ack(m, "AA")
    await connector.send(delivery())  # a late ACK for the first message could not be taken for this one
    assert receiver.connections == 2


async def test_an_ack_for_another_control_id_is_retried_on_a_new_connection(receivers: Any) -> None:
    receiver, connector = await receivers(lambda m: ack(m, "AA", control="SOMETHING-ELSE"))
    with pytest.raises(DeliveryError, match="expected") as caught:
        await connector.send(delivery())
    assert caught.value.retryable
    receiver.answer = lambda m: ack(m, "AA")
    await connector.send(delivery())
    assert receiver.connections == 2


async def test_one_connection_carries_message_after_message(receivers: Any) -> None:
    receiver, connector = await receivers(lambda m: ack(m, "AA"))
    for n in range(5):
        await connector.send(delivery(f"00000000-0000-5000-8000-00000000000{n}"))
    assert len(receiver.received) == 5
    assert receiver.connections == 1


async def test_a_receiver_that_drops_the_connection_after_each_ack_is_reconnected_without_a_failed_try(
        receivers: Any) -> None:
    receiver, connector = await receivers(lambda m: ack(m, "AA"), close_after_each=True)
    for n in range(3):
        await connector.send(delivery(f"00000000-0000-5000-8000-00000000000{n}"))
        await asyncio.sleep(0.05)  # the receiver's close arrives while the connection is idle
    assert len(receiver.received) == 3  # each sent once
    assert receiver.connections == 3


async def test_a_reused_connection_that_fails_is_tried_once_more_on_a_new_one(receivers: Any) -> None:
    receiver, connector = await receivers(lambda m: ack(m, "AA"), close_after_each=True)
    await connector.send(delivery())
    connector._reusable = lambda: connector._idle.pop() if connector._idle else None  # type: ignore[method-assign]
    await connector.send(delivery())  # the stale connection fails at once; the new one delivers
    assert receiver.connections == 2


async def test_a_receiver_that_closes_before_answering_is_retryable(receivers: Any) -> None:
    _, connector = await receivers(lambda m: None, close_after_each=True)
    with pytest.raises(DeliveryError) as caught:
        await connector.send(delivery())
    assert caught.value.retryable
    assert "failed" in caught.value.message


async def test_nobody_listening_is_a_retryable_connection_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    connector = MllpConnector(ConnectorSpec("c", "mllp", {"host": "127.0.0.1", "port": port, "timeout": 0.5}))
    with pytest.raises(DeliveryError, match="failed: ConnectionRefusedError") as caught:
        await connector.send(delivery())
    assert caught.value.retryable
    await connector.close()


async def test_a_pool_sends_concurrent_events_on_several_connections_one_message_each(receivers: Any) -> None:
    in_flight = 0
    most = 0

    receiver, connector = await receivers(lambda m: ack(m, "AA"), pool=3)
    original = connector._exchange

    async def counting(payload: bytes, expected: str) -> tuple[str, str]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.02)
            return await original(payload, expected)
        finally:
            in_flight -= 1

    connector._exchange = counting  # type: ignore[method-assign]
    await asyncio.gather(*(connector.send(delivery(f"00000000-0000-5000-8000-0000000000{n:02d}")) for n in range(12)))
    assert len(receiver.received) == 12
    assert most <= 3
    assert receiver.connections <= 3


def test_read_ack_takes_the_text_from_msa3_else_err() -> None:
    message = b"MSH|^~\\&|A|B|C|D|1||ADT^A01|CTRL|P|2.5.1\r"
    assert read_ack(ack(message, "AE", "bad \\F\\ value"), "CTRL") == ("AE", "bad | value")
    assert read_ack(ack(message, "AE", err="diagnostic"), "CTRL") == ("AE", "diagnostic")
    assert read_ack(ack(message, "AA"), "CTRL") == ("AA", "")


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("mllp-pki")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return ca, folder / "ca.pem"


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def test_tls_with_the_receivers_ca_is_delivered(receivers: Any, pki: tuple[trustme.CA, Path]) -> None:
    ca, ca_file = pki
    receiver, connector = await receivers(lambda m: ack(m, "AA"), server_context(ca), tls={"ca_file": str(ca_file)})
    await connector.send(delivery())
    assert len(receiver.received) == 1
    assert connector.describe().startswith("mllps://")


async def test_tls_with_an_untrusted_certificate_is_not_retried(receivers: Any, pki: tuple[trustme.CA, Path]) -> None:
    ca, _ = pki
    _, connector = await receivers(lambda m: ack(m, "AA"), server_context(ca), tls={"verify": True})
    with pytest.raises(DeliveryError, match="not trusted") as caught:
        await connector.send(delivery())
    assert not caught.value.retryable


# -- an independent receiver: python-hl7's own MLLP server --------------------------------------------


async def test_python_hl7s_mllp_server_parses_what_we_send_and_its_ack_delivers() -> None:
    received: list[hl7.Message] = []

    async def serve(reader: Any, writer: Any) -> None:
        with contextlib.suppress(Exception):
            while not writer.is_closing():
                message = await reader.readmessage()
                received.append(message)
                writer.writemessage(message.create_ack())
                await writer.drain()

    server = await hl7.mllp.start_hl7_server(serve, "127.0.0.1", 0, encoding="utf-8")
    port = server.sockets[0].getsockname()[1]
    connector = MllpConnector(ConnectorSpec("c", "mllp", {"host": "127.0.0.1", "port": port, "timeout": 2}))
    try:
        await connector.send(delivery())
        await connector.send(delivery("00000000-0000-5000-8000-000000000001"))
    finally:
        await connector.close()
        server.close()
    assert [str(m.segment("MSH")[9]) for m in received] == ["ADT^A01^ADT_A01"] * 2
    assert [str(m.segment("MSH")[10]) for m in received] == [control_id(EVENT_ID),
                                                            control_id("00000000-0000-5000-8000-000000000001")]
    assert str(received[0]["PID.F3.R1.C1"]) == "MRN-1"
