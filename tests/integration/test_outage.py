"""A sink down for 2 minutes (issue 11's acceptance test; the policy's tiers and probe interval
shortened): nothing is dead-lettered, every event arrives once it is back, the sink is not hammered
while down, and the other sink of the same route keeps receiving while the first is down, events
published mid-outage included (DESIGN promise 5). Real RabbitMQ, real local aiohttp sinks."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from middleware import topology
from middleware.broker import make_broker, naming
from middleware.broker.base import Broker, OutgoingMessage
from middleware.delivery.base import BreakerPolicy, ConnectorSpec, RetryPolicy
from middleware.engine import Engine
from middleware.project import Project
from middleware.route import Route
from middleware.topology import Topology

EVENTS = 1000  # half published as the sink goes down, half mid-outage with its breaker open
OUTAGE = 120.0  # seconds the sink answers 503: issue 11's 2 minutes
POLICY = RetryPolicy(attempts=3, initial=0.05, max=0.2, multiplier=2, jitter=0.0, delays=(1, 2, 4), max_age=3600.0)
BREAKER = BreakerPolicy(failures=5, probe_every=2.0)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(OUTAGE + 120)]


class OutageSink:
    """A local HTTP sink that answers 503 while ``down``; counts what it got, when."""

    def __init__(self) -> None:
        self.down = False
        self.requests_while_down = 0
        self.delivered: dict[str, int] = {}  # Idempotency-Key -> times accepted
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            if self.down:
                self.requests_while_down += 1
                return web.Response(status=503, text="down")
            key = request.headers["Idempotency-Key"]
            self.delivered[key] = self.delivered.get(key, 0) + 1
            return web.Response(status=200, text="ok")

        app = web.Application()
        app.router.add_post("/events", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/events"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def sinks() -> AsyncIterator[tuple[OutageSink, OutageSink]]:
    dead, healthy = OutageSink(), OutageSink()
    await dead.start()
    await healthy.start()
    yield dead, healthy
    await dead.stop()
    await healthy.stop()


def _outage_project(project: Project, dead: OutageSink, healthy: OutageSink) -> Project:
    """adt-inbound alone, delivering to case-management (the sink that goes down) and to bed-board
    (here a second HTTP sink that stays up), both with the shortened tiers."""
    route: Route = project.routes["adt-inbound"]
    route = dataclasses.replace(route, deliver=tuple(dataclasses.replace(d, retry=POLICY) for d in route.deliver))
    connectors = {
        "case-management": ConnectorSpec("case-management", "http", {"url": dead.url, "timeout": 2}, POLICY, BREAKER),
        "bed-board": ConnectorSpec("bed-board", "http", {"url": healthy.url, "timeout": 2}, POLICY, BREAKER),
    }
    return dataclasses.replace(project, routes={route.name: route}, connectors=connectors)


async def _until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def _publish(client: Broker, exchange: str, numbers: range) -> None:
    for n in numbers:
        body = orjson.dumps({"specversion": "1.0", "id": f"evt-{n}", "type": "patient.admitted.v1"})
        await client.publish(OutgoingMessage(body, {"x-mw-route": "adt-inbound",
                                                    "x-mw-event-type": "patient.admitted.v1"},
                                             f"corr-{n}", f"evt-{n}", "application/cloudevents+json"),
                             exchange=exchange, routing_key=naming.event_routing_key(
                                 "adt-inbound", "patient.admitted.v1"))


async def test_a_sink_down_for_two_minutes_loses_nothing_is_not_hammered_and_slows_no_other_sink(
        rabbit_project: Project, sinks: tuple[OutageSink, OutageSink]) -> None:
    dead, healthy = sinks
    project = _outage_project(rabbit_project, dead, healthy)
    names = Topology.of(project.routes.values(), project.settings.queue_prefix)
    adt = names.route("adt-inbound")
    engine = Engine(project, gateways=False)
    client: Broker = make_broker(project.settings.broker_url)
    half = EVENTS // 2
    await client.connect()
    try:
        await engine.start()
        dead.down = True
        started = time.monotonic()
        await _publish(client, adt.exchange, range(half))
        await _until(lambda: engine.gates["case-management"].breaker.is_open, 10, "the breaker to open")
        opened = time.monotonic() - started
        # mid-outage, with the breaker open: the other sink of the route still gets every new event
        await asyncio.sleep(max(OUTAGE / 2 - (time.monotonic() - started), 0))
        assert dead.down and engine.gates["case-management"].breaker.is_open
        second = time.monotonic()
        await _publish(client, adt.exchange, range(half, EVENTS))
        await _until(lambda: len(healthy.delivered) == EVENTS, OUTAGE - (time.monotonic() - started) - 1,
                     "bed-board to get every event while case-management is down")
        healthy_lag = time.monotonic() - second
        await asyncio.sleep(max(OUTAGE - (time.monotonic() - started), 0))
        outage = time.monotonic() - started
        hits = dead.requests_while_down
        dead.down = False
        await _until(lambda: len(dead.delivered) == EVENTS, 60, "case-management after recovery")
        recovered = time.monotonic() - started - outage
        await asyncio.sleep(1.0)  # a duplicate or a dead letter still on its way would show now
        dead_letters = (await client.queue_info(adt.dead_letter)).messages
        parked = sum([(await client.queue_info(q)).messages for _, q in adt.delay_queues("case-management")])
    finally:
        await engine.stop()
        await topology.delete(client, names)
        await client.close()
    # while down, only two kinds of request reach the sink: the sends already under way when the
    # breaker opened (the `failures` that opened it, plus at most one per other message in flight:
    # prefetch - 1; a handler sends nothing more once it is open) and one probe every probe_every
    # after that. A busy loop would be thousands (every event, every tier).
    bound = BREAKER.failures + project.settings.prefetch - 1 + math.ceil(outage / BREAKER.probe_every)
    print(f"\n{EVENTS} events, sink down {outage:.1f}s, breaker open after {opened:.1f}s: {hits} requests to it "
          f"while down (bound {bound}); the other sink had the {EVENTS - half} events published mid-outage "
          f"{healthy_lag:.1f}s later; all delivered {recovered:.1f}s after recovery")
    assert hits <= bound
    assert hits >= BREAKER.failures  # it was tried (and probed) at all
    assert dead_letters == 0 and engine.metrics.total("middleware_dead_lettered") == 0
    assert set(dead.delivered) == {f"evt-{n}" for n in range(EVENTS)} and parked == 0
    assert set(healthy.delivered) == {f"evt-{n}" for n in range(EVENTS)}
    assert engine.metrics.value("middleware_breaker_opened", connector="case-management") >= 1
    assert engine.metrics.value("middleware_breaker_opened", connector="bed-board") == 0
