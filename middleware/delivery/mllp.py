"""``type: mllp``: each event as an HL7 v2 message over MLLP (optionally TLS), delivered on the receiver's ACK.

The event is written with the template for its type (:mod:`.hl7_template`: ADT^A01/A02/A03/A04/A08,
ORU^R01 built in, changed per connector with ``templates:``). MSH-10 is derived from the event
id, so a redelivered event carries the same control id and the receiver can drop the duplicate;
MSH-7 is the time of sending; MSH-3..6 come from the connector.

MLLP is request/response: a connection carries one message at a time and waits for its ACK. The
connector keeps up to ``pool`` connections open between deliveries and opens a new one after any
failure (a connection whose ACK never came is never reused: a late ACK would answer the wrong
message). An idle connection the receiver closed (many drop idle senders) is replaced before use,
and a send that fails on a reused connection is tried once more on a new one. Outcomes:

- ``AA`` / ``CA``: delivered.
- ``AE`` / ``CE``: the receiver refused the message: dead letter at once, with the ACK's text
  (MSA-3, else ERR-8 / ERR-7 / ERR-3.2) in the reason.
- ``AR`` / ``CR``, an ACK for another control id or no ACK: retried (``AR`` always; a timeout when
  ``retry_on`` lists ``timeout``, a refused or dropped connection when it lists ``connection``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import ssl
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from middleware import project_schema
from middleware.delivery import hl7_template
from middleware.delivery.base import Connector, ConnectorSpec, Delivery, register
from middleware.errors import DeliveryError, EngineStopping, ParseError
from middleware.formats import hl7v2
from middleware.ingest.mllp_framing import FrameDecoder, FramingError, frame
from middleware.tls import TlsOptions, client_context

log = logging.getLogger("middleware.delivery")

DEFAULT_TIMEOUT = 10.0
MAX_ACK_BYTES = 1 << 20  # an ACK is a few hundred bytes; a megabyte means the peer is not answering ACKs
_READ_CHUNK = 65536
_REASON_CHARS = 300
CHARSETS = {"ASCII": "ascii", "8859/1": "latin-1", "UNICODE UTF-8": "utf-8"}  # MSH-18 -> Python codec

_SOURCE = {"oneOf": [{"type": "string", "minLength": 1}, {"type": "object"}, {"type": "null"}]}

SPEC: dict[str, Any] = {  # the keys of a connectors/<name>.yaml with type: mllp
    "type": "object",
    "required": ["host", "port"],
    "properties": {
        "host": {"type": "string", "minLength": 1, "description": "the receiving system's MLLP host"},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "its MLLP port"},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "default": DEFAULT_TIMEOUT,
                    "description": "seconds to connect, send and receive the ACK; no ACK in time is retried"},
        "pool": {"type": "integer", "minimum": 1, "maximum": 16, "default": 1,
                 "description": "connections kept open; each carries one message at a time"},
        "sending_application": {"type": "string", "default": "MIDDLEWARE", "description": "MSH-3"},
        "sending_facility": {"type": "string", "default": "", "description": "MSH-4"},
        "receiving_application": {"type": "string", "default": "", "description": "MSH-5"},
        "receiving_facility": {"type": "string", "default": "", "description": "MSH-6"},
        "processing_id": {"enum": ["P", "T", "D"], "default": "P", "description": "MSH-11"},
        "version": {"type": "string", "pattern": r"^2\.\d+(\.\d+)?$", "default": "2.5.1", "description": "MSH-12"},
        "charset": {"enum": list(CHARSETS), "default": "UNICODE UTF-8",
                    "description": "MSH-18 and the bytes' encoding; a value the charset cannot hold dead-letters"},
        "templates": {
            "type": "object",
            "additionalProperties": {
                "type": "object", "additionalProperties": False,
                "properties": {"message_type": {"type": "string", "pattern": r"^[A-Z0-9]{3}(\^[A-Z0-9_]+){0,2}$"},
                               "fields": {"type": "object", "additionalProperties": _SOURCE}}},
            "description": "per event type (`patient.admitted`): `message_type` (MSH-9) and `fields` "
                           "(`PID-5.1: patient.name.family`, `{value: X}`, `{path, as, map, default, required}`, "
                           "`null` removes a built-in field) over the built-in ADT/ORU templates"},
        "tls": {**project_schema.TLS_CLIENT,
                "description": "MLLP over TLS: `ca_file`, `cert_file` / `key_file` (mutual TLS), `verify` "
                               "(default true); paths relative to the project"},
    },
}


def control_id(event_id: str) -> str:
    """MSH-10 for an event: 20 characters (the v2.5 limit) derived from the event id, the same on every try."""
    try:
        return uuid.UUID(event_id).hex[:20].upper()
    except ValueError:
        return hashlib.sha256(event_id.encode()).hexdigest()[:20].upper()


def check_options(options: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """Templates that cannot be built (a bad target path or source); ``validate`` reports them at their line."""
    try:
        hl7_template.from_yaml(options.get("templates"))
    except ValueError as exc:
        return [(("templates",), f"templates: {exc}")]
    return []


class AckError(Exception):
    """What came back is not an ACK we can read."""


def read_ack(body: bytes, expected_id: str) -> tuple[str, str]:
    """``(MSA-1 code, text)`` of an ACK to the message ``expected_id``; raises :class:`AckError`."""
    try:
        message = hl7v2.parse(body)
    except ParseError as exc:
        raise AckError(f"unreadable ACK ({exc.message})") from None
    if not message.all("MSA"):
        raise AckError("the answer has no MSA segment")
    code = (message.get("MSA-1") or "").strip().upper()
    answered = (message.get("MSA-2") or "").strip()
    if answered != expected_id:
        raise AckError(f"ACK for control id {answered[:20]!r}, expected {expected_id!r}")
    text = next((value for value in (message.get(path) for path in ("MSA-3", "ERR-8", "ERR-7", "ERR-3.2"))
                 if value and value.strip()), "")
    return code, " ".join(text.split())[:_REASON_CHARS]


class _Link:
    """One open MLLP connection: sends a frame, reads one frame back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(MAX_ACK_BYTES)

    async def exchange(self, payload: bytes) -> bytes:
        self.writer.write(frame(payload))
        await self.writer.drain()
        while True:
            got = self.decoder.next()
            if got is not None:
                return got.body
            chunk = await self.reader.read(_READ_CHUNK)
            if not chunk:
                self.decoder.close()
                raise ConnectionResetError("the receiver closed the connection before its ACK")
            self.decoder.feed(chunk)

    def close(self) -> None:
        self.writer.close()


@register("mllp", SPEC)
class MllpConnector(Connector):
    """Sends events as HL7 v2 messages over MLLP; up to ``pool`` connections, one message in flight on each."""

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        options = spec.options
        self.host = str(options["host"])
        self.port = int(options["port"])
        self.timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        self.pool_size = int(options.get("pool", 1))
        self.charset = str(options.get("charset", "UNICODE UTF-8"))
        self.templates = hl7_template.from_yaml(options.get("templates"))
        tls = options.get("tls")
        self.tls: TlsOptions | None = TlsOptions.from_yaml(tls, Path()) if isinstance(tls, Mapping) else tls
        self._header = {key: str(options.get(key, default)) for key, default in (
            ("sending_application", "MIDDLEWARE"), ("sending_facility", ""), ("receiving_application", ""),
            ("receiving_facility", ""), ("processing_id", "P"), ("version", "2.5.1"))}
        self._idle: list[_Link] = []
        self._slots = asyncio.Semaphore(self.pool_size)
        self._closed = False

    def message(self, delivery: Delivery, now: dt.datetime | None = None) -> bytes:
        """The HL7 v2 bytes for ``delivery``; raises a non-retryable :class:`DeliveryError` when the event
        cannot be written (no template for its type, a required value missing)."""
        try:
            event = orjson.loads(delivery.body)
        except orjson.JSONDecodeError:
            raise DeliveryError(f"{self.name}: the event is not JSON", retryable=False,
                                hint="the delivery queue holds something else than a CloudEvent") from None
        kind = hl7_template.event_kind(delivery.event_type or (str(event.get("type", "")) if isinstance(event, dict)
                                                               else ""))
        template = self.templates.get(kind)
        if template is None or not isinstance(event, dict):
            raise DeliveryError(f"{self.name}: no HL7 template for event type {kind!r}", retryable=False,
                                hint=f"add templates.{kind} (message_type, fields) to the connector, or a `when:` "
                                     "on the delivery so such events are not sent here")
        moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        header = hl7_template.Header(control_id=control_id(delivery.event_id or str(event.get("id", ""))),
                                     timestamp=moment.strftime("%Y%m%d%H%M%S") + "+0000",
                                     charset="" if self.charset == "ASCII" else self.charset, **self._header)
        try:
            text = hl7_template.render(template, event, header)
            return text.encode(CHARSETS[self.charset])
        except hl7_template.TemplateError as exc:
            raise DeliveryError(f"{self.name}: cannot write {kind} as {template.message_type}: {exc}",
                                retryable=False, hint="fix the connector's template or the route's mapping, "
                                                      "then replay the dead letter") from None
        except UnicodeEncodeError:
            raise DeliveryError(f"{self.name}: a value does not fit charset {self.charset}", retryable=False,
                                hint="set the connector's charset to UNICODE UTF-8 if the receiver takes it") from None

    async def send(self, delivery: Delivery) -> None:
        if self._closed:  # shutting down after a drain timeout: the message goes back to its queue
            raise EngineStopping(f"{self.name}: connector is closed", hint="the engine is stopping")
        payload = self.message(delivery)
        expected = _msh10(payload)  # what was sent (a template may set MSH-10 itself)
        async with self._slots:
            code, text = await self._exchange(payload, expected)
        if code in ("AA", "CA"):
            return
        reason = f": {text}" if text else ""
        if code in ("AE", "CE"):
            raise DeliveryError(f"{self.name}: {self.describe()} answered {code}{reason}", retryable=False,
                                hint="the receiver refused the message: fix the template, the mapping or the "
                                     "receiver, then replay the dead letter")
        raise DeliveryError(f"{self.name}: {self.describe()} answered {code or 'no MSA-1'}{reason}", retryable=True,
                            hint="the receiver could not take the message now: it will be retried")

    async def _exchange(self, payload: bytes, expected: str) -> tuple[str, str]:
        """Send on an idle connection (or a new one) and read the ACK (code, text); a connection that
        failed or answered something else than this message's ACK is dropped."""
        retry_on = self.spec.retry.retry_on
        link: _Link | None = None
        try:
            async with asyncio.timeout(self.timeout):
                link = self._reusable()
                if link is not None:
                    try:
                        body = await link.exchange(payload)
                    except (OSError, FramingError):  # closed by the receiver while idle: once more, afresh
                        self._drop(link)
                        link = None
                if link is None:
                    link = await self._connect()
                    body = await link.exchange(payload)
        except TimeoutError:
            self._drop(link)
            raise DeliveryError(f"{self.name}: {self.describe()}: no ACK within {self.timeout:g}s",
                                retryable="timeout" in retry_on,
                                hint="check the receiver's health or raise the connector's timeout") from None
        except ssl.SSLCertVerificationError as exc:
            self._drop(link)
            raise DeliveryError(f"{self.name}: {self.describe()}: server certificate not trusted "
                                f"({exc.verify_message})", retryable=False,
                                hint="set the connector's tls.ca_file to the receiver's CA, then replay") from None
        except (OSError, FramingError, ssl.SSLError) as exc:
            self._drop(link)
            raise DeliveryError(f"{self.name}: {self.describe()} failed: {type(exc).__name__}",
                                retryable="connection" in retry_on,
                                hint="check that the receiver is up and reachable") from None
        except BaseException:
            self._drop(link)
            raise
        assert link is not None
        try:
            answer = read_ack(body, expected)
        except AckError as exc:
            self._drop(link)
            raise DeliveryError(f"{self.name}: {self.describe()}: {exc}", retryable=True,
                                hint="the answer is not an ACK to this message: it will be retried") from None
        if self._closed:
            link.close()
        else:
            self._idle.append(link)
        return answer

    def _reusable(self) -> _Link | None:
        """An idle connection the receiver has not closed meanwhile (receivers drop idle ones), or None."""
        while self._idle:
            link = self._idle.pop()
            if not link.reader.at_eof() and not link.writer.is_closing():
                return link
            self._drop(link)
        return None

    async def _connect(self) -> _Link:
        context = client_context(self.tls) if self.tls is not None else None
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=context,
                                                       server_hostname=self.host if context else None)
        log.info("mllp connection opened", extra={"connector": self.name, "target": self.describe()})
        return _Link(reader, writer)

    @staticmethod
    def _drop(link: _Link | None) -> None:
        if link is not None:
            with contextlib.suppress(Exception):
                link.writer.transport.abort()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for link in idle:
            link.close()
            with contextlib.suppress(Exception):
                await link.writer.wait_closed()

    def describe(self) -> str:
        return f"mllp{'s' if self.tls is not None else ''}://{self.host}:{self.port}"

    check = staticmethod(check_options)


def _msh10(payload: bytes) -> str:
    first = payload.split(b"\r", 1)[0].decode("latin-1")
    fields = first.split(first[3:4]) if len(first) > 3 else []
    return fields[9] if len(fields) > 9 else ""
