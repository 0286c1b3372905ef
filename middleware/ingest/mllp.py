"""MLLP gateway: HL7 v2 over TCP onto a route's inbound queue, ACK only after the broker's confirm.

Framing (MLLP release 1): ``0x0B <message> 0x1C 0x0D``. One connection handles its messages in
order: a sender waits for each ACK before it sends the next message; many connections run at once.

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
import time
import uuid
from dataclasses import dataclass

from middleware.broker import naming
from middleware.broker.base import Broker, OutgoingMessage
from middleware.deadletter import dead_letter_body
from middleware.errors import BrokerError, ConfigError, ParseError, Problem
from middleware.formats import hl7v2
from middleware.ingest import MllpListener
from middleware.observe import Metrics
from middleware.project import Settings
from middleware.route import Route

log = logging.getLogger("middleware.ingest.mllp")

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\r"
CONTENT_TYPE = "x-application/hl7-v2+er7"
INGEST_HEADER = "x-mw-ingest"

# HL7 table 0357 (message error condition codes)
ERR_DATA = ("102", "Data type error")
ERR_INTERNAL = ("207", "Application internal error")

_READ_CHUNK = 65536


class FramingError(Exception):
    """A frame that breaks MLLP framing (oversize, no start block, cut off)."""


class _FrameTooLarge(FramingError):
    def __init__(self, head: bytes, size: int) -> None:
        super().__init__(f"message exceeds the maximum size ({size} bytes read)")
        self.head = head
        self.size = size


class _ConnectionIdle(Exception):
    pass


@dataclass(frozen=True)
class _Frame:
    body: bytes
    has_start: bool = True  # False: bytes ended by an end block with no start block before them


class _FrameReader:
    """Buffered MLLP framing over a StreamReader; ``next()`` returns None on a clean EOF."""

    def __init__(self, reader: asyncio.StreamReader, max_bytes: int, idle_timeout: float) -> None:
        self._reader = reader
        self._max = max_bytes
        self._idle = idle_timeout
        self._buf = bytearray()
        self.skipped = 0  # junk bytes before start blocks (CR/LF between frames not counted)
        self.dropped_partial = 0  # frames abandoned because a new start block came before the end block

    async def _fill(self) -> bool:
        try:
            chunk = await asyncio.wait_for(self._reader.read(_READ_CHUNK), self._idle)
        except TimeoutError:
            raise _ConnectionIdle from None
        if not chunk:
            return False
        self._buf += chunk
        return True

    def _skip(self, count: int) -> None:
        junk = bytes(self._buf[:count])
        self.skipped += len(junk.strip(b"\r\n"))
        del self._buf[:count]

    async def next(self) -> _Frame | None:
        # find the start block
        while True:
            start = self._buf.find(START_BLOCK)
            end = self._buf.find(END_BLOCK)
            if end != -1 and (start == -1 or end < start):
                body = bytes(self._buf[:end]).strip(b"\r\n")
                del self._buf[:end + 1]
                if body:
                    return _Frame(body, has_start=False)
                continue
            if start != -1:
                self._skip(start)
                del self._buf[:1]
                break
            if len(self._buf) > self._max:
                raise _FrameTooLarge(bytes(self._buf[:4096]), len(self._buf))
            if not await self._fill():
                self._skip(len(self._buf))
                return None
        # find the end block
        searched = 0
        while True:
            end = self._buf.find(END_BLOCK, searched)
            restart = self._buf.find(START_BLOCK, searched, end if end != -1 else len(self._buf))
            if restart != -1:  # a new frame began before this one ended: drop the cut-off one
                self.dropped_partial += 1
                del self._buf[:restart + 1]
                searched = 0
                continue
            if end != -1:
                if end > self._max:
                    raise _FrameTooLarge(bytes(self._buf[:4096]), end)
                body = bytes(self._buf[:end])
                del self._buf[:end + 1]
                if self._buf[:1] == CARRIAGE_RETURN:
                    del self._buf[:1]
                return _Frame(body)
            searched = len(self._buf)
            if searched > self._max:
                raise _FrameTooLarge(bytes(self._buf[:4096]), searched)
            if not await self._fill():
                raise FramingError(f"connection closed inside a frame ({len(self._buf)} bytes, no end block)")


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


def frame(message: bytes) -> bytes:
    """Wrap ``message`` in MLLP start and end blocks."""
    return START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN


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
        prefix = settings.queue_prefix
        self.queue = naming.inbound_queue(listener.queue, prefix)
        self.dead_letter_queue = naming.dead_letter_queue(route.name, prefix)
        self.source = f"mllp:{listener.name}"
        self.port = listener.port  # the bound port once started (useful with port 0)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False

    async def start(self, *, declare: bool = True) -> None:
        """Declare the route's queues (unless ``declare`` is False) and start listening."""
        if declare:
            from middleware.engine import declare_route_topology

            await declare_route_topology(self.broker, self.route, self.settings)
        try:
            self._server = await asyncio.start_server(self._serve, self.listener.host, self.listener.port)
        except OSError as exc:
            raise ConfigError([Problem(self.listener.file, self.listener.line,
                                       f"ingest.mllp {self.listener.name}: cannot listen on "
                                       f"{self.listener.host}:{self.listener.port}: {exc.strerror or exc}")]) from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("mllp listening", extra={"listener": self.listener.name, "host": self.listener.host,
                                          "port": self.port, "queue": self.queue, "ack": self.listener.ack})

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
        self._connections.add(task)
        peer = _peer(writer)
        frames = _FrameReader(reader, self.listener.max_message_bytes, self.listener.idle_timeout)
        name = self.listener.name
        count = 0
        try:
            while not self._stopping:
                try:
                    item = await frames.next()
                except _ConnectionIdle:
                    log.info("mllp connection idle, closing", extra={"listener": name, "peer": peer})
                    break
                except _FrameTooLarge as exc:
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
                if frames.skipped or frames.dropped_partial:
                    log.warning("mllp bytes outside frames skipped", extra={
                        "listener": name, "peer": peer, "skipped_bytes": frames.skipped,
                        "cut_off_frames": frames.dropped_partial})
                    frames.skipped = frames.dropped_partial = 0
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
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            log.debug("mllp connection closed", extra={"listener": name, "peer": peer, "messages": count})

    async def _write(self, writer: asyncio.StreamWriter, ack: bytes) -> None:
        writer.write(frame(ack))
        await writer.drain()

    # -- one message ------------------------------------------------------------------------

    async def _handle(self, item: _Frame, peer: str) -> bytes | None:
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
                await asyncio.wait_for(self.broker.publish(self._message(raw, correlation_id), queue=self.queue),
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

    def _message(self, raw: bytes, correlation_id: str) -> OutgoingMessage:
        return OutgoingMessage(body=raw, headers={INGEST_HEADER: self.source}, correlation_id=correlation_id,
                               message_id=str(uuid.uuid4()), content_type=CONTENT_TYPE)

    async def _dead_letter(self, raw: bytes, error: ParseError, correlation_id: str) -> None:
        message = dead_letter_body(raw, headers={INGEST_HEADER: self.source}, content_type=CONTENT_TYPE,
                                   message_id=str(uuid.uuid4()), route=self.route.name, stage="parse", error=error,
                                   replay_queue=self.queue, correlation_id=correlation_id)
        await self.broker.publish(message, queue=self.dead_letter_queue)
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


def _peer(writer: asyncio.StreamWriter) -> str:
    info = writer.get_extra_info("peername")
    if isinstance(info, tuple) and len(info) >= 2:
        return f"{info[0]}:{info[1]}"
    return str(info)
