"""MLLP gateway without RabbitMQ: framing, ACK building, and the AA path on the embedded broker.

The helpers here (``adt``, ``frame``, ``segments``, ``Client``) are shared with
tests/integration/test_mllp.py, which runs the gateway on the real RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from middleware.broker import make_broker, naming
from middleware.broker.base import Broker
from middleware.ingest import MllpListener, MllpTls
from middleware.ingest.mllp import MllpGateway, build_ack, read_header
from middleware.project import Project, load_project

from .test_project_validation import edit, line_of, problems

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
    async def connect(cls, port: int, host: str = "127.0.0.1", **options: Any) -> Client:
        """``options`` go to :func:`asyncio.open_connection` (``ssl``, ``local_addr``, ...)."""
        reader, writer = await asyncio.open_connection(host, port, **options)
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
        """True when the gateway closes the connection within ``timeout`` without sending anything."""
        try:
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        except ConnectionError:
            return True
        except TimeoutError:
            return False

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


# -- ingest.mllp settings: limits, allowed_peers and tls are checked by `validate` -----------------


def set_listener_option(config: Path, text: str) -> None:
    """Put ``text`` (YAML lines of the shipped listener, indented after the first) after ``idle_timeout``,
    replacing the lines of the keys it sets."""
    keys = {line.strip().split(":")[0] for line in text.splitlines()}
    kept = [line for line in config.read_text().splitlines(keepends=True)
            if not (line.startswith("      ") and line.strip().split(":")[0] in keys)]
    config.write_text("".join(kept))
    edit(config, "      idle_timeout: 300", f"      {text}\n      idle_timeout: 300")


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A copy of the shipped project that a test may change."""
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, tmp_path / "project" / folder)
    return tmp_path / "project"


def test_listener_limits_and_access_settings_are_loaded(project_copy: Path) -> None:
    project = project_copy
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    (project / "certs").mkdir()
    server.cert_chain_pems[0].write_to_path(str(project / "certs" / "server.pem"))
    server.private_key_pem.write_to_path(str(project / "certs" / "server.key"))
    ca.cert_pem.write_to_path(str(project / "certs" / "ca.pem"))
    set_listener_option(project / "config" / "middleware.yaml",
                        "frame_timeout: 20\n      max_connections: 7\n"
                        "      max_buffered_bytes: 8388608\n      allowed_peers: [10.1.0.0/16, 127.0.0.1, '::1']\n"
                        "      tls: {cert_file: certs/server.pem, key_file: certs/server.key, ca_file: certs/ca.pem,\n"
                        "            require_client_cert: true}")
    [listener] = load_project(project, {}).settings.mllp
    assert (listener.frame_timeout, listener.max_connections, listener.max_buffered_bytes) == (20, 7, 8388608)
    assert listener.allowed_peers == ("10.1.0.0/16", "127.0.0.1", "::1")
    assert listener.tls == MllpTls(cert_file=str(project / "certs" / "server.pem"),
                                   key_file=str(project / "certs" / "server.key"),
                                   ca_file=str(project / "certs" / "ca.pem"), require_client_cert=True)


@pytest.mark.parametrize(("setting", "message"), [
    ("allowed_peers: [10.0.0.0/8, 10.0.0.300]",
     "allowed_peers: '10.0.0.300' is not an IP address or CIDR network (e.g. 10.0.0.0/24)"),
    ("max_buffered_bytes: 1000", "max_buffered_bytes: must be at least max_message_bytes (1048576)"),
    ("tls: {cert_file: no/cert.pem, key_file: no/key.pem}", "tls: cannot load the certificate, key or CA: "),
    ("tls:\n        cert_file: no/cert.pem\n        key_file: no/key.pem\n        require_client_cert: true",
     "tls.require_client_cert: needs tls.ca_file (the CA that signs client certificates)"),
    ("tls: {cert_file: a.pem}", "missing key: 'key_file' in ingest.mllp.0.tls"),
    ("max_connections: 0", "ingest.mllp.0.max_connections: 0 is less than the minimum of 1"),
    ("frame_timeout: 0", "ingest.mllp.0.frame_timeout: 0 is less than or equal to the minimum of 0"),
], ids=["peer", "buffer", "tls-files", "client-cert-without-ca", "tls-key", "connections", "frame-timeout"])
def test_invalid_listener_settings_are_file_line_problems(project_copy: Path, setting: str, message: str) -> None:
    project = project_copy
    config = project / "config" / "middleware.yaml"
    set_listener_option(config, setting)
    key = "  require_client_cert" if "require_client_cert" in message else setting.split(":")[0]
    expected_line = line_of(config, f"      {key}:")  # the listener's key, not broker.tls
    [problem] = problems(project)
    assert problem.startswith(f"config/middleware.yaml:{expected_line}: ")
    assert message in problem
