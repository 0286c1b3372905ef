"""Benchmark: the HTTP ingest gateway (202 after the broker's confirm) beside a bare aiohttp handler.

Both run in the same process on the same RabbitMQ, for the same time, with the same requests (the
referrals-rest sample, a unique referral id each) and ``--clients`` concurrent clients, each sending
its next request when the previous one was answered:

  - baseline: a bare ``aiohttp.web`` handler that reads the body and publishes it with aio-pika on one
    channel with publisher confirms, answering 202 after the confirm (no auth, no checks, no parsing);
  - gateway: :class:`middleware.ingest.http.HttpGateway` (bearer token, rate limit off, the body parsed
    by the route's format, published through the Publisher, 202 after the confirm).

Prints requests/s and p50/p99 latency (request sent to answer read) and the ratio; deletes the queues
and exchange it declared (a random ``bench-`` prefix).

Run: .venv/bin/python bench/http_ingest.py [--seconds 3] [--clients 50] [--url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
SAMPLE = (REPO / "samples" / "referrals-rest" / "cardiology-urgent.json").read_bytes()
TOKEN = "bench-token"


def percentiles(latencies: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


async def load(url: str, clients: int, seconds: float, headers: dict[str, str],
               body: Callable[[], bytes]) -> tuple[int, float, list[float]]:
    """``clients`` concurrent request loops for ``seconds``; (requests, elapsed, latencies)."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url, data=body(), headers=headers) as response:
                    await response.read()
                    if response.status != 202:
                        raise RuntimeError(f"answered {response.status}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return len(latencies), time.perf_counter() - started, latencies


async def bare_server(amqp_url: str, queue: str) -> tuple[web.AppRunner, int, Callable[[], object]]:
    """The baseline: read the body, publish it with a confirm, answer 202."""
    import aio_pika

    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel(publisher_confirms=True)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        message_id = str(uuid.uuid4())
        await channel.default_exchange.publish(
            aio_pika.Message(body, message_id=message_id, correlation_id=message_id, content_type="application/json",
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue, mandatory=True)
        return web.json_response({"message_ids": [message_id]}, status=202)

    app = web.Application()
    app.router.add_post("/v1/routes/{route}/messages", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port, connection.close


async def main(args: argparse.Namespace) -> None:
    from middleware.broker import make_broker, naming
    from middleware.ingest import HttpListener
    from middleware.ingest.http import HttpGateway
    from middleware.ingest.publisher import Publisher
    from middleware.project import load_project

    prefix = f"bench-{uuid.uuid4().hex[:6]}."
    project = load_project(REPO, {**os.environ, "MIDDLEWARE_BROKER_URL": args.url, "MIDDLEWARE_QUEUE_PREFIX": prefix,
                                  "HTTP_INGEST_TOKEN": TOKEN})
    settings = project.settings
    route = project.routes["referrals-rest"]
    queue = naming.inbound_queue(route.source_queue, prefix)
    counter = itertools.count()

    def body() -> bytes:
        return SAMPLE.replace(b"REF-2026-004512", f"REF-BENCH-{next(counter)}".encode())

    admin = make_broker(args.url)
    await admin.connect()
    gateway_broker = make_broker(args.url)
    headers = {"Content-Type": "application/json"}
    warm = min(args.seconds, 0.5)
    try:
        await Publisher(admin, route, settings).declare()
        runner, port, close = await bare_server(args.url, queue)
        try:
            bare_url = f"http://127.0.0.1:{port}/v1/routes/{route.name}/messages"
            await load(bare_url, args.clients, warm, headers, body)
            raw = await load(bare_url, args.clients, args.seconds, headers, body)
        finally:
            await runner.cleanup()
            await close()  # type: ignore[misc]
        await admin.purge(queue)

        await gateway_broker.connect()
        listener = HttpListener(name="bench", port=0, bearer_tokens=(TOKEN,), routes=(route.name,))
        gateway = HttpGateway(listener, gateway_broker, settings, project.routes)
        await gateway.start(declare=False)
        try:
            gateway_url = f"{gateway.base_url}/v1/routes/{route.name}/messages"
            auth = {**headers, "Authorization": f"Bearer {TOKEN}"}
            await load(gateway_url, args.clients, warm, auth, body)
            await admin.purge(queue)
            through = await load(gateway_url, args.clients, args.seconds, auth, body)
            landed = (await admin.queue_info(queue)).messages
        finally:
            await gateway.stop()
    finally:
        for name in [queue, *(naming.delivery_queue(route.name, d.connector, prefix) for d in route.deliver),
                     naming.dead_letter_queue(route.name, prefix)]:
            await admin.delete_queue(name)
        await admin.delete_exchange(naming.events_exchange(prefix))
        await gateway_broker.close()
        await admin.close()

    print(f"HTTP ingest benchmark: {args.seconds:g} s per run, {args.clients} concurrent clients, "
          f"{len(SAMPLE)}-byte JSON referral, quorum queue on {args.url.split('@')[-1]}")
    print(f"{'':44}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    rates = []
    for label, (count, elapsed, latencies) in (("bare aiohttp handler, publish + confirm", raw),
                                               ("HTTP ingest gateway, 202 after confirm", through)):
        p50, p99 = percentiles(latencies)
        rates.append(count / elapsed)
        print(f"{label:44}{count:9d}{count / elapsed:9.0f}{p50:9.2f}{p99:9.2f}")
    print(f"gateway / bare baseline: {rates[1] / rates[0]:.2f}; "
          f"messages on the queue after the gateway run: {landed} (answered 202: {through[0]})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per run (default 3)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--url", default=os.environ.get("MIDDLEWARE_TEST_AMQP_URL",
                                                        "amqp://guest:guest@127.0.0.1:5672/"))
    asyncio.run(main(parser.parse_args()))
