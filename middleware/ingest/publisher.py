"""The one way in: raw bytes onto a route's inbound queue, each confirmed by the broker.

Every way a message arrives (the ``publish`` command, gateways, the Python API) goes through a
:class:`Publisher`: it sets the correlation id and the ``x-mw-ingest`` source header, splits an
input into records through its route's format (``Format.split``: an HL7 batch file gives one
message per record), keeps many publishes in flight for throughput while knowing exactly which
positions are confirmed, and dead-letters a record that cannot even be framed, with its reason.

    publisher = Publisher(broker, route, settings)
    await publisher.declare()
    correlation_id = await publisher.publish(raw, source="mllp:adt")
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from middleware.broker import Broker, OutgoingMessage, make_broker
from middleware.deadletter import dead_letter_body
from middleware.errors import BrokerError, ConfigError, ParseError, Problem
from middleware.formats import Record, SplitInfo
from middleware.ingest.ledger import Finished, Ledger, file_digest
from middleware.journal import NULL_JOURNAL, NullJournal
from middleware.journal.hooks import RECEIVED_AT_HEADER, stamp
from middleware.journal.records import DEAD_LETTERED, INGEST, RECEIVED
from middleware.project import Settings, load_project
from middleware.route import Route
from middleware.topology import RouteTopology, declare
from middleware.tracecontext import TRACEPARENT
from middleware.tracecontext import new as new_trace
from middleware.tracing import NULL_TRACING, Tracing

log = logging.getLogger("middleware.ingest")

INGEST_HEADER = "x-mw-ingest"  # who put the message on the queue: "publish", "mllp:<listener>", ...
SOURCE_FILE_HEADER = "x-mw-source-file"
BATCH_ID_HEADER = "x-mw-batch-id"
BATCH_POSITION_HEADER = "x-mw-batch-position"
BATCH_TOTAL_HEADER = "x-mw-batch-total"
SENDER_BATCH_HEADER = "x-mw-batch-sender-id"  # the sender's own batch id (HL7 BHS-11 / FHS-11, X12 ISA-13)
CONTENT_TYPES = {"hl7v2": "x-application/hl7-v2+er7", "json": "application/json", "fhir": "application/fhir+json"}
DEFAULT_WINDOW = 256  # publishes awaiting their confirm at once while splitting an input
_READ_AHEAD = 256  # records split per trip to the reading thread
_ids = random.Random()  # seeded from os.urandom once: ids need uniqueness, and urandom costs ~60 µs a call here


def new_id() -> str:
    """A random (version 4) UUID for a correlation or message id."""
    return str(uuid.UUID(int=_ids.getrandbits(128), version=4))


class FramingError(ParseError):
    """A record of an input that is not a message at all (dead-lettered when publishing)."""


@dataclass(frozen=True)
class Published:
    """One record put on the inbound queue (or dead-lettered there, ``dead_lettered``), confirmed."""

    correlation_id: str
    position: int | None = None  # 1-based record number inside a batch; None for a single message
    dead_lettered: bool = False
    error: str | None = None  # why it could not be framed, when dead-lettered
    message_id: str | None = None  # the AMQP message id it was published (or dead-lettered) with


@dataclass
class StreamResult:
    """What publishing one input did. ``resume_from`` is set when it stopped early: every record
    before that position is confirmed, none after it was taken (``--from`` starts there)."""

    published: int = 0
    dead_lettered: int = 0
    skipped: int = 0  # records before ``start``
    batch: bool = False  # the input was split into several records
    info: SplitInfo = field(default_factory=SplitInfo)
    resume_from: int | None = None
    error: BrokerError | None = None  # why it stopped early, when the broker failed

    @property
    def complete(self) -> bool:
        return self.resume_from is None


class Publisher:
    """Publishes raw inputs to one route's inbound queue with broker confirms.

    The public API for a Python source system (``from middleware import Publisher``)::

        async with await Publisher.connect("adt-inbound", project="/srv/integration") as publisher:
            correlation_id = await publisher.publish(hl7_bytes)

    :meth:`publish` returns once the broker confirmed the message (raises
    :class:`middleware.errors.BrokerError` otherwise: resend, it is at-least-once).
    ``window``: how many publishes of one input may await their confirm at once.
    """

    def __init__(self, broker: Broker, route: Route, settings: Settings, *, window: int = DEFAULT_WINDOW,
                 journal: NullJournal = NULL_JOURNAL) -> None:
        self.broker = broker
        self.journal = journal  # records what comes in (the engine gives gateways its own)
        self.tracing: Tracing = NULL_TRACING  # ingest spans (the engine gives gateways its own)
        self.route = route
        self.settings = settings
        self.window = max(window, 1)
        self._owns_broker = False
        self.topology = RouteTopology.of(route, settings.queue_prefix)
        self.queue = self.topology.inbound
        self.dead_letter_queue = self.topology.dead_letter
        self.content_type = CONTENT_TYPES.get(route.format.name, "application/octet-stream")

    @classmethod
    async def connect(cls, route: str, *, project: str | Path = ".", broker_url: str | None = None,
                      env: Mapping[str, str] | None = None) -> Publisher:
        """A publisher for ``route`` of the project in ``project``, connected and its queues declared.

        The broker is the project's (``broker.url``, ``MIDDLEWARE_BROKER_URL``) unless ``broker_url``
        is given; ``env`` fills ``${VAR}`` (default: the process environment). Raises
        :class:`middleware.errors.ConfigError` for an invalid project or an unknown route, and
        :class:`middleware.errors.BrokerError` when the broker cannot be reached. :meth:`close` (or
        ``async with``) closes the connection it opened.
        """
        loaded = load_project(project, env)
        if route not in loaded.routes:
            known = ", ".join(sorted(loaded.routes))
            raise ConfigError([Problem("routes/", 1, f"no route {route!r} in {project} (routes: {known})")])
        broker = make_broker(broker_url or loaded.settings.broker_url, loaded.settings.broker_tls)
        await broker.connect()
        publisher = cls(broker, loaded.routes[route], loaded.settings)
        publisher._owns_broker = True
        try:
            await publisher.declare()
        except BaseException:
            await broker.close()
            raise
        return publisher

    async def close(self) -> None:
        """Close the broker connection :meth:`connect` opened (a broker passed in is left open)."""
        if self._owns_broker:
            self._owns_broker = False
            await self.broker.close()

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def declare(self) -> None:
        """Declare the route's queues (the same arguments as the engine's declarations)."""
        await declare(self.broker, self.topology, self.settings.delivery_limit)

    async def publish(self, raw: bytes, *, source: str = "python", correlation_id: str | None = None,
                      headers: Mapping[str, Any] | None = None, message_id: str | None = None) -> str:
        """Publish one message unchanged; returns its correlation id once the broker confirmed it.

        ``source`` goes in the ``x-mw-ingest`` header (who sent it); a ``correlation_id`` given is
        kept, else a new one is made; ``headers`` are added to the message.
        """
        cid, mid, now = correlation_id or new_id(), message_id or new_id(), time.time()
        sent = {INGEST_HEADER: source, RECEIVED_AT_HEADER: stamp(now), TRACEPARENT: new_trace(), **(headers or {})}
        span = self.tracing.start("ingest", headers.get(TRACEPARENT) if headers else None, "producer",
                                  route=self.route.name, source=source, correlation_id=cid,
                                  message_id=mid)  # NULL_SPAN when off (middleware.tracing)
        if span.traceparent:
            sent[TRACEPARENT] = span.traceparent
        try:
            await self.broker.publish(self._message(raw, cid, sent, mid),
                                      queue=self.queue)  # a traceparent in headers (HTTP ingest) is kept
        except BaseException as exc:
            span.end("failed", exc)
            raise
        span.end("published")
        self.journal.record(self.route.name, INGEST, RECEIVED, at=now, correlation_id=cid, message_id=mid,
                            source=source)
        return cid

    async def dead_letter(self, raw: bytes, error: ParseError, *, source: str, correlation_id: str | None = None,
                          headers: Mapping[str, Any] | None = None, message_id: str | None = None) -> str:
        """Put ``raw``, which cannot be taken in, on the route's dead-letter queue with its reason."""
        cid, mid = correlation_id or new_id(), message_id or new_id()
        kept = {INGEST_HEADER: source, RECEIVED_AT_HEADER: stamp(time.time()),  # a replay's age counts from here
                TRACEPARENT: new_trace(), **(headers or {})}
        message = dead_letter_body(raw, headers=kept,
                                   content_type=self.content_type, message_id=mid,
                                   route=self.route.name, stage=error.stage or "parse", error=error,
                                   replay_queue=self.queue, correlation_id=cid)
        await self.broker.publish(message, queue=self.dead_letter_queue)
        self.journal.record(self.route.name, INGEST, DEAD_LETTERED, correlation_id=cid, message_id=mid, source=source,
                            error_class=type(error).__name__, detail=error.stage or "parse")
        return cid

    async def publish_stream(self, stream: BinaryIO, *, source: str, name: str | None = None, start: int = 1,
                             correlation_id: str | None = None, stop: asyncio.Event | None = None,
                             on_published: Callable[[Published], None] | None = None,
                             split: Callable[[BinaryIO, SplitInfo], Iterator[Record]] | None = None,
                             batch_id: str | None = None, total: int | None = None) -> StreamResult:
        """Split ``stream`` through the route's format and publish each record from position ``start``.

        ``name`` (a file name) goes in ``x-mw-source-file`` on batch records; ``batch_id`` (the file's
        digest, :func:`middleware.ingest.ledger.file_digest`) in ``x-mw-batch-id`` (the sender's own
        batch id then goes in ``x-mw-batch-sender-id``), ``total`` (the record count, when known before
        publishing) in ``x-mw-batch-total``. Setting ``stop``
        ends it early, cleanly: no record is taken after that, the confirms in flight are awaited,
        and ``resume_from`` says where to start again. A broker failure ends it the same way, with
        ``error`` set. ``on_published`` is called once per record, in position order. ``split``
        replaces the route format's splitter (the HTTP gateway splits NDJSON and CSV bodies).
        """
        result = StreamResult()
        records = (split or self.route.format.split)(stream, result.info)
        in_flight: deque[tuple[Record, str, str, asyncio.Task[str]]] = deque()
        next_position = start

        async def settle(oldest_only: bool) -> None:
            """Take finished publishes off the front, in order; a failure stops taking records."""
            nonlocal next_position
            while in_flight and (not oldest_only or in_flight[0][3].done() or len(in_flight) >= self.window):
                record, cid, mid, task = in_flight[0]
                try:
                    await task
                except BrokerError as exc:
                    result.error = result.error or exc
                if result.error is not None:  # this and everything after it: not known to be confirmed
                    in_flight.popleft()
                    continue
                in_flight.popleft()
                if record.error is None:
                    result.published += 1
                else:
                    result.dead_lettered += 1
                next_position = (record.position or 0) + 1
                if on_published is not None:
                    on_published(Published(cid, record.position, record.error is not None, record.error, mid))

        exhausted = False
        try:
            while result.error is None and not (stop is not None and stop.is_set()):
                batch = await asyncio.to_thread(_take, records, _READ_AHEAD)
                exhausted = len(batch) < _READ_AHEAD
                for index, record in enumerate(batch):
                    if result.error is not None or (stop is not None and stop.is_set()):
                        exhausted = False  # records left untaken
                        break
                    if record.position is not None:
                        result.batch = True
                        if record.position < start:
                            result.skipped += 1
                            continue
                    cid, mid = correlation_id or new_id(), new_id()
                    headers = self._record_headers(record, name, result.info, batch_id, total)
                    send = (self.publish(record.raw, source=source, correlation_id=cid, headers=headers,
                                         message_id=mid)
                            if record.error is None else
                            self.dead_letter(record.raw, FramingError(record.error), source=source,
                                             correlation_id=cid, headers=headers, message_id=mid))
                    in_flight.append((record, cid, mid, asyncio.ensure_future(send)))
                    await settle(oldest_only=True)
                    exhausted = exhausted and index == len(batch) - 1
                if exhausted:
                    break
            await settle(oldest_only=False)
        finally:
            for _, _, _, task in in_flight:  # cancelled from outside: nothing left running
                task.cancel()
        if result.error is not None or not exhausted:
            result.resume_from = next_position
        for problem in result.info.problems:
            log.warning("batch envelope mismatch", extra={"file": name, "problem": problem})
        return result

    def _record_headers(self, record: Record, name: str | None, info: SplitInfo, batch_id: str | None,
                        total: int | None) -> dict[str, Any]:
        headers: dict[str, Any] = dict(record.headers)
        if record.position is not None:
            headers[BATCH_POSITION_HEADER] = record.position
            if name:
                headers[SOURCE_FILE_HEADER] = name
            if batch_id:
                headers[BATCH_ID_HEADER] = batch_id
                if info.batch_id:
                    headers[SENDER_BATCH_HEADER] = info.batch_id
            elif info.batch_id:
                headers[BATCH_ID_HEADER] = info.batch_id
            if total is not None:
                headers[BATCH_TOTAL_HEADER] = total
        return headers

    def _message(self, raw: bytes, correlation_id: str, headers: Mapping[str, Any],
                 message_id: str | None = None) -> OutgoingMessage:
        return OutgoingMessage(body=raw, headers=dict(headers), correlation_id=correlation_id,
                               message_id=message_id or new_id(), content_type=self.content_type)


def _take(records: Iterator[Record], count: int) -> list[Record]:
    """Up to ``count`` more records (reading the input: run in a thread)."""
    return list(itertools.islice(records, count))


class _CountingReader:
    """A binary file that counts the bytes read from it (read by the progress display)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.bytes_read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._stream.seek(offset, whence)
        self.bytes_read = position
        return position


@dataclass
class FileResult:
    """One file of a :func:`publish_files` call: what publishing it did.

    ``digest``: the file's id (SHA-256); ``duplicate``: the ledger line of an earlier complete publish of
    the same file to the same route (then nothing was published); ``resumed_from``: the position a
    checkpoint left by an interrupted publish made it start at; ``total``: the records the file declares
    up front, when its format can tell.
    """

    path: Path
    size: int
    result: StreamResult = field(default_factory=StreamResult)
    digest: str | None = None
    duplicate: Finished | None = None
    resumed_from: int | None = None
    total: int | None = None

    @property
    def control_total(self) -> str:
        """The control-total check of the file: "ok", "not declared" or what disagrees."""
        info = self.result.info
        if info.problems:
            return "; ".join(info.problems)
        return "ok" if info.declared is not None else "not declared"


@dataclass
class FilesProgress:
    """Live figures while :func:`publish_files` runs (the CLI draws its progress bar from them)."""

    current: FileResult | None = None
    reader: _CountingReader | None = None

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read if self.reader is not None else 0


async def publish_files(publisher: Publisher, paths: list[Path], *, start: int = 1, correlation_id: str | None = None,
                        stop: asyncio.Event | None = None,
                        on_published: Callable[[Path, Published], None] | None = None,
                        progress: FilesProgress | None = None, ledger: Ledger | None = None,
                        force: bool = False, source: str = "publish") -> list[FileResult]:
    """Publish files in order, each split into records; ``start`` applies to the first file.

    Each file's id is its SHA-256 (``x-mw-batch-id``). With a ``ledger``, a file already published
    to the end on this route is reported (``duplicate``) and not published again unless ``force``;
    the confirmed position is checkpointed while publishing, and a file whose publish was cut short
    (a crash, Ctrl-C) resumes after its checkpoint unless ``start`` is given or ``force``; a ``start``
    past 1 publishes from there even if the file was published before.
    Stops after the file that stopped early (``stop`` set, or the broker failed): the last
    :class:`FileResult` then has ``resume_from``; files after it were not read.
    """
    done: list[FileResult] = []
    route = publisher.route.name
    for index, path in enumerate(paths):
        if stop is not None and stop.is_set():
            break
        file = FileResult(path, path.stat().st_size)
        done.append(file)
        with path.open("rb") as raw:
            file.digest = await asyncio.to_thread(file_digest, raw)
            raw.seek(0)
            first = start if index == 0 else 1
            checkpoint = None
            if ledger is not None:
                explicit = force or first > 1  # --from N asks for those records whatever the ledger says
                file.duplicate = None if explicit else await asyncio.to_thread(ledger.finished, route, file.digest)
                if file.duplicate is not None:
                    continue
                checkpoint = ledger.checkpoint(route, file.digest)
                if force:
                    checkpoint.position = 0
                elif first == 1 and checkpoint.position > 0:
                    first = file.resumed_from = checkpoint.position + 1
            declared_total = getattr(publisher.route.format, "declared_total", None)
            if declared_total is not None:
                file.total = await asyncio.to_thread(declared_total, raw)
                raw.seek(0)
            reader = _CountingReader(raw)
            if progress is not None:
                progress.current, progress.reader = file, reader

            def report(item: Published, path: Path = path, checkpoint: Any = checkpoint) -> None:
                if checkpoint is not None and item.position is not None:
                    checkpoint.advance(item.position)
                if on_published is not None:
                    on_published(path, item)

            try:
                file.result = await publisher.publish_stream(
                    reader, source=source, name=path.name, start=first,  # type: ignore[arg-type]
                    correlation_id=correlation_id, stop=stop, on_published=report, batch_id=file.digest,
                    total=file.total)
            finally:
                if checkpoint is not None:
                    checkpoint.close()
        if not file.result.complete:
            break
        if ledger is not None and checkpoint is not None:
            result = file.result
            ledger.record(route, file.digest, path.name, records=result.info.records, published=result.published,
                          dead_lettered=result.dead_lettered, problems=result.info.problems)
            checkpoint.remove()
    return done


class SyncPublisher:
    """:class:`Publisher` for code that is not async (``from middleware import SyncPublisher``)::

        with SyncPublisher("adt-inbound", project="/srv/integration") as publisher:
            correlation_id = publisher.publish(hl7_bytes)

    Each call returns once the broker confirmed. It runs its own event loop: use it from one
    thread, and not inside a running event loop (use :class:`Publisher` there).
    """

    def __init__(self, route: str, *, project: str | Path = ".", broker_url: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self._runner = asyncio.Runner()
        try:
            self._publisher = self._runner.run(Publisher.connect(route, project=project, broker_url=broker_url,
                                                                 env=env))
        except BaseException:
            self._runner.close()
            raise

    def publish(self, raw: bytes, *, source: str = "python", correlation_id: str | None = None,
                headers: Mapping[str, Any] | None = None) -> str:
        """Publish one message unchanged; its correlation id once confirmed (see :meth:`Publisher.publish`)."""
        return self._runner.run(self._publisher.publish(raw, source=source, correlation_id=correlation_id,
                                                        headers=headers))

    def publish_file(self, path: str | Path, *, source: str = "python") -> StreamResult:
        """Publish a file split into records by the route's format (an HL7 batch: one message each)."""
        file = Path(path)

        async def publish() -> StreamResult:
            with file.open("rb") as stream:
                digest = await asyncio.to_thread(file_digest, stream)
                stream.seek(0)
                return await self._publisher.publish_stream(stream, source=source, name=file.name, batch_id=digest)

        return self._runner.run(publish())

    def close(self) -> None:
        """Close the broker connection and the event loop."""
        try:
            self._runner.run(self._publisher.close())
        finally:
            self._runner.close()

    def __enter__(self) -> SyncPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
