"""Benchmark: what per-key order costs, and the full ordering acceptance run, on the real RabbitMQ.

A small project (tests/ordering_kit.py: JSON visits -> ``visit.recorded`` -> an HTTP sink that
records arrival order) runs as ``middleware run`` processes under a fresh queue prefix.

1. Cost: ``--events`` visits over ``--patients`` patients are published first, then
   ``--engines`` engine processes drain them to the sink, once with an ordinary delivery and once
   with ``ordering: {key: patient.mrn, partitions: --partitions}``. Rate = events between the
   sink's first and last acceptance per second (process start-up excluded). Baseline in the same
   run: bare aio-pika moving the same number of messages through one quorum queue, one at a time
   (prefetch 1, ack each), which is the floor of a single-active-consumer path.
2. Acceptance (``--kill``): three engines, the one holding the single active consumers SIGKILLed
   once a third of the events are accepted; prints per-patient order violations (after removing
   consecutive duplicates), missing events and duplicates.

Everything declared is deleted afterwards.

Run: .venv/bin/python bench/ordering.py [--events 5000] [--patients 50] [--partitions 8] [--engines 1] [--kill]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from middleware import topology  # noqa: E402
from middleware.broker import make_broker  # noqa: E402
from middleware.broker.base import Broker  # noqa: E402
from middleware.project import load_project  # noqa: E402
from middleware.topology import Topology  # noqa: E402
from tests.ordering_kit import OrderSink, order_report, publish_visits, start_engine, visits, write_project  # noqa: E402

AMQP_URL = os.environ.get("MIDDLEWARE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def raw_baseline(events: int) -> float:
    """Messages per second through one quorum queue with bare aio-pika, prefetch 1, ack each."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    name = f"bench-ordering-raw-{uuid.uuid4().hex[:6]}"
    await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    for n in range(events):
        await channel.default_exchange.publish(aio_pika.Message(b'{"n": %d}' % n), routing_key=name)
    consumer = await connection.channel()
    await consumer.set_qos(prefetch_count=1)
    done = asyncio.Event()
    seen: list[float] = []

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        seen.append(time.perf_counter())
        if len(seen) == events:
            done.set()

    target = await consumer.declare_queue(name, passive=True)
    tag = await target.consume(on_message)
    await done.wait()
    await target.cancel(tag)
    await channel.queue_delete(name)
    await connection.close()
    return (events - 1) / (seen[-1] - seen[0])


async def _drain(root: Path, env: dict[str, str], client: Broker, items: list[tuple[str, int]], sink: OrderSink,
                 engines: int, kill: bool) -> dict[str, object]:
    project = load_project(root, env)
    names = Topology.of(project.routes.values(), project.settings.queue_prefix).route("visits")
    arrival: list[float] = []
    processes: list[subprocess.Popen[bytes]] = []
    try:
        await topology.declare(client, names, project.settings.delivery_limit)
        started = time.perf_counter()
        await publish_visits(client, names.inbound, items)
        published = time.perf_counter() - started
        processes.append(start_engine(root, env))
        if kill:  # the first engine takes every single active consumer; the others wait behind it
            await asyncio.sleep(3)
        processes += [start_engine(root, env) for _ in range(engines - 1)]
        killed = False
        while not set(items) <= set(sink.accepted):
            if sink.accepted and not arrival:
                arrival.append(time.perf_counter())
            if kill and not killed and len(sink.accepted) >= len(items) // 3:
                processes[0].send_signal(signal.SIGKILL)
                killed = True
            await asyncio.sleep(0.005)
        arrival.append(time.perf_counter())
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            await asyncio.to_thread(process.wait, 60)
        await topology.delete(client, Topology.of(project.routes.values(), project.settings.queue_prefix))
    report = order_report(items, sink.accepted)
    return {**report, "rate": (len(items) - 1) / (arrival[-1] - arrival[0]), "seconds": arrival[-1] - arrival[0],
            "publish_rate": len(items) / published, "out_of_order": len(report["out_of_order"])}  # type: ignore[arg-type]


async def run(args: argparse.Namespace) -> None:
    items = visits(args.patients, args.events // args.patients)
    folder = Path(tempfile.mkdtemp(prefix="bench-ordering-"))
    client = make_broker(AMQP_URL)
    await client.connect()
    print(f"{len(items):,} events over {args.patients} patients, {args.engines} engine(s), "
          f"{args.partitions} partitions; RabbitMQ {AMQP_URL.rsplit('@', 1)[-1]}")
    print(f"raw aio-pika, one quorum queue, prefetch 1: {await raw_baseline(len(items)):8.0f} msg/s")
    cases = [("ordered + SIGKILL", args.partitions, True)] if args.kill else \
        [("unordered", None, False), ("ordered", args.partitions, False)]
    try:
        for label, partitions, kill in cases:
            sink = OrderSink()
            await sink.start()
            env = {"MIDDLEWARE_BROKER_URL": AMQP_URL, "MIDDLEWARE_QUEUE_PREFIX": f"bench-ord-{uuid.uuid4().hex[:6]}.",
                   "ORDER_SINK_URL": sink.url}
            root = write_project(folder / label.replace(" ", "-").replace("+", ""), partitions=partitions)
            try:
                result = await _drain(root, env, client, items, sink, 3 if kill else args.engines, kill)
            finally:
                await sink.stop()
            print(f"{label:>22}: {result['rate']:8.0f} events/s delivered ({result['seconds']:.1f} s; published "
                  f"{result['publish_rate']:.0f}/s); patients out of order {result['out_of_order']}, "
                  f"missing {result['missing']}, duplicates {result['duplicates']}")
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--patients", type=int, default=50)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--engines", type=int, default=1, help="engine processes for the cost runs")
    parser.add_argument("--kill", action="store_true", help="the acceptance run: 3 engines, one SIGKILLed")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
