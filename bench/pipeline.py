"""Benchmark: the whole pipeline on RabbitMQ beside a raw broker hop, in the same run.

  - baseline: a raw aio-pika hop: consume from queue A (prefetch 20), publish each body to queue B
    with a publisher confirm, ack A; the messages are preloaded into A, so this is what a Python
    consumer that does no work at all achieves on this broker;
  - pipeline: ``Engine`` with the shipped adt-inbound route (parse, filter, map, validate,
    CloudEvents, publish with confirm, ack) and one delivery worker writing each event to an
    fsynced file (the ``bed-board`` connector; the http connector is left out so no sink is
    measured), messages preloaded into the inbound queue.

Both move the same ADT A01 messages (a unique MSH-10 each). Prints messages/s (delivered events
for the pipeline), end-to-end latency percentiles (from the moment the consumers start), peak RSS,
and the ratio. Deletes every queue it declared (random ``bench-`` prefix).

Run: .venv/bin/python bench/pipeline.py [--messages 5000] [--url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mllp import make_messages  # noqa: E402  (the same message generator as the MLLP benchmark)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def preload(url: str, queue: str, messages: list[bytes], declare: dict[str, object] | None) -> None:
    import aio_pika

    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        if declare is not None:
            await channel.declare_queue(queue, durable=True, arguments=declare)
        await asyncio.gather(*(channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue)
            for body in messages))


async def raw_hop(url: str, prefix: str, messages: list[bytes]) -> float:
    import aio_pika

    source, target = f"{prefix}raw.a", f"{prefix}raw.b"
    quorum = {"x-queue-type": "quorum"}
    await preload(url, source, messages, quorum)
    connection = await aio_pika.connect_robust(url)
    done = asyncio.Event()
    moved = 0
    async with connection:
        publish_channel = await connection.channel(publisher_confirms=True)
        await publish_channel.declare_queue(target, durable=True, arguments=quorum)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=20)
        queue = await consume_channel.get_queue(source)

        async def hop(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal moved
            await publish_channel.default_exchange.publish(
                aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=target)
            await message.ack()
            moved += 1
            if moved == len(messages):
                done.set()

        started = time.perf_counter()
        tag = await queue.consume(hop)
        await done.wait()
        elapsed = time.perf_counter() - started
        await queue.cancel(tag)
        await publish_channel.queue_delete(source)
        await publish_channel.queue_delete(target)
    return len(messages) / elapsed


async def pipeline(url: str, prefix: str, messages: list[bytes], out: Path) -> tuple[float, list[float]]:
    from middleware import topology
    from middleware.engine import Engine, declare_route_topology
    from middleware.project import load_project

    project = load_project(REPO, {"MIDDLEWARE_BROKER_URL": url, "MIDDLEWARE_QUEUE_PREFIX": prefix})
    route = dataclasses.replace(project.routes["adt-inbound"],
                                deliver=tuple(d for d in project.routes["adt-inbound"].deliver
                                              if d.connector == "bed-board"))
    bed_board = dataclasses.replace(project.connectors["bed-board"], options={"path": str(out)})
    settings = dataclasses.replace(project.settings, ingest={})
    project = dataclasses.replace(project, routes={"adt-inbound": route}, settings=settings,
                                  connectors={"bed-board": bed_board})
    engine = Engine(project, gateways=False)
    await engine.broker.connect()
    await declare_route_topology(engine.broker, route, settings)
    await preload(url, engine.topology.route(route.name).inbound, messages, None)
    started = time.perf_counter()
    await engine.start()
    latencies: list[float] = []
    delivered = 0
    while delivered < len(messages):
        await asyncio.sleep(0.005)
        now = engine.metrics.value("middleware_events_delivered", route="adt-inbound", connector="bed-board")
        latencies += [time.perf_counter() - started] * (int(now) - delivered)
        delivered = int(now)
    elapsed = time.perf_counter() - started
    await engine.stop()
    cleaner = Engine(project, gateways=False).broker
    await cleaner.connect()
    await topology.delete(cleaner, engine.topology)
    await cleaner.close()
    return len(messages) / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()
    from middleware.observe import configure_logging

    configure_logging("WARNING")
    messages = make_messages(args.messages)
    prefix = f"bench-{uuid.uuid4().hex[:6]}."
    raw_rate = asyncio.run(raw_hop(args.url, prefix, messages))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bed-board.jsonl"
        rate, latencies = asyncio.run(pipeline(args.url, prefix, messages, out))
        lines = sum(1 for _ in out.open())
    from statistics import quantiles

    cuts = quantiles(latencies, n=100, method="inclusive")
    print(f"pipeline benchmark: {args.messages} ADT^A01 messages preloaded, RabbitMQ at {args.url}")
    print(f"{'':48} {'msg/s':>8}")
    print(f"{'raw hop (consume, publish+confirm, ack)':48} {raw_rate:8.0f}")
    print(f"{'pipeline (route worker + fsynced file delivery)':48} {rate:8.0f}")
    print(f"pipeline / raw hop: {rate / raw_rate:.2f} (the pipeline makes two broker hops per message)")
    print(f"time to delivery from start, p50 / p95 / p99: {cuts[49] * 1000:.0f} / {cuts[94] * 1000:.0f} / "
          f"{cuts[98] * 1000:.0f} ms (a backlog drained, not per-message latency)")
    print(f"events in the file: {lines}; peak RSS {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
