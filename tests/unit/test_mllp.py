"""MLLP gateway without RabbitMQ: framing, ACK building, and the AA path on the embedded broker.

The helpers here (``adt``, ``frame``, ``segments``, ``Client``) are shared with
tests/integration/test_mllp.py, which runs the gateway on the real RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from middleware.broker import make_broker, naming
from middleware.broker.base import Broker
from middleware.ingest import MllpListener
from middleware.ingest.mllp import MllpGateway, build_ack, read_header
from middleware.project import Project, load_project

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "adt-inbound" / "a01-admit.hl7"


def adt(control_id: str = "MSG-1", *, accept: str = "", application: str = "") -> bytes:
    """The shipped A01 sample, CR-separated, with MSH-10/15/16 set (empty 15/16: original mode)."""
    lines = SAMPLE.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\r").split(b"\r")
    msh = lines[0].split(b"|")  # msh[n] is MSH-(n+1)
    msh += [b""] * (18 - len(msh))
    msh[9], msh[14], msh[15] = control_id.encode(), accept.encode(), application.encode()
    return b"\r".join([b"|".join(msh), *lines[1:]]) + b"\r"


def frame(message: bytes) -> bytes:
    return b"\x0b" + message + b"\x1c\r"


def segments(ack: bytes) -> dict[str, list[str]]:
    """``{"MSH": [...fields], "MSA": [...], "ERR": [...]}``, fields numbered from 0 = segment id."""
    out = {}
    for line in ack.decode("latin-1").strip("\r").split("\r"):
        fields = line.split("|")
        if fields[0] == "MSH":
            fields.insert(1, "|")
        out[fields[0]] = fields
    return out


class Client:
    """One MLLP connection: send a message, wait for its ACK."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> Client:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_ack(self, timeout: float = 10.0) -> bytes:
        data = await asyncio.wait_for(self.reader.readuntil(b"\x1c\r"), timeout)
        start = data.index(b"\x0b")
        return data[start + 1:-2]

    async def send(self, message: bytes, timeout: float = 10.0) -> bytes:
        await self.send_raw(frame(message))
        return await self.read_ack(timeout)

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# -- ACK building ------------------------------------------------------------------------------


def test_ack_swaps_sender_and_receiver_and_echoes_control_id_version_and_charset() -> None:
    ack = segments(build_ack(read_header(adt("ABC-1")), "AA"))
    msh, msa = ack["MSH"], ack["MSA"]
    assert msh[2] == "^~\\&"
    assert (msh[3], msh[4], msh[5], msh[6]) == ("CASEMGR", "GHH", "EPIC", "GHH")
    assert msh[9] == "ACK^A01^ACK"
    assert msh[10] and msh[10] != "ABC-1"
    assert (msh[11], msh[12], msh[18]) == ("P", "2.5.1", "UNICODE UTF-8")
    assert msa[1:] == ["AA", "ABC-1"]
    assert "ERR" not in ack


def test_ack_uses_the_senders_delimiters_and_escapes_the_error_text() -> None:
    message = adt("X-9").replace(b"MSH|^~\\&|", b"MSH#$%*@#").replace(b"|", b"#")
    raw = build_ack(read_header(message), "AE", error=("102", "Data type error"), text="bad # and $ here")
    lines = raw.decode().strip("\r").split("\r")
    assert lines[0].startswith("MSH#$%*@#")
    assert lines[1].split("#")[:3] == ["MSA", "AE", "X-9"]
    err = lines[2].split("#")
    assert err[3] == "102$Data type error$HL70357"
    assert err[4] == "E"
    assert err[7] == "bad *F* and *S* here"


def test_ack_for_unreadable_input_uses_default_delimiters_and_empty_msa2() -> None:
    ack = segments(build_ack(read_header(b"garbage"), "AE", error=("102", "Data type error"), text="no MSH"))
    assert ack["MSH"][2] == "^~\\&"
    assert ack["MSA"][1:3] == ["AE", ""]
    assert ack["ERR"][3].startswith("102^")


# -- the AA path on the embedded broker ---------------------------------------------------------


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[tuple[Project, Broker]]:
    import os

    env = {**os.environ, "MIDDLEWARE_BROKER_URL": f"filesystem://{tmp_path}/broker", "MIDDLEWARE_QUEUE_PREFIX": ""}
    project = load_project(REPO, env)
    broker = make_broker(project.settings.broker_url)
    await broker.connect()
    yield project, broker
    await broker.close()


async def test_embedded_broker_aa_after_publish_and_body_unchanged(embedded: tuple[Project, Broker]) -> None:
    project, broker = embedded
    route = project.routes["adt-inbound"]
    gateway = MllpGateway(MllpListener(name="embedded", port=0, queue=route.source_queue), broker,
                          project.settings, route)
    await gateway.start()
    try:
        client = await Client.connect(gateway.port)
        message = adt("EMB-1")
        ack = segments(await client.send(message))
        await client.close()
    finally:
        await gateway.stop()
    assert ack["MSA"][1:3] == ["AA", "EMB-1"]
    got = await broker.get(naming.inbound_queue(route.source_queue))
    assert got is not None
    await got.ack()
    assert got.body == message
    assert got.correlation_id == "EMB-1"
    assert got.headers["x-mw-ingest"] == "mllp:embedded"
    assert got.content_type == "x-application/hl7-v2+er7"
