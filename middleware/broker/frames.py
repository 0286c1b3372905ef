"""Coalesced AMQP frame writes: everything aiormq writes in one event-loop turn leaves in one socket write.

aiormq's writer task hands each queued frame group (a publish's method + header + body, an ack, a
heartbeat) to the transport with a ``write`` of its own, and on an idle socket every ``write`` is a
``send`` system call (issue 14: a third of the engine's CPU was in ``send``). With 20 messages in flight a
loop turn queues several publishes and acks; :class:`CoalescingWriter` buffers them and hands the
transport one joined write at the end of the turn (``loop.call_soon``), or at once past
``FLUSH_BYTES``.

Order is kept (one buffer per connection, written in arrival order). A frame is never held longer than
the current loop turn, and ``drain()`` still waits while the transport is paused (back-pressure).
``close()`` and ``write_eof()`` flush first, so ``connection.close`` still reaches the broker; a buffer
left when the transport has closed is dropped, like the unsent frames of a lost connection (publishes
are confirmed and acks follow the handler, so nothing is lost beyond at-least-once). The writer plugs
into aiormq's documented ``transport_factory`` hook, so TLS and plain TCP both keep aiormq's own
connection code.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

FLUSH_BYTES = 256 * 1024  # a buffer this large is written at once instead of at the end of the turn
# MIDDLEWARE_AMQP_COALESCE=0: each frame written, and waited for, on its own as aiormq does (for A/B runs of
# bench/pipeline.py --variant MIDDLEWARE_AMQP_COALESCE=0)
COALESCE = os.environ.get("MIDDLEWARE_AMQP_COALESCE", "1") != "0"


class CoalescingWriter:
    """An ``asyncio.StreamWriter`` stand-in whose writes of one loop turn reach the transport together."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._chunks: list[bytes] = []
        self._size = 0
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self.frames = 0  # writes asked for (each a frame group: a publish, an ack, a heartbeat...)
        self.writes = 0  # transport writes made of them

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self._writer.transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.frames += 1
        self._chunks.append(bytes(data))
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        """Hand the buffered frames to the transport (dropped if it has closed: the connection is lost)."""
        self._scheduled = False
        if not self._chunks:
            return
        chunks, self._chunks, self._size = self._chunks, [], 0
        if self._writer.transport.is_closing():
            return
        self.writes += 1
        self._writer.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    async def drain(self) -> None:
        """Wait while the transport is paused (its buffer is over the high-water mark), as StreamWriter does."""
        if self._size >= FLUSH_BYTES:
            self.flush()
        await self._writer.drain()

    def can_write_eof(self) -> bool:
        return self._writer.can_write_eof()

    def write_eof(self) -> None:
        self.flush()
        self._writer.write_eof()

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._writer.get_extra_info(name, default)


class CoalescingTransportFactory(TransportFactory):
    """aiormq's TCP or TLS transport (by the URL's scheme, as aiormq chooses) behind a :class:`CoalescingWriter`,
    one per connection made (a reconnect makes a new one); ``writer`` is the latest."""

    def __init__(self) -> None:
        self.writer: CoalescingWriter | None = None
        self.connections = 0

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        inner = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await inner.create(url, **kwargs)
        self.writer = CoalescingWriter(writer)
        self.connections += 1
        return reader, cast(asyncio.StreamWriter, self.writer)
