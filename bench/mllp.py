"""Benchmark: the MLLP gateway (ACK after the broker's confirm) beside a raw-broker publish baseline.

Both run in the same process on the same RabbitMQ, with the same messages (the A01 sample with a
unique MSH-10 each) and the same concurrency:

  - baseline: aio-pika, one channel with publisher confirms, ``--senders`` tasks each publishing
    its share sequentially (each waits for its confirm) to the adt-inbound route's quorum queue;
  - gateway: :class:`middleware.ingest.mllp.MllpGateway` on that queue, ``--senders`` MLLP
    connections each sending its share sequentially (each waits for its ACK, which waits for the
    confirm).

Prints messages/s, p50/p95/p99 latency (publish-to-confirm, send-to-ACK) and the ratio; deletes the
queues and exchange it declared (they carry a random ``bench-`` prefix).

Run: .venv/bin/python bench/mllp.py [--messages 5000] [--senders 10] [--url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "adt-inbound" / "a01-admit.hl7"


def make_messages(count: int) -> list[bytes]:
    """The A01 sample, CR-separated, original ack mode, with MSH-10 = BENCH-<n>."""
    lines = SAMPLE.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\r").split(b"\r")
    msh = lines[0].split(b"|")
    msh += [b""] * (18 - len(msh))
    out = []
    for n in range(count):
        msh[9], msh[14], msh[15] = f"BENCH-{n}".encode(), b"", b""
        out.append(b"\r".join([b"|".join(msh), *lines[1:]]) + b"\r")
    return out


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[94] * 1000, cuts[98] * 1000


def shares(messages: list[bytes], senders: int) -> list[list[bytes]]:
    return [messages[i::senders] for i in range(senders)]


async def baseline(url: str, queue: str, messages: list[bytes], senders: int) -> tuple[float, list[float]]:
    import aio_pika

    connection = await aio_pika.connect_robust(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        latencies: list[float] = []

        async def sender(batch: list[bytes]) -> None:
            for body in batch:
                started = time.perf_counter()
                await channel.default_exchange.publish(
                    aio_pika.Message(body, correlation_id=str(uuid.uuid4()), message_id=str(uuid.uuid4()),
                                     content_type="x-application/hl7-v2+er7",
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue, mandatory=True)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(sender(batch) for batch in shares(messages, senders)))
        return time.perf_counter() - started, latencies
    finally:
        await connection.close()


async def through_gateway(port: int, messages: list[bytes], senders: int) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def sender(batch: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for body in batch:
            started = time.perf_counter()
            writer.write(b"\x0b" + body + b"\x1c\r")
            await writer.drain()
            ack = await reader.readuntil(b"\x1c\r")
            latencies.append(time.perf_counter() - started)
            if b"MSA|AA|" not in ack:
                raise RuntimeError(f"not acked: {ack[:200]!r}")
        writer.close()
        await writer.wait_closed()

    started = time.perf_counter()
    await asyncio.gather(*(sender(batch) for batch in shares(messages, senders)))
    return time.perf_counter() - started, latencies


async def main(args: argparse.Namespace) -> None:
    from middleware.broker import make_broker
    from middleware.engine import declare_route_topology
    from middleware.ingest import MllpListener
    from middleware.ingest.mllp import MllpGateway
    from middleware.project import load_project
    from middleware.topology import RouteTopology

    prefix = f"bench-{uuid.uuid4().hex[:6]}."
    project = load_project(REPO, {**os.environ, "MIDDLEWARE_BROKER_URL": args.url, "MIDDLEWARE_QUEUE_PREFIX": prefix})
    settings = project.settings
    route = project.routes["adt-inbound"]
    queue = RouteTopology.of(route, prefix).inbound
    messages = make_messages(args.messages)
    admin = make_broker(args.url)
    await admin.connect()
    gateway_broker = make_broker(args.url)
    try:
        await declare_route_topology(admin, route, settings)
        await baseline(args.url, queue, messages[: args.senders * 20], args.senders)  # warm-up
        await admin.purge(queue)
        raw_seconds, raw_latencies = await baseline(args.url, queue, messages, args.senders)
        await admin.purge(queue)

        await gateway_broker.connect()
        listener = MllpListener(name="bench", port=0, queue=route.source_queue)
        gateway = MllpGateway(listener, gateway_broker, settings, route)
        await gateway.start(declare=False)
        try:
            await through_gateway(gateway.port, messages[: args.senders * 20], args.senders)  # warm-up
            await admin.purge(queue)
            gw_seconds, gw_latencies = await through_gateway(gateway.port, messages, args.senders)
            landed = (await admin.queue_info(queue)).messages
        finally:
            await gateway.stop()
    finally:
        names = RouteTopology.of(route, prefix)
        for name in names.queues:
            await admin.delete_queue(name)
        await admin.delete_exchange(names.exchange)
        await gateway_broker.close()
        await admin.close()

    n = len(messages)
    raw_rate, gw_rate = n / raw_seconds, n / gw_seconds
    print(f"MLLP gateway benchmark: {n} messages ({len(messages[0])} bytes each), {args.senders} concurrent senders,"
          f" quorum queue on {args.url.split('@')[-1]}")
    print(f"{'':38}{'msg/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    for label, rate, lat in (("raw aio-pika publish + confirm", raw_rate, raw_latencies),
                             ("MLLP gateway, ACK after confirm", gw_rate, gw_latencies)):
        p50, p95, p99 = percentiles(lat)
        print(f"{label:38}{rate:9.0f}{p50:9.2f}{p95:9.2f}{p99:9.2f}")
    print(f"gateway / raw baseline: {gw_rate / raw_rate:.2f}; messages on the queue after the gateway run: {landed}")
    print(f"target >= 1,000 msg/s: {'met' if gw_rate >= 1000 else 'NOT met'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000, help="messages per run (default 5000)")
    parser.add_argument("--senders", type=int, default=10, help="concurrent senders (default 10)")
    parser.add_argument("--url", default=os.environ.get("MIDDLEWARE_TEST_AMQP_URL",
                                                        "amqp://guest:guest@127.0.0.1:5672/"))
    asyncio.run(main(parser.parse_args()))
