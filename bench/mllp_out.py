"""Benchmark: the ``mllp`` connector (event -> HL7 v2 -> MLLP -> ACK) beside a raw MLLP client baseline.

Both run in the same process against the same local MLLP receiver (asyncio, answers ``AA`` at once),
with the same concurrency (``--pool`` connections, one message in flight on each):

  - baseline: a bare asyncio client writing already-rendered HL7 bytes in MLLP frames and reading each
    ACK frame back (only framing, no HL7 work): what the transport can do on this machine;
  - connector: :class:`middleware.delivery.mllp.MllpConnector.send` per event: parse the CloudEvent,
    write it with the ADT^A01 template, send, read and check the ACK;
  - render: ``MllpConnector.message`` alone (no I/O), messages/s on one core.

The events are the shipped A01 sample run through adt-inbound (one event, a new id per message).
Prints messages/s and p50/p95 latency (send to ACK) for each, and the ratio.

Run: .venv/bin/python bench/mllp_out.py [--messages 5000] [--pool 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from middleware.delivery import ConnectorSpec, Delivery  # noqa: E402
from middleware.delivery.mllp import MllpConnector  # noqa: E402
from middleware.ingest.mllp_framing import FrameDecoder, frame  # noqa: E402
from middleware.project import load_project  # noqa: E402
from middleware.route import transform  # noqa: E402


def deliveries(count: int) -> list[Delivery]:
    project = load_project(REPO, {})
    raw = (REPO / "samples" / "adt-inbound" / "a01-admit.hl7").read_bytes()
    [event] = transform(project.routes["adt-inbound"], raw).events
    out = []
    for _ in range(count):
        event_id = str(uuid.uuid4())
        out.append(Delivery(json.dumps({**event, "id": event_id}).encode(), event_id, event["correlationid"],
                            "adt-inbound", event["type"]))
    return out


async def receiver() -> tuple[asyncio.Server, int]:
    """An MLLP server answering each message with an AA carrying its MSH-10."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(1 << 20)
        while chunk := await reader.read(65536):
            decoder.feed(chunk)
            while (got := decoder.next()) is not None:
                msh = got.body.split(b"\r", 1)[0].split(b"|")
                writer.write(frame(b"MSH|^~\\&|R|F|MW||20260101||ACK|A|P|2.5.1\rMSA|AA|" + msh[9] + b"\r"))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def baseline(port: int, messages: list[bytes], pool: int) -> list[float]:
    latencies: list[float] = []

    async def one_connection(share: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        decoder = FrameDecoder(1 << 20)
        for body in share:
            started = time.perf_counter()
            writer.write(frame(body))
            await writer.drain()
            while decoder.next() is None:
                decoder.feed(await reader.read(65536))
            latencies.append(time.perf_counter() - started)
        writer.close()

    await asyncio.gather(*(one_connection(messages[n::pool]) for n in range(pool)))
    return latencies


async def through_connector(port: int, items: list[Delivery], pool: int) -> list[float]:
    connector = MllpConnector(ConnectorSpec("bench", "mllp", {"host": "127.0.0.1", "port": port, "pool": pool}))
    latencies: list[float] = []

    async def sender(share: list[Delivery]) -> None:
        for item in share:
            started = time.perf_counter()
            await connector.send(item)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(sender(items[n::pool]) for n in range(pool)))
    await connector.close()
    return latencies


def report(name: str, latencies: list[float], seconds: float) -> float:
    rate = len(latencies) / seconds
    cuts = statistics.quantiles(latencies, n=100)
    print(f"{name:<10} {rate:>9,.0f} msg/s   p50 {cuts[49] * 1000:6.2f} ms   p95 {cuts[94] * 1000:6.2f} ms")
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--pool", type=int, default=4)
    args = parser.parse_args()
    items = deliveries(args.messages)
    renderer = MllpConnector(ConnectorSpec("bench", "mllp", {"host": "127.0.0.1", "port": 1}))
    started = time.perf_counter()
    rendered = [renderer.message(item) for item in items]
    render_rate = len(items) / (time.perf_counter() - started)
    server, port = await receiver()
    try:
        started = time.perf_counter()
        raw = await baseline(port, rendered, args.pool)
        raw_rate = report("baseline", raw, time.perf_counter() - started)
        started = time.perf_counter()
        ours = await through_connector(port, items, args.pool)
        our_rate = report("connector", ours, time.perf_counter() - started)
    finally:
        server.close()
    print(f"{'render':<10} {render_rate:>9,.0f} msg/s   (template alone, one core)")
    print(f"connector / baseline: {our_rate / raw_rate:.2f} ({args.messages} A01 events, pool {args.pool})")


if __name__ == "__main__":
    asyncio.run(main())
