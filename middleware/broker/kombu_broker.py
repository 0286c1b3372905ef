"""Embedded broker adapter (kombu): ``memory://`` for tests, ``filesystem://<dir>`` as the default.

The file-backed broker is a spool folder, so a single machine needs no RabbitMQ:

- ``<dir>/queues/``: one file per ready message, written to a temporary name, fsynced, then
  renamed, so a reader never sees half a message and a power cut never loses a confirmed one.
  File names sort in FIFO order. The consumer keeps an ordered in-memory index of them, so a get
  costs the same with 100 or 100,000 messages queued (see :class:`_SpoolIndex`); temporary files
  a killed publisher left behind are removed when the consuming engine starts. Publishes that
  wait at the same time are written as one group (group commit): every file written, their bytes
  made durable at once (``syncfs``), renamed, then one fsync of the folder, then all confirmed;
- ``<dir>/processing/``: a message a consumer holds; ack deletes it, a requeue moves it back.
  After a crash (even SIGKILL) the next consumer moves leftovers back to ``queues/``: nothing is
  lost, a message in flight is delivered again (at-least-once, as on RabbitMQ);
- ``<dir>/control/``: exchange bindings (kombu's topic routing), shared by every process.

Only one engine may consume from one folder at a time (a lock file enforces it); any number of
processes may publish (``middleware publish``, gateways). kombu is synchronous, so every call
runs on one worker thread; consumers poll with ``basic_get`` and keep at most ``prefetch``
messages in flight. The delivery limit of RabbitMQ quorum queues is emulated: a message
requeued ``delivery_limit`` times goes to the queue's dead-letter queue. So is a delay queue's
per-queue TTL: a message published to it carries when it is due, and the consuming engine moves
each due message, oldest first, back to the queue it waits for (see :meth:`KombuBroker._move_due_sync`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import heapq
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import kombu.utils.json
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Producer
from kombu.transport import filesystem
from kombu.transport.virtual import Empty

from middleware.broker.base import Broker, Consumer, Handler, IncomingMessage, OutgoingMessage, QueueInfo
from middleware.errors import BrokerError, EngineStopping

log = logging.getLogger("middleware.broker")

T = TypeVar("T")
POLL_MIN, POLL_MAX = 0.005, 0.2  # seconds between polls of an empty queue (backs off)
SPOOL_PROPERTY = "mw_spool_file"
DEATH_HEADER = "x-mw-delivery-limit-exceeded"
DUE_HEADER = "x-mw-due"  # Unix time a message in a delay queue goes back to its target queue
SCAN_BUDGET = 10  # a directory scan waits at least this many times its own duration: listing stays under ~10 %
REFILL_AFTER = 0.02  # seconds: how soon an empty queue looks on disk again (other processes publish)
STALE_AFTER = 1.0  # seconds: how often a non-empty index is refreshed, so other publishers' files keep FIFO order
STALE_TMP_AGE = 2.0  # seconds: an unlocked temporary file older than this was left by a killed publisher
GROUP_COMMIT_MAX = 512  # publishes written under one folder fsync at most


class _SpoolIndex:
    """The ready message files of ``queues/``, per queue, oldest first, kept in memory.

    A get pops the oldest name of its queue (O(log n)), instead of listing the folder. Names this
    process writes or moves back are pushed as it does so; files written by other processes are
    found by a directory scan, made only when a queue's index runs dry (at most every
    ``REFILL_AFTER``) or is older than ``STALE_AFTER``, and never sooner than ``SCAN_BUDGET`` times
    the last scan's duration, so a huge backlog makes scans rarer, not gets slower. A popped name
    whose file is gone (taken by another reader, purged) is skipped by the caller.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._heaps: dict[str, list[str]] = {}
        self._scanned_at = -math.inf
        self._scan_seconds = 0.0

    def push(self, queue: str, name: str) -> None:
        """A ready file this process just wrote or moved back into ``queues/``."""
        if self._scanned_at != -math.inf:  # before the first scan, the scan will find it
            heapq.heappush(self._heaps.setdefault(queue, []), name)

    def pop(self, queue: str) -> str | None:
        """The oldest known ready file of ``queue`` (None: none on disk either, as of the last scan)."""
        heap = self._heaps.get(queue)
        wait = max(STALE_AFTER if heap else REFILL_AFTER, SCAN_BUDGET * self._scan_seconds)
        if time.monotonic() - self._scanned_at >= wait:
            self._scan()
            heap = self._heaps.get(queue)
        return heapq.heappop(heap) if heap else None

    def invalidate(self) -> None:
        """Forget everything: the next pop scans (files were moved behind the index's back)."""
        self._heaps.clear()
        self._scanned_at = -math.inf

    def _scan(self) -> None:
        started = time.monotonic()
        heaps: dict[str, list[str]] = {}
        for name in os.listdir(self.folder):
            queue, _, suffix = name.partition(".")[2].rpartition(".")
            if suffix == "msg" and not name.startswith("."):  # ".<name>.tmp" is still being written
                heaps.setdefault(queue, []).append(name)
        for names in heaps.values():
            names.sort()  # a sorted list is a heap
        self._heaps = heaps
        self._scanned_at = time.monotonic()
        self._scan_seconds = self._scanned_at - started


@dataclass
class _Unsynced:
    """A message file written (locked, not yet fsynced) under its temporary name, awaiting a group commit."""

    queue: str
    name: str
    fd: int


class _SpoolChannel(filesystem.Channel):
    """kombu's filesystem channel made crash-safe: atomic fsynced writes, held messages on disk."""

    group: list[_Unsynced] | None = None  # set while the broker writes a group commit

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]  # kombu disagrees with itself
        if "/" in str(queue) or str(queue).startswith("."):
            raise BrokerError(f"queue name {queue!r} cannot be a file name in the embedded broker",
                              hint="use letters, digits, '.', '-' and '_' in queue names")
        name = f"{_sortable_now()}_{uuid.uuid4().hex}.{queue}.msg"
        data = kombu.utils.json.dumps(payload).encode()
        if self.group is not None:
            self.group.append(_Unsynced(str(queue), name, _write_unsynced(Path(self.data_folder_out), name, data)))
            return
        _write_atomically(Path(self.data_folder_out), name, data)
        self.index.push(str(queue), name)

    @cached_property
    def index(self) -> _SpoolIndex:
        """The ordered in-memory index of ``queues/`` (one per channel, used by its one thread)."""
        return _SpoolIndex(Path(self.data_folder_in))

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        folder = Path(self.data_folder_in)
        processing = Path(self.transport_options["processing_folder"])
        while (name := self.index.pop(str(queue))) is not None:
            try:
                os.rename(folder / name, processing / name)
            except FileNotFoundError:
                continue  # another reader took it, or it was purged
            payload = kombu.utils.json.loads((processing / name).read_bytes())
            payload.setdefault("properties", {})[SPOOL_PROPERTY] = name
            return payload
        raise Empty()


class _SpoolTransport(filesystem.Transport):
    Channel = _SpoolChannel


_clock_lock = threading.Lock()
_last_stamp = 0


def _sortable_now() -> str:
    """Wall-clock nanoseconds, strictly increasing within this process: file names sort in FIFO order."""
    global _last_stamp
    with _clock_lock:
        _last_stamp = max(_last_stamp + 1, time.time_ns())
        return f"{_last_stamp:020d}"


def _write_unsynced(folder: Path, name: str, data: bytes) -> int:
    """Write ``data`` to ``.<name>.tmp``, locked; returns the open descriptor (the lock lives with it)."""
    fd = os.open(folder / f".{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until renamed: a locked temporary file has a live writer
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        (folder / f".{name}.tmp").unlink(missing_ok=True)
        raise
    return fd


def _commit(folder: Path, files: list[_Unsynced]) -> None:
    """Make written files ready: fsync each, rename each to its final name, fsync the folder once.

    A ready file is always complete and durable; on failure none is renamed and none is left.
    """
    try:
        _sync(files)
        for file in files:
            os.rename(folder / f".{file.name}.tmp", folder / file.name)
    except BaseException:
        for file in files:
            (folder / f".{file.name}.tmp").unlink(missing_ok=True)
        raise
    finally:
        for file in files:
            os.close(file.fd)
    if files:
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the new names themselves must survive a power cut, not only the bytes
        finally:
            os.close(directory)


_SYNCFS = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)  # Linux: flush one file system at once


def _sync(files: list[_Unsynced]) -> None:
    """Make the files' bytes durable: one ``syncfs`` for a group (far cheaper than an fsync each), else fsync."""
    if len(files) > 1 and _SYNCFS is not None and _SYNCFS(files[0].fd) == 0:
        return
    for file in files:
        os.fsync(file.fd)


def _write_atomically(folder: Path, name: str, data: bytes) -> None:
    _commit(folder, [_Unsynced("", name, _write_unsynced(folder, name, data))])


def _remove_stale_temporary_files(folder: Path) -> int:
    """Delete ``.<name>.tmp`` files whose writer died (unlocked and not brand new); how many."""
    removed = 0
    for name in os.listdir(folder):
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        path = folder / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # renamed by its writer meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live publisher is writing it
            if time.time() - os.fstat(fd).st_mtime >= STALE_TMP_AGE:  # not one created a moment ago
                path.unlink(missing_ok=True)
                removed += 1
        finally:
            os.close(fd)
    return removed


@dataclass
class _QueueArgs:
    dead_letter_to: str | None
    delivery_limit: int
    message_ttl: float | None = None  # a delay queue: seconds before a message goes to dead_letter_to


class KombuIncoming(IncomingMessage):
    """A kombu message seen through the port; settles through the broker's worker thread."""

    def __init__(self, broker: KombuBroker, queue: str, message: Any) -> None:
        self._broker = broker
        self._queue = queue
        self._message = message
        self.body = bytes(message.body) if not isinstance(message.body, bytes) else message.body
        self.headers = dict(message.headers or {})
        properties = message.properties or {}
        self.correlation_id = properties.get("correlation_id")
        self.message_id = properties.get("message_id")
        self.content_type = message.content_type
        self.delivery_count = int(self.headers.get("x-delivery-count", 0))
        self.redelivered = self.delivery_count > 0
        self.spool_file: str | None = properties.get(SPOOL_PROPERTY)
        self.settled = False

    async def ack(self) -> None:
        self.settled = True
        await self._broker._run(self._broker._settle_sync, self, None)

    async def reject(self, requeue: bool = True) -> None:
        self.settled = True
        await self._broker._run(self._broker._settle_sync, self, requeue)

    async def hand_back(self) -> None:
        self.settled = True  # back untouched: the spool file moves back, no delivery is counted
        await self._broker._run(self._broker._release_sync, self)


class KombuConsumer(Consumer):
    """Polls one queue; at most ``prefetch`` messages are handled at once."""

    def __init__(self, broker: KombuBroker, queue: str, handler: Handler, prefetch: int) -> None:
        self._broker = broker
        self._queue = queue
        self._handler = handler
        self._slots = asyncio.Semaphore(max(prefetch, 1))
        self._stopped = self._closed = self._fetching = False
        self._tasks: dict[asyncio.Task[None], IncomingMessage] = {}
        self._poller = asyncio.create_task(self._poll(), name=f"consume {queue}")

    async def _poll(self) -> None:
        delay = POLL_MIN
        while not self._stopped:
            await self._slots.acquire()
            self._fetching = True  # cancel() waits for a fetch to end (the message goes back), nothing else
            try:
                message = await self._broker.get(self._queue)
            except Exception:
                self._fetching = False
                self._slots.release()
                log.exception("polling failed", extra={"queue": self._queue})
                if self._stopped:
                    return
                await asyncio.sleep(POLL_MAX)
                continue
            self._fetching = False
            if self._stopped:  # cancelled while fetching: give it back untouched
                if message is not None:
                    await self._broker._run(self._broker._release_sync, message)
                self._slots.release()
                return
            if message is None:
                self._slots.release()
                await asyncio.sleep(delay)
                delay = min(delay * 2, POLL_MAX)
                continue
            delay = POLL_MIN
            task = asyncio.create_task(self._handle(message))
            self._tasks[task] = message
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def _handle(self, message: IncomingMessage) -> None:
        try:
            await self._handler(message)
        except EngineStopping:  # not a failure of the message: it goes back uncounted
            if not getattr(message, "settled", True):
                await message.hand_back()
        except Exception:
            log.exception("handler failed; message requeued", extra={"queue": self._queue,
                                                                    "correlation_id": message.correlation_id})
            if not getattr(message, "settled", True):
                await message.reject(requeue=True)
        finally:
            self._slots.release()

    async def cancel(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if not self._fetching:  # waiting for a slot or sleeping between polls: stop now, not after a handler
            self._poller.cancel()
        await asyncio.wait([self._poller])
        self._broker._consumer_counts[self._queue] -= 1

    async def close(self) -> None:
        if self._closed:
            return
        await self.cancel()
        self._closed = True
        held = list(self._tasks.items())
        for task, _ in held:
            task.cancel()
        if held:
            await asyncio.wait([task for task, _ in held])
        unsettled = [message for _, message in held if not getattr(message, "settled", True)]
        for message in unsettled:
            await message.hand_back()
        if unsettled:
            log.warning("handlers still running at close were stopped; their messages were handed back",
                        extra={"queue": self._queue, "messages": len(unsettled)})


class KombuBroker(Broker):
    """The port over one kombu connection (``memory://`` or ``filesystem://<dir>``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kombu")
        self._connection: Connection | None = None
        self._channel: Any = None
        self._queues: dict[str, _QueueArgs] = {}
        self._exchanges: set[str] = set()
        self._consumer_counts: dict[str, int] = {}
        self._folder: Path | None = None
        self._lock_file: IO[bytes] | None = None
        self._held: dict[str, str] = {}  # spool file -> queue, for messages this process holds
        self._outbox: list[tuple[OutgoingMessage, str, str, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._waiting: dict[str, KombuIncoming] = {}  # delay queue -> its oldest message, held until due
        self._mover: asyncio.Task[None] | None = None

    @property
    def spooled(self) -> bool:
        return self._folder is not None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def connect(self) -> None:
        await self._run(self._connect_sync)

    def _connect_sync(self) -> None:
        parts = urlsplit(self.url)
        try:
            if parts.scheme == "memory":
                self._connection = Connection("memory://")
            elif parts.scheme == "filesystem":
                folder = Path(parts.netloc + parts.path).resolve()
                for sub in ("queues", "processing", "control"):
                    (folder / sub).mkdir(parents=True, exist_ok=True)
                self._folder = folder
                self._connection = Connection(transport=_SpoolTransport, transport_options={
                    "data_folder_in": str(folder / "queues"), "data_folder_out": str(folder / "queues"),
                    "control_folder": str(folder / "control"), "processing_folder": str(folder / "processing"),
                })
            else:
                raise BrokerError(f"unsupported broker URL scheme {parts.scheme!r}",
                                  hint="use amqp://, amqps://, filesystem://<folder> or memory://")
            self._channel = self._connection.channel()
            self._channel.do_restore = False  # held messages live in processing/ (spool) or are requeued below
        except OSError as exc:
            raise BrokerError(f"cannot open the embedded broker at {self.url}: {exc}",
                              hint="check the folder's permissions") from None

    async def close(self) -> None:
        if self._mover is not None:
            self._mover.cancel()
            await asyncio.wait([self._mover])
        await self._run(self._close_sync)
        self._executor.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._folder is not None:
            for name in list(self._held):  # clean shutdown: everything held goes back, unchanged
                self._move_back(name)
        if self._channel is not None:
            if not self.spooled:
                self._channel.do_restore = True
            self._channel.close()
            self._channel = None
        if self._connection is not None:
            self._connection.release()
            self._connection = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- topology -------------------------------------------------------------------------------

    async def declare_queue(self, name: str, *, kind: str = "work", dead_letter_to: str | None = None,
                            delivery_limit: int = 10, message_ttl: float | None = None) -> None:
        if kind not in ("work", "dead-letter", "delay", "ordered"):  # ordered: one consumer here anyway
            raise ValueError(f"unknown queue kind {kind!r}")
        if kind == "delay" and (not dead_letter_to or message_ttl is None):
            raise ValueError("a delay queue needs dead_letter_to and message_ttl")
        self._queues[name] = _QueueArgs(dead_letter_to if kind != "dead-letter" else None, delivery_limit,
                                        message_ttl if kind == "delay" else None)
        await self._run(lambda: Queue(name, durable=True, no_declare=False)(self._channel).declare())

    async def declare_exchange(self, name: str, *, hash_header: str | None = None) -> None:
        if hash_header is not None:
            raise BrokerError(f"the embedded broker has no consistent-hash exchange for {name!r}: ordered "
                              "deliveries need RabbitMQ", hint="set broker.url (or MIDDLEWARE_BROKER_URL) to an "
                              "amqp:// URL, or remove ordering: from the route's deliver entry")
        self._exchanges.add(name)
        await self._run(lambda: Exchange(name, type="topic", durable=True)(self._channel).declare())

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._run(self._channel.queue_bind, queue, exchange, routing_key)

    async def bind_exchange(self, destination: str, source: str, routing_key: str) -> None:
        raise BrokerError("the embedded broker cannot bind an exchange to an exchange",
                          hint="ordered deliveries need RabbitMQ (amqp://)")

    # -- messages -------------------------------------------------------------------------------

    async def publish(self, message: OutgoingMessage, *, queue: str | None = None,
                      exchange: str | None = None, routing_key: str = "", mandatory: bool | None = None) -> None:
        # kombu's virtual transports cannot report unroutable messages: ``mandatory`` is not enforced here
        if (queue is None) == (exchange is None):
            raise ValueError("publish to exactly one of queue= or exchange=")
        key = queue if queue is not None else routing_key
        args = self._queues.get(queue) if queue is not None else None
        if args is not None and args.message_ttl is not None:  # a delay queue: stamp when it is due
            message = replace(message, headers={**message.headers, DUE_HEADER: time.time() + args.message_ttl})
        if self._folder is None:
            await self._run(self._publish_sync, message, exchange or "", key)
            return
        # the spool: publishes that wait meanwhile are written together and share the folder's fsync
        confirmed = asyncio.get_running_loop().create_future()
        self._outbox.append((message, exchange or "", key, confirmed))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_outbox(), name="embedded broker group commit")
        await confirmed

    async def _commit_outbox(self) -> None:
        """Write the waiting publishes in groups (group commit); each caller learns its own outcome."""
        while self._outbox:
            await asyncio.sleep(0)  # let publishes already under way join this group
            group, self._outbox = self._outbox[:GROUP_COMMIT_MAX], self._outbox[GROUP_COMMIT_MAX:]
            try:
                errors = await self._run(self._publish_group_sync, [(m, e, k) for m, e, k, _ in group])
            except Exception as exc:
                errors = [exc] * len(group)
            for (_, _, _, confirmed), error in zip(group, errors, strict=True):
                if confirmed.done():  # its caller gave up waiting
                    continue
                if error is None:
                    confirmed.set_result(None)
                else:
                    confirmed.set_exception(error)

    def _publish_group_sync(self, items: list[tuple[OutgoingMessage, str, str]]) -> list[Exception | None]:
        """Publish ``items`` with one commit: each file fsynced, the folder once. Per item: None or its error."""
        assert self._folder is not None
        if self._channel is None:
            return [BrokerError("not connected", hint="call connect() first")] * len(items)
        folder = self._folder / "queues"
        written: list[_Unsynced] = []
        errors: list[Exception | None] = []
        self._channel.group = written
        try:
            for message, exchange, key in items:
                before = len(written)
                try:
                    self._publish_sync(message, exchange, key)
                    errors.append(None)
                except Exception as exc:  # this message only: its files go, the others stay
                    for file in written[before:]:
                        os.close(file.fd)
                        (folder / f".{file.name}.tmp").unlink(missing_ok=True)
                    del written[before:]
                    errors.append(exc)
        finally:
            self._channel.group = None
        try:
            _commit(folder, written)
        except OSError as exc:
            failure = BrokerError(f"cannot write to the embedded broker: {exc}", hint="check disk space")
            return [error or failure for error in errors]
        for file in written:
            self._channel.index.push(file.queue, file.name)
        return errors

    def _publish_sync(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None:
        if self._channel is None:
            raise BrokerError("not connected", hint="call connect() first")
        if exchange and exchange not in self._exchanges:  # kombu keeps exchange types per process
            Exchange(exchange, type="topic", durable=True)(self._channel).declare()
            self._exchanges.add(exchange)
        properties: dict[str, Any] = {}
        if message.correlation_id:
            properties["correlation_id"] = message.correlation_id
        if message.message_id:
            properties["message_id"] = message.message_id
        try:
            Producer(self._channel).publish(
                message.body, exchange=exchange, routing_key=routing_key, headers=dict(message.headers),
                content_type=message.content_type, content_encoding="binary", delivery_mode=2,
                serializer=None, retry=False, **properties)
        except OSError as exc:
            raise BrokerError(f"cannot write to the embedded broker: {exc}", hint="check disk space") from None

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 10) -> Consumer:
        if self._folder is not None and self._lock_file is None:
            await self._run(self._take_consumer_lock)
        self._consumer_counts[queue] = self._consumer_counts.get(queue, 0) + 1
        if self._mover is None or self._mover.done():  # the consuming engine moves due delayed messages
            self._mover = asyncio.create_task(self._move_due(), name="embedded broker delay queues")
        return KombuConsumer(self, queue, handler, prefetch)

    async def _move_due(self) -> None:
        """Every tick, move the due messages of each delay queue back to their target queue."""
        while True:
            ttls = [args.message_ttl for args in self._queues.values() if args.message_ttl is not None]
            tick = min(max(min(ttls) / 10, 0.02), 1.0) if ttls else 1.0
            try:
                await self._run(self._move_due_sync)
            except Exception:
                log.exception("moving due delayed messages failed; trying again")
            await asyncio.sleep(tick)

    def _move_due_sync(self) -> None:
        """Per delay queue, oldest first: publish each due message to its target, then ack it. The
        first message not yet due is held (in ``processing/`` on the spool, so a crash gives it back)
        until it is: one TTL per queue means every later message is due later."""
        now = time.time()
        for name, args in list(self._queues.items()):
            if args.message_ttl is None or args.dead_letter_to is None:
                continue
            while True:
                message = self._waiting.pop(name, None) or self._get_sync(name)
                if message is None:
                    break
                due = message.headers.get(DUE_HEADER)
                if isinstance(due, int | float) and due > now:
                    self._waiting[name] = message
                    break
                headers = {k: v for k, v in message.headers.items() if k != DUE_HEADER}
                self._publish_sync(OutgoingMessage(message.body, headers, message.correlation_id,
                                                   message.message_id,
                                                   message.content_type or "application/octet-stream"),
                                   "", args.dead_letter_to)
                self._settle_sync(message, None)

    def _take_consumer_lock(self) -> None:
        assert self._folder is not None
        lock = (self._folder / "consumer.lock").open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise BrokerError(f"another engine is consuming from the embedded broker at {self._folder}",
                              hint="stop it first, or give this one its own broker.url") from None
        self._lock_file = lock
        processing = self._folder / "processing"
        recovered = 0
        for name in sorted(os.listdir(processing)):  # left by a crashed consumer
            os.rename(processing / name, self._folder / "queues" / name)
            recovered += 1
        if recovered:
            log.warning("recovered messages a stopped engine held; they are delivered again",
                        extra={"messages": recovered})
            self._channel.index.invalidate()
        removed = _remove_stale_temporary_files(self._folder / "queues")
        if removed:
            log.warning("removed temporary files left by killed publishers (never confirmed)",
                        extra={"files": removed})

    async def get(self, queue: str) -> IncomingMessage | None:
        return await self._run(self._get_sync, queue)

    def _get_sync(self, queue: str) -> KombuIncoming | None:
        raw = self._channel.basic_get(queue, no_ack=self.spooled)
        if raw is None:
            return None
        message = KombuIncoming(self, queue, raw)
        if message.spool_file:
            self._held[message.spool_file] = queue
        return message

    def _settle_sync(self, message: KombuIncoming, requeue: bool | None) -> None:
        """Ack (``requeue`` None), requeue with a bumped delivery count, or drop."""
        if requeue:
            args = self._queues.get(message._queue)
            count = message.delivery_count + 1
            target = message._queue
            headers = {**message.headers, "x-delivery-count": count}
            if args and args.dead_letter_to and count > args.delivery_limit:  # as RabbitMQ counts it
                target, headers[DEATH_HEADER] = args.dead_letter_to, message._queue
            self._publish_sync(OutgoingMessage(message.body, headers, message.correlation_id, message.message_id,
                                               message.content_type or "application/octet-stream"), "", target)
        if message.spool_file:
            self._held.pop(message.spool_file, None)
            assert self._folder is not None
            (self._folder / "processing" / message.spool_file).unlink(missing_ok=True)
        else:
            message._message.ack()

    def _release_sync(self, message: KombuIncoming) -> None:
        """Give back a message fetched but never handed to a handler, as if never delivered."""
        if message.spool_file:
            self._move_back(message.spool_file)
        else:
            message._message.reject(requeue=True)

    def _move_back(self, name: str) -> None:
        assert self._folder is not None
        queue = self._held.pop(name, None)
        with contextlib.suppress(FileNotFoundError):  # already settled
            os.rename(self._folder / "processing" / name, self._folder / "queues" / name)
            if queue is not None and self._channel is not None:
                self._channel.index.push(queue, name)

    async def queue_info(self, queue: str) -> QueueInfo:
        size = await self._run(self._channel._size, queue)
        held = 1 if queue in self._waiting else 0  # a delay queue's oldest message, held until due
        return QueueInfo(queue, int(size) + held, self._consumer_counts.get(queue, 0))

    async def purge(self, queue: str) -> int:
        return int(await self._run(self._channel.queue_purge, queue) or 0)

    async def delete_queue(self, queue: str) -> None:
        await self.purge(queue)
        waiting = self._waiting.pop(queue, None)
        if waiting is not None:  # a delay queue's held message goes with its queue
            await self._run(self._settle_sync, waiting, None)
        self._queues.pop(queue, None)
        await self._run(self._channel.queue_delete, queue)

    async def delete_exchange(self, name: str) -> None:
        self._exchanges.discard(name)
        await self._run(self._channel.exchange_delete, name)
        if self._folder is not None:  # bindings live in a control file shared by every process
            (self._folder / "control" / f"{name}.exchange").unlink(missing_ok=True)
