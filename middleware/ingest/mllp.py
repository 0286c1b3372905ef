"""MLLP gateway: HL7 v2 over TCP (or TLS) onto a route's inbound queue, ACK only after the broker's confirm.

Framing (MLLP release 1, :mod:`middleware.ingest.mllp_framing`): ``0x0B <message> 0x1C 0x0D``. One
connection handles its messages in order: a sender waits for each ACK before it sends the next
message; many connections run at once.

At accept, before a byte is read: a peer outside ``allowed_peers`` is closed, and so is a
connection past ``max_connections``; then, with ``tls``, the TLS handshake (client certificates
checked against ``ca_file``). Memory is bounded: a frame by ``max_message_bytes`` and
``frame_timeout``, the unfinished frames of all connections together by ``max_buffered_bytes``
(past it the connection holding the most bytes is dropped, so half-open frames cannot starve the
senders that finish theirs).

For each frame:

- it parses (:func:`middleware.formats.hl7v2.parse`, only to check it and read MSH): the raw bytes
  are published unchanged to the inbound queue, correlation id = MSH-10; once the broker confirmed,
  the gateway answers ``MSA|AA`` (``CA`` in enhanced mode). If the broker fails or does not confirm
  within ``confirm_timeout`` it answers ``AR`` (``CR``) with an ERR segment: the sender keeps the
  message and sends it again later.
- it does not parse: the raw bytes go to the route's dead-letter queue (stage ``parse``) and the
  gateway answers ``AE`` (``CE``) with an ERR segment (HL7 table 0357 code 102) whose text says
  what is wrong, never what the message contains.

Enhanced mode: when MSH-15 or MSH-16 is set, the gateway sends a commit ACK (CA/CE/CR) as MSH-15
asks: ``AL`` (or empty) always, ``NE`` never, ``ER`` only on error, ``SU`` only on success. It is not
the receiving application, so it never sends application ACKs (MSH-16 is the route's business).

Framing errors never stop the listener: bytes before a start block are skipped (a warning says how
many); a frame with an end block but no start block is answered ``AE``; a frame bigger than
``max_message_bytes`` is answered ``AE`` when its MSH can be read, then the connection is closed; a
connection that drops mid-frame, or stays idle longer than ``idle_timeout``, is closed.

Logs carry the listener, peer, outcome, correlation id and sizes: never payloads or names.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Any

from middleware import project_schema
from middleware.broker.base import Broker
from middleware.errors import BrokerError, ConfigError, ParseError, Problem
from middleware.formats import hl7v2
from middleware.ingest import GatewayContext, MllpListener, register
from middleware.ingest.mllp_framing import Frame, FrameDecoder, FrameTooLarge, FramingError, frame
from middleware.ingest.peers import PeerFilter, parse_networks
from middleware.ingest.publisher import Publisher
from middleware.ingest.tls import server_context
from middleware.observe import Metrics
from middleware.project import Settings
from middleware.route import Route

log = logging.getLogger("middleware.ingest.mllp")

CONTENT_TYPE = "x-application/hl7-v2+er7"
INGEST_HEADER = "x-mw-ingest"

# HL7 table 0357 (message error condition codes)
ERR_DATA = ("102", "Data type error")
ERR_INTERNAL = ("207", "Application internal error")

_READ_CHUNK = 65536
# Bytes a connection may hold before we read them: asyncio pauses a socket once its stream buffer
# passes 2 x _STREAM_LIMIT, and each recv() takes at most _RECV_SIZE (CPython's default is 256 KiB,
# which with many half-open connections costs more than the frames themselves).
_STREAM_LIMIT = 16384
_RECV_SIZE = 65536
_TLS_HANDSHAKE_TIMEOUT = 10.0


class _ConnectionIdle(Exception):
    pass


class _FrameTimeout(Exception):
    pass


class _Evicted(Exception):
    pass


class _BufferBudget:
    """Bytes of unfinished frames held by all of a listener's connections, capped at ``limit``.

    Past the cap the connection holding the most bytes is dropped (largest first, until the total
    fits): half-open frames cannot grow memory without bound, and a small message still gets in.
    A connection alone never drops itself; its own frame limit stops it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._held: dict[_FrameReader, int] = {}

    def update(self, holder: _FrameReader, size: int) -> None:
        self.total += size - self._held.get(holder, 0)
        if size:
            self._held[holder] = size
        else:
            self._held.pop(holder, None)
        while self.total > self.limit:
            victim = max(self._held, key=self._held.__getitem__)
            if victim is holder:
                others = [h for h in self._held if h is not holder]
                if not others:
                    return
                victim = max(others, key=self._held.__getitem__)
            victim.evict()

    def release(self, holder: _FrameReader) -> None:
        self.total -= self._held.pop(holder, 0)


class _FrameReader:
    """A connection's frames: reads with idle and frame timeouts, accounts buffered bytes to ``budget``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener: MllpListener,
                 budget: _BufferBudget) -> None:
        self._reader = reader
        self._writer = writer
        self._idle = listener.idle_timeout
        self._frame_timeout = listener.frame_timeout
        self._budget = budget
        self._frame_started: float | None = None
        self.decoder = FrameDecoder(listener.max_message_bytes)
        self.evicted = False

    def evict(self) -> None:
        """Drop this connection's unfinished frame and abort it (the budget needs the memory)."""
        self.evicted = True
        self.decoder.clear()
        self._budget.release(self)
        self._writer.transport.abort()

    async def next(self) -> Frame | None:
        """The next frame; None on a clean end of the connection."""
        try:
            return await self._next()
        finally:
            if not self.evicted:
                self._budget.update(self, self.decoder.buffered)

    async def _next(self) -> Frame | None:
        while True:
            item = self.decoder.next()
            if item is not None:
                self._frame_started = None
                return item
            timeout, idle = self._idle, True
            if self.decoder.in_frame:
                now = time.monotonic()
                if self._frame_started is None:
                    self._frame_started = now
                left = self._frame_started + self._frame_timeout - now
                if left <= timeout:
                    timeout, idle = left, False
            try:
                chunk = await asyncio.wait_for(self._reader.read(_READ_CHUNK), max(timeout, 0.0))
            except TimeoutError:
                raise (_ConnectionIdle if idle else _FrameTimeout) from None
            if self.evicted:
                raise _Evicted
            if not chunk:
                self.decoder.close()
                return None
            self.decoder.feed(chunk)
            self._budget.update(self, self.decoder.buffered)
            if self.evicted:
                raise _Evicted


@dataclass(frozen=True)
class _Header:
    """The MSH fields an ACK needs, raw (still escaped) in the sender's delimiters."""

    delimiters: hl7v2.Delimiters
    fields: tuple[str, ...]  # fields[n] is MSH-n; fields[0] == "MSH"
    charset: str = "latin-1"

    def field(self, number: int) -> str:
        return self.fields[number] if number < len(self.fields) else ""

    @property
    def control_id(self) -> str:
        return self.field(10)

    @property
    def enhanced(self) -> bool:
        return bool(self.field(15).strip() or self.field(16).strip())

    @property
    def accept_ack(self) -> str:
        return self.field(15).strip().upper()


_EMPTY_HEADER = _Header(hl7v2.DEFAULT_DELIMITERS, ("MSH", "|", hl7v2.DEFAULT_DELIMITERS.encoding_characters))


def read_header(raw: bytes) -> _Header:
    """MSH fields of ``raw`` as far as they can be read; default delimiters and no fields otherwise.

    Works on bytes decoded as latin-1, so echoed fields go back byte for byte.
    """
    data = raw.lstrip(b"\x0b\r\n\t ")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.startswith(b"MSH") or len(data) < 8:
        return _EMPTY_HEADER
    line = data.replace(b"\n", b"\r").split(b"\r", 1)[0].decode("latin-1")
    separator = line[3]
    encoding = line[4:].split(separator, 1)[0]
    try:
        delimiters = hl7v2.Delimiters.from_msh(separator, encoding)
    except ParseError:
        return _EMPTY_HEADER
    parts = line.split(separator)
    parts.insert(1, separator)
    return _Header(delimiters, tuple(parts))


def build_ack(header: _Header, code: str, *, error: tuple[str, str] | None = None, text: str = "",
              control_id: str | None = None) -> bytes:
    """The ACK for a message with ``header``: MSH (sender/receiver swapped) + MSA (+ ERR).

    ``code`` is AA/AE/AR or CA/CE/CR; ``error`` an HL7 table 0357 (code, name) for ERR-3 and
    ``text`` a diagnostic (escaped here) for MSA-3 and ERR-7.
    """
    d = header.delimiters
    fs, cs = d.field, d.component
    trigger = header.field(9).split(d.repetition, 1)[0].split(cs)
    event = trigger[1] if len(trigger) > 1 else ""
    message_type = f"ACK{cs}{event}{cs}ACK" if event else "ACK"
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S") + "+0000"
    msh = [
        "MSH", d.encoding_characters,
        header.field(5), header.field(6), header.field(3), header.field(4),
        now, "", message_type, control_id or uuid.uuid4().hex[:20],
        header.field(11) or "P", header.field(12) or "2.5",
    ]
    if header.field(18):
        msh += ["", "", "", "", "", header.field(18)]
    escaped = hl7v2.escape(text, d) if text else ""
    segments = [fs.join(msh), fs.join(["MSA", code, header.control_id] + ([escaped] if escaped else []))]
    if error is not None:
        segments.append(fs.join(["ERR", "", "", cs.join([error[0], error[1], "HL70357"]), "E", "", "", escaped]))
    return ("\r".join(segments) + "\r").encode("latin-1", "replace")


class MllpGateway:
    """One MLLP listener feeding ``route``'s inbound queue (see the module docstring).

    ``confirm_timeout``: seconds to wait for the broker's confirm before answering AR.
    ``drain_timeout``: seconds :meth:`stop` lets in-flight messages finish.
    """

    def __init__(self, listener: MllpListener, broker: Broker, settings: Settings, route: Route,
                 metrics: Metrics | None = None, *, confirm_timeout: float = 10.0,
                 drain_timeout: float | None = None) -> None:
        self.listener = listener
        self.broker = broker
        self.settings = settings
        self.route = route
        self.metrics = metrics
        self.confirm_timeout = confirm_timeout
        self.drain_timeout = settings.drain_timeout if drain_timeout is None else drain_timeout
        self.publisher = Publisher(broker, route, settings)  # the one way in
        self.topology = self.publisher.topology
        self.queue = self.topology.inbound  # the loader checked that route consumes listener.queue
        self.dead_letter_queue = self.topology.dead_letter
        self.source = f"mllp:{listener.name}"
        self.port = listener.port  # the bound port once started (useful with port 0)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._budget = _BufferBudget(listener.max_buffered_bytes)
        self._peers = PeerFilter(parse_networks(listener.allowed_peers))
        self._tls: ssl.SSLContext | None = None

    async def start(self, *, declare: bool = True) -> None:
        """Declare the route's queues (unless ``declare`` is False) and start listening."""
        if declare:
            await self.publisher.declare()
        if self.listener.tls is not None:
            try:
                self._tls = server_context(self.listener.tls)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError([Problem(self.listener.file, self.listener.line,
                                           f"ingest.mllp {self.listener.name}: tls: {exc}")]) from None
        try:
            self._server = await asyncio.start_server(self._serve, self.listener.host, self.listener.port,
                                                      limit=_STREAM_LIMIT)
        except OSError as exc:
            raise ConfigError([Problem(self.listener.file, self.listener.line,
                                       f"ingest.mllp {self.listener.name}: cannot listen on "
                                       f"{self.listener.host}:{self.listener.port}: {exc.strerror or exc}")]) from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("mllp listening", extra={"listener": self.listener.name, "host": self.listener.host,
                                          "port": self.port, "queue": self.queue, "ack": self.listener.ack,
                                          "tls": self._tls is not None,
                                          "max_connections": self.listener.max_connections})

    async def stop(self) -> None:
        """Stop accepting, let in-flight messages finish (bounded), then close every connection."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.drain_timeout)
        except TimeoutError:
            log.warning("mllp drain timed out", extra={"listener": self.listener.name, "in_flight": self._in_flight})
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        log.info("mllp stopped", extra={"listener": self.listener.name})

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        host, peer = _peer(writer)
        name = self.listener.name
        # Checked before any byte is read. No await may come before start_tls below: the sender's
        # first bytes (its TLS ClientHello) must reach the TLS layer, not the plain stream buffer.
        refusal: tuple[str, dict[str, object]] | None = None
        if not self._peers.allows(host):
            refusal = "mllp peer not allowed, closing", {}
        elif len(self._connections) >= self.listener.max_connections:
            refusal = "mllp max_connections reached, closing", {"max_connections": self.listener.max_connections}
        if refusal is not None:
            log.warning(refusal[0], extra={"listener": name, "peer": peer, **refusal[1]})
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        self._connections.add(task)
        if hasattr(writer.transport, "max_size"):  # CPython's selector transport: recv() size
            writer.transport.max_size = _RECV_SIZE
        frames = _FrameReader(reader, writer, self.listener, self._budget)
        count = 0
        try:
            if self._tls is not None:
                try:
                    await writer.start_tls(self._tls, ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT)
                except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
                    log.warning("mllp tls handshake failed, closing", extra={
                        "listener": name, "peer": peer, "error": _tls_reason(exc)})
                    return
            while not self._stopping:
                try:
                    item = await frames.next()
                except _ConnectionIdle:
                    log.info("mllp connection idle, closing", extra={"listener": name, "peer": peer})
                    break
                except _FrameTimeout:
                    log.warning("mllp frame not finished in time, closing", extra={
                        "listener": name, "peer": peer, "frame_timeout": self.listener.frame_timeout})
                    break
                except _Evicted:
                    log.warning("mllp buffer limit reached, dropping this connection's unfinished frame", extra={
                        "listener": name, "peer": peer, "max_buffered_bytes": self.listener.max_buffered_bytes})
                    break
                except FrameTooLarge as exc:
                    log.warning("mllp frame too large, closing", extra={
                        "listener": name, "peer": peer, "bytes": exc.size,
                        "max_message_bytes": self.listener.max_message_bytes})
                    header = read_header(exc.head)
                    if self.listener.ack != "none" and _answer(header, ok=False):
                        await self._write(writer, build_ack(header, _code(header, "E"), error=ERR_DATA,
                                                            text=f"message larger than "
                                                                 f"{self.listener.max_message_bytes} bytes"))
                    break
                except FramingError as exc:
                    log.warning("mllp framing error, closing", extra={"listener": name, "peer": peer,
                                                                      "error": str(exc)})
                    break
                if item is None:
                    break
                decoder = frames.decoder
                if decoder.skipped or decoder.dropped_partial:
                    log.warning("mllp bytes outside frames skipped", extra={
                        "listener": name, "peer": peer, "skipped_bytes": decoder.skipped,
                        "cut_off_frames": decoder.dropped_partial})
                    decoder.skipped = decoder.dropped_partial = 0
                if self._stopping:  # arrived after stop(): not taken, the sender will resend
                    break
                count += 1
                self._in_flight += 1
                self._idle.clear()
                try:
                    ack = await self._handle(item, peer)
                    if ack is not None:
                        await self._write(writer, ack)
                finally:
                    self._in_flight -= 1
                    if self._in_flight == 0:
                        self._idle.set()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("mllp connection lost", extra={"listener": name, "peer": peer, "error": type(exc).__name__})
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            self._budget.release(frames)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            log.debug("mllp connection closed", extra={"listener": name, "peer": peer, "messages": count})

    async def _write(self, writer: asyncio.StreamWriter, ack: bytes) -> None:
        writer.write(frame(ack))
        await writer.drain()

    # -- one message ------------------------------------------------------------------------

    async def _handle(self, item: Frame, peer: str) -> bytes | None:
        """Publish or dead-letter one frame; the ACK to send (None: send nothing)."""
        started = time.perf_counter()
        raw = item.body
        header = read_header(raw)
        error: ParseError | None = None
        if not item.has_start:
            error = ParseError("MLLP framing error: no start block (0x0B) before the message")
        else:
            try:
                hl7v2.parse(raw)
            except ParseError as exc:
                error = exc
        correlation_id = header.control_id or str(uuid.uuid4())
        outcome = "accepted" if error is None else "dead-lettered"
        try:
            if error is None:
                await asyncio.wait_for(self.publisher.publish(raw, source=self.source, correlation_id=correlation_id),
                                       self.confirm_timeout)
            else:
                await asyncio.wait_for(self._dead_letter(raw, error, correlation_id), self.confirm_timeout)
        except (BrokerError, TimeoutError) as exc:
            reason = "no confirm from the broker in time" if isinstance(exc, TimeoutError) else "broker unavailable"
            log.warning("mllp message rejected", extra={
                "listener": self.listener.name, "peer": peer, "outcome": "rejected",
                "correlation_id": correlation_id, "error": type(exc).__name__, "bytes": len(raw)})
            if self.listener.ack == "none" or not _answer(header, ok=False):
                return None
            return build_ack(header, _code(header, "R"), error=ERR_INTERNAL,
                             text=f"{reason}; message not accepted, send it again later")
        extra = {"listener": self.listener.name, "peer": peer, "outcome": outcome, "correlation_id": correlation_id,
                 "bytes": len(raw), "ms": round((time.perf_counter() - started) * 1000, 2)}
        if error is None:
            log.debug("mllp message accepted", extra=extra)
        else:
            log.warning("mllp message dead-lettered", extra={**extra, "error": str(error)})
        if self.listener.ack == "none" or not _answer(header, ok=error is None):
            return None
        if error is None:
            return build_ack(header, _code(header, "A"))
        return build_ack(header, _code(header, "E"), error=ERR_DATA, text=str(error))

    async def _dead_letter(self, raw: bytes, error: ParseError, correlation_id: str) -> None:
        await self.publisher.dead_letter(raw, error, source=self.source, correlation_id=correlation_id)
        if self.metrics is not None:
            self.metrics.dead_lettered.labels(self.route.name, "parse").inc()


def _code(header: _Header, outcome: str) -> str:
    """AA/AE/AR in original mode, CA/CE/CR in enhanced mode (outcome is A, E or R)."""
    return ("C" if header.enhanced else "A") + outcome


def _answer(header: _Header, *, ok: bool) -> bool:
    """Whether to send a (commit) ACK at all: always in original mode, per MSH-15 in enhanced mode."""
    if not header.enhanced:
        return True
    mode = header.accept_ack
    if mode == "NE":
        return False
    if mode == "ER":
        return not ok
    if mode == "SU":
        return ok
    return True  # AL, or empty MSH-15 with MSH-16 set


def _peer(writer: asyncio.StreamWriter) -> tuple[str, str]:
    """The peer's address, and ``address:port`` for logs."""
    info = writer.get_extra_info("peername")
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), f"{info[0]}:{info[1]}"
    return str(info), str(info)


def _tls_reason(exc: BaseException) -> str:
    """Why a handshake failed, as OpenSSL names it (``TLSV1_ALERT_UNKNOWN_CA``) or the error's class."""
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else type(exc).__name__


SPEC: dict[str, Any] = {  # the keys of one ingest.mllp[] entry
    "type": "object",
    "additionalProperties": False,
    "required": ["port", "queue"],
    "properties": {
        "name": {**project_schema.NAME,
                 "description": "in logs and in the `x-mw-ingest` header (`mllp:<name>`); default `mllp-<port>`"},
        "host": {"type": "string", "minLength": 1, "default": "127.0.0.1",
                 "description": "address to listen on; `0.0.0.0` accepts other hosts (then set allowed_peers, tls)"},
        "port": {"type": "integer", "minimum": 0, "maximum": 65535, "description": "TCP port (0: any free port)"},
        "queue": {"type": "string", "minLength": 1, "description": "a route's `source.queue`: where it publishes"},
        "ack": {"enum": ["after-confirm", "none"], "default": "after-confirm",
                "description": "answer each message after the broker's confirm, or never answer"},
        "max_message_bytes": {"type": "integer", "minimum": 64, "default": 1_048_576,
                              "description": "largest frame; a larger one is answered AE, then the connection closes"},
        "idle_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 300,
                         "description": "seconds without a byte before a connection is closed"},
        "frame_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 60,
                          "description": "seconds from a start block to its end block"},
        "max_connections": {"type": "integer", "minimum": 1, "default": 500,
                            "description": "connections open at once; more are closed at accept"},
        "max_buffered_bytes": {"type": "integer", "minimum": 64, "default": 33_554_432,  # >= max_message_bytes
                               "description": "unfinished frames of all connections together; past it the "
                                              "connection holding the most is dropped"},
        "allowed_peers": project_schema.ALLOWED_PEERS,
        "tls": project_schema.SERVER_TLS,
    },
}


@register("mllp", SPEC)
def _mllp_gateway(listener: MllpListener, context: GatewayContext) -> MllpGateway:
    """The gateway of one ``ingest.mllp[]`` entry: it feeds the route consuming ``listener.queue``."""
    route = next(r for r in context.routes.values() if r.source_queue == listener.queue)  # checked by the loader
    return MllpGateway(listener, context.broker, context.settings, route, context.metrics)
