"""Benchmark: competing engines. 1, 2 and 3 ``middleware run`` processes on one RabbitMQ, the shipped
``adt-inbound`` route delivering to a local aiohttp sink (bench/fleet.py), then no loss with one SIGKILLed.

For each engine count: a fresh queue prefix, ``--messages`` ADT A01 messages (unique MSH-10 each) published
to the route's inbound queue first, then the engines started together; the rate is distinct
``patient.admitted`` events per second at the sink, from its first to its last new event (engine start-up
left out). Beside them, in the same run, the raw baseline: one bare aio-pika consumer (prefetch 50) that
POSTs each preloaded message to the same sink with aiohttp and acks after the 200: a Python
consumer that does no work at all.

Kill check: ``--kill-engines`` engines (3), the same preload; once a third of the events arrived, one engine
is SIGKILLed; the others must deliver every event (duplicates allowed: at-least-once, event ids are
deterministic, so they are counted, not lost).

Run: .venv/bin/python bench/engines.py [--messages 3000] [--engines 1 2 3] [--url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet import CountingSink, Fleet, adt_messages, publish_all

TIMEOUT = 600.0


async def engines_run(url: str, count: int, messages: int, kill_after: float | None = None) -> dict[str, float]:
    """Preload, start ``count`` engines, wait for every event at the sink (SIGKILL engine 0 after
    ``kill_after`` of them when given)."""
    sink = CountingSink()
    await sink.start()
    fleet = Fleet(url, sink)
    try:
        publisher = await fleet.publisher()
        try:
            await publish_all(publisher, adt_messages(messages, f"E{count}-{uuid.uuid4().hex[:6]}"))
        finally:
            await publisher.broker.close()
        started = time.monotonic()
        fleet.start(count)
        if kill_after is not None:
            await sink.wait_for(int(messages * kill_after), TIMEOUT)
            fleet.kill(0)
        complete = await sink.wait_for(messages, TIMEOUT)
        if not complete:
            print(fleet.tail(), file=sys.stderr)
        return {"engines": count, "delivered": sink.unique, "duplicates": sink.duplicates, "rate": sink.rate(),
                "seconds": time.monotonic() - started, "alive": fleet.alive()}
    finally:
        fleet.stop()
        await fleet.delete_queues()
        fleet.remove_outputs()
        await sink.stop()


async def baseline(url: str, messages: int) -> float:
    """One bare aio-pika consumer POSTing each preloaded message to the sink, ack after 200: events/s."""
    import aio_pika
    import aiohttp
    import orjson

    sink = CountingSink()
    await sink.start()
    queue_name = f"bench-{uuid.uuid4().hex[:8]}.baseline"
    connection = await aio_pika.connect_robust(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        for start in range(0, messages, 64):
            await asyncio.gather(*(channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps({"id": n}), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue_name) for n in range(start, min(start + 64, messages))))
        consumer_channel = await connection.channel()
        await consumer_channel.set_qos(prefetch_count=50)
        consumer_queue = await consumer_channel.get_queue(queue_name)
        async with aiohttp.ClientSession() as session:
            async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with session.post(sink.url, data=message.body,
                                        headers={"Content-Type": "application/json"}) as response:
                    response.raise_for_status()
                await message.ack()

            tag = await consumer_queue.consume(handle)
            await sink.wait_for(messages, TIMEOUT)
            await consumer_queue.cancel(tag)
        await channel.queue_delete(queue_name)
    finally:
        await connection.close()
        await sink.stop()
    return sink.rate()


async def main(args: argparse.Namespace) -> None:
    print(f"{args.messages:,} ADT A01 messages per run, adt-inbound -> local aiohttp sink, RabbitMQ {args.url}, "
          f"{os.cpu_count()} CPU(s)")
    base = await baseline(args.url, args.messages)
    print(f"  {'engines':<28} {'events/s':>9} {'delivered':>10} {'duplicates':>11}")
    print(f"  {'raw baseline (1 consumer)':<28} {base:>9,.0f} {args.messages:>10,} {0:>11}")
    for count in args.engines:
        result = await engines_run(args.url, count, args.messages)
        print(f"  {f'{count} engine process(es)':<28} {result['rate']:>9,.0f} {int(result['delivered']):>10,} "
              f"{int(result['duplicates']):>11,}")
    if args.kill_engines:
        result = await engines_run(args.url, args.kill_engines, args.messages, kill_after=1 / 3)
        lost = args.messages - int(result["delivered"])
        print(f"  {f'{args.kill_engines} engines, 1 SIGKILLed':<28} {result['rate']:>9,.0f} "
              f"{int(result['delivered']):>10,} {int(result['duplicates']):>11,}  lost: {lost}")
        if lost:
            raise SystemExit(f"{lost} event(s) lost after a SIGKILL")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--engines", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--kill-engines", type=int, default=3, help="engines in the kill check (0: skip it)")
    parser.add_argument("--url", default=os.environ.get("MIDDLEWARE_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    asyncio.run(main(parser.parse_args()))
