"""Coalesced frame writes (middleware.broker.frames) over a real local TCP connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from middleware.broker.frames import FLUSH_BYTES, CoalescingWriter

Scenario = Callable[[CoalescingWriter], Awaitable[None]]


async def over_tcp(scenario: Scenario) -> tuple[bytes, CoalescingWriter]:
    """Run ``scenario`` on a writer connected to a local server; what the server read up to EOF."""
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set_result(await reader.read())
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, raw = await asyncio.open_connection("127.0.0.1", port)
    writer = CoalescingWriter(raw)
    await scenario(writer)
    writer.write_eof()  # flushes first
    data = await asyncio.wait_for(received, 10)
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return data, writer


def test_writes_of_one_loop_turn_leave_in_one_transport_write_in_order() -> None:
    async def scenario(writer: CoalescingWriter) -> None:
        for n in range(10):
            writer.write(f"frame{n};".encode())
            await writer.drain()  # aiormq drains after a frame: that must not flush it alone
        await asyncio.sleep(0)  # the end of the turn

    data, writer = asyncio.run(over_tcp(scenario))
    assert data == b"".join(f"frame{n};".encode() for n in range(10))
    assert (writer.frames, writer.writes) == (10, 1)


def test_a_frame_waits_no_longer_than_its_loop_turn() -> None:
    async def scenario(writer: CoalescingWriter) -> None:
        for n in range(3):
            writer.write(b"x%d" % n)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert writer.writes == n + 1  # written at the end of the turn it was queued in

    data, _ = asyncio.run(over_tcp(scenario))
    assert data == b"x0x1x2"


def test_a_large_buffer_is_written_at_once() -> None:
    async def scenario(writer: CoalescingWriter) -> None:
        writer.write(b"a" * (FLUSH_BYTES - 1))
        assert writer.writes == 0
        writer.write(b"b")
        assert writer.writes == 1  # past FLUSH_BYTES: not held until the end of the turn

    data, _ = asyncio.run(over_tcp(scenario))
    assert data == b"a" * (FLUSH_BYTES - 1) + b"b"


def test_write_eof_sends_what_is_buffered_first() -> None:
    async def scenario(writer: CoalescingWriter) -> None:
        writer.write(b"connection.close")  # aiormq: connection.close, then write_eof()

    data, writer = asyncio.run(over_tcp(scenario))
    assert data == b"connection.close" and writer.writes == 1
