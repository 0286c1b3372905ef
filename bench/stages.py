"""Benchmark: CPU cost per message of each engine stage (issue 14), from process CPU time, not wall time.

Rows (µs of this process's CPU per message, the median of ``--repeat`` passes):
  - parse, map (filter + rule + field map), validate (JSON Schema), envelope (CloudEvent + orjson):
    the pure route on the ADT^A01 messages of bench/pipeline.py, each stage the difference between
    the cumulative runs (parse; parse+map; ...), so the lazy tokenizer's splitting counts in map;
  - publish: our broker adapter (``AmqpBroker.publish`` with a confirm, ``--concurrency`` in flight)
    beside raw aio-pika publishing the same bodies with confirms;
  - consume + ack: ``AmqpBroker.consume`` with a handler that only acks beside raw aio-pika;
  - deliver: the http connector's ``send`` to a local sink (another process) beside a raw aiohttp POST;
  - map 10 plain paths vs the same 10 fields by CEL ``expr:`` (bench/hl7_parse.py's sets): expressions on/off.
CPU time is what a loaded machine distorts least; the broker's and the sink's own CPU is not counted.
Deletes the queue it declares.

Run: .venv/bin/python bench/stages.py [--messages 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mllp import make_messages  # noqa: E402
from pipeline import URL, free_port  # noqa: E402


def cpu_per_message(fn: Callable[[bytes], object], messages: list[bytes]) -> float:
    started = time.process_time()
    for raw in messages:
        fn(raw)
    return (time.process_time() - started) / len(messages) * 1e6


async def async_cpu(run: Callable[[], Awaitable[None]], count: int) -> float:
    started = time.process_time()
    await run()
    return (time.process_time() - started) / count * 1e6


async def bounded(jobs: list[Callable[[], Awaitable[Any]]], concurrency: int) -> None:
    """Run the jobs with at most ``concurrency`` in flight (as a consumer's prefetch would)."""
    queue = iter(jobs)

    async def lane() -> None:
        for job in queue:
            await job()

    await asyncio.gather(*(lane() for _ in range(concurrency)))


def pure_rows(messages: list[bytes]) -> dict[str, float]:
    import orjson

    from middleware.envelope import build_event
    from middleware.mapping import apply_rules
    from middleware.project import load_project
    from middleware.route import transform

    route = load_project(REPO, {}).routes["adt-inbound"]

    def parse(raw: bytes) -> object:
        return route.format.parse(raw)

    def mapped(raw: bytes) -> tuple[Any, Any]:
        doc = route.format.parse(raw)
        if route.filter is not None:
            route.filter.matches(doc)
        rule = next(r for r in route.events if r.when is None or r.when.matches(doc))
        return rule, apply_rules(rule.fields, doc)

    def validated(raw: bytes) -> object:
        rule, data = mapped(raw)
        rule.schema.validate(data)
        return data

    def whole(raw: bytes) -> object:
        return [orjson.dumps(event) for event in transform(route, raw).events]

    for raw in messages[:50]:
        whole(raw)  # warm caches
    rule, data = mapped(messages[0])

    def envelope(_: bytes) -> object:
        return orjson.dumps(build_event(route="adt-inbound", event_type=rule.type, major=rule.version, index=0,
                                        source_identity=("a", "b", "c", "d"), data=data,
                                        subject=rule.render_subject(data), time="2026-01-01T00:00:00Z",
                                        correlation_id="c"))

    sums = {name: cpu_per_message(fn, messages) for name, fn in
            (("parse", parse), ("map", mapped), ("validate", validated), ("envelope", envelope),
             ("whole", whole))}
    return {"parse": sums["parse"], "map": sums["map"] - sums["parse"], "validate": sums["validate"] - sums["map"],
            "envelope": sums["envelope"], "whole route (transform + orjson)": sums["whole"]}


def expression_rows(messages: list[bytes]) -> dict[str, float]:
    from hl7_parse import CEL_TEN, PLAIN_TEN

    from middleware.formats import get_format
    from middleware.mapping import apply_rules, compile_field

    fmt = get_format("hl7v2")
    plain = tuple(compile_field(k, v, fmt, {}) for k, v in PLAIN_TEN.items())  # type: ignore[arg-type]
    cel = tuple(compile_field(k, {"expr": v}, fmt, {}) for k, v in CEL_TEN.items())  # type: ignore[arg-type]
    parse = cpu_per_message(fmt.parse, messages)  # type: ignore[attr-defined]
    return {"map 10 plain paths": cpu_per_message(lambda r: apply_rules(plain, fmt.parse(r)), messages) - parse,  # type: ignore[attr-defined]
            "map 10 CEL expr:": cpu_per_message(lambda r: apply_rules(cel, fmt.parse(r)), messages) - parse}  # type: ignore[attr-defined]


async def broker_rows(url: str, bodies: list[bytes], concurrency: int) -> dict[str, tuple[float, float]]:
    import aio_pika

    from middleware.broker.amqp import AmqpBroker
    from middleware.broker.base import IncomingMessage, OutgoingMessage

    queue = f"bench-{uuid.uuid4().hex[:6]}.stages"
    broker = AmqpBroker(url)
    await broker.connect()
    await broker.declare_queue(queue)
    raw_connection = await aio_pika.connect(url)
    raw_channel = await raw_connection.channel(publisher_confirms=True)
    count = len(bodies)
    try:
        ours_publish = await async_cpu(lambda: bounded([
            (lambda b=b: broker.publish(OutgoingMessage(b, headers={"x-mw-route": "adt-inbound"}, correlation_id="c",
                                                        message_id="m", content_type="application/json"), queue=queue))
            for b in bodies], concurrency), count)
        done = asyncio.Event()
        seen = 0

        async def ack_only(message: IncomingMessage) -> None:
            nonlocal seen
            await message.ack()
            seen += 1
            if seen == count:
                done.set()

        async def consume_ours() -> None:
            consumer = await broker.consume(queue, ack_only, prefetch=concurrency)
            await done.wait()
            await consumer.close()

        ours_consume = await async_cpu(consume_ours, count)
        raw_publish = await async_cpu(lambda: bounded([
            (lambda b=b: raw_channel.default_exchange.publish(aio_pika.Message(
                b, headers={"x-mw-route": "adt-inbound"}, correlation_id="c", message_id="m",
                content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue))
            for b in bodies], concurrency), count)
        raw_done = asyncio.Event()
        raw_seen = 0

        async def raw_ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal raw_seen
            await message.ack()
            raw_seen += 1
            if raw_seen == count:
                raw_done.set()

        async def consume_raw() -> None:
            channel = await raw_connection.channel()
            await channel.set_qos(prefetch_count=concurrency)
            target = await channel.get_queue(queue, ensure=False)
            tag = await target.consume(raw_ack)
            await raw_done.wait()
            await target.cancel(tag)
            await channel.close()

        raw_consume = await async_cpu(consume_raw, count)
    finally:
        await broker.delete_queue(queue)
        await broker.close()
        await raw_connection.close()
    return {"publish (confirm)": (ours_publish, raw_publish), "consume + ack": (ours_consume, raw_consume)}


async def deliver_row(bodies: list[bytes], concurrency: int) -> tuple[float, float]:
    import aiohttp

    from middleware.delivery.base import ConnectorSpec, Delivery, make_connector

    port = free_port()
    sink = subprocess.Popen([sys.executable, str(Path(__file__).parent / "pipeline.py"), "--role", "sink",
                             "--port", str(port)])
    url = f"http://127.0.0.1:{port}/events"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.post(url, data=b"{}"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            connector = make_connector(ConnectorSpec("sink", "http", {"url": url, "method": "POST", "timeout": 10}))
            await connector.start()
            deliveries = [Delivery(body=b, event_id=f"e{n}", correlation_id=f"c{n}", route="adt-inbound",
                                   event_type="patient.admitted.v1") for n, b in enumerate(bodies)]
            ours = await async_cpu(lambda: bounded([(lambda d=d: connector.send(d)) for d in deliveries],
                                                   concurrency), len(bodies))
            await connector.close()

            async def post(body: bytes, n: int) -> None:
                async with session.post(url, data=body, headers={"Content-Type": "application/cloudevents+json",
                                                                 "X-Correlation-ID": f"c{n}"}) as answer:
                    await answer.read()

            raw = await async_cpu(lambda: bounded([(lambda b=b, n=n: post(b, n)) for n, b in enumerate(bodies)],
                                                  concurrency), len(bodies))
    finally:
        sink.terminate()
        sink.wait()
    return ours, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=20, help="in flight (the engine's default prefetch)")
    parser.add_argument("--url", default=URL)
    args = parser.parse_args()
    from middleware.observe import configure_logging
    from middleware.project import load_project
    from middleware.route import transform

    configure_logging("WARNING")
    messages = make_messages(args.messages)
    route = load_project(REPO, {}).routes["adt-inbound"]
    import orjson

    bodies = [orjson.dumps(transform(route, raw).events[0]) for raw in messages]
    runs: dict[str, list[tuple[float, float | None]]] = {}
    for _ in range(args.repeat):
        for name, value in {**pure_rows(messages), **expression_rows(messages)}.items():
            runs.setdefault(name, []).append((value, None))
        for name, pair in asyncio.run(broker_rows(args.url, bodies, args.concurrency)).items():
            runs.setdefault(name, []).append(pair)
        runs.setdefault("deliver (http POST)", []).append(asyncio.run(deliver_row(bodies, args.concurrency)))
    print(f"CPU µs per message (process CPU time), median of {args.repeat}, {args.messages} ADT^A01, "
          f"{args.concurrency} in flight")
    print("| stage | ours | raw library | ours - raw |\n|---|---:|---:|---:|")
    for name, values in runs.items():
        ours = statistics.median(v[0] for v in values)
        raws = [v[1] for v in values if v[1] is not None]
        if raws:
            raw = statistics.median(raws)
            print(f"| {name} | {ours:.0f} | {raw:.0f} | {ours - raw:+.0f} |")
        else:
            print(f"| {name} | {ours:.1f} | | |")


if __name__ == "__main__":
    main()
