"""``Engine.is_idle`` (what ``middleware demo`` waits for): a delivery parked in a delay queue while
its sink is down is work still to do, so the engine is not idle until it is delivered. Embedded
broker (its delay queues expire and return like RabbitMQ's), a real local aiohttp sink."""

from __future__ import annotations

import asyncio
from pathlib import Path

from middleware import topology
from middleware.broker import make_broker
from middleware.engine import Engine
from middleware.project import load_project
from middleware.topology import Topology

from ..conftest import Sink
from ..ordering_kit import OrderSink, publish_visits, write_project


async def _until(check: object, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_parked_delivery_keeps_the_engine_busy_until_it_is_delivered(tmp_path: Path) -> None:
    sink = OrderSink()
    await sink.start()
    sink.fail[("P000", 0)] = 3  # the connector's 3 attempts in process fail: parked, tier 1 (5 s)
    env = {"MIDDLEWARE_BROKER_URL": "memory://", "MIDDLEWARE_QUEUE_PREFIX": "idle-parked.", "ORDER_SINK_URL": sink.url}
    project = load_project(write_project(tmp_path / "p", partitions=None), env)
    engine = Engine(project, gateways=False)
    names = engine.topology.route("visits")
    await engine.start()
    try:
        await publish_visits(engine.broker, names.inbound, [("P000", 0)])

        async def parked() -> bool:
            return any([(await engine.broker.queue_info(q)).messages for q in names.parking_queues])

        async def only_parked() -> bool:  # the delay queue holds it; its delivery queue's copy is acked
            work = [(await engine.broker.queue_info(q)).messages for q in names.work_queues]
            return await parked() and not any(work) and engine.in_flight == 0

        await _until(only_parked, 10, "the delivery to be parked (and nothing else in flight)")
        assert not await engine.is_idle()
        await _until(engine.is_idle, 30, "the parked delivery to come back and be delivered")
        assert sink.accepted == [("P000", 0)]
    finally:
        await engine.stop()
        client = make_broker("memory://")  # the embedded in-memory broker is one per process
        await client.connect()
        await topology.delete(client, engine.topology)
        await client.close()
        await sink.stop()


def test_pending_queues_are_the_work_and_delay_queues_not_the_dead_letters(tmp_path: Path, sink: Sink) -> None:
    env = {"MIDDLEWARE_BROKER_URL": "memory://", "ORDER_SINK_URL": sink.url}
    project = load_project(write_project(tmp_path / "p", partitions=None), env)
    names = Topology.of(project.routes.values(), project.settings.queue_prefix)
    route = names.route("visits")
    assert route.parking_queues and set(route.parking_queues) <= set(names.pending_queues)
    assert set(route.work_queues) <= set(names.pending_queues) and route.dead_letter not in names.pending_queues
    assert set(names.pending_queues) | {route.dead_letter} == set(names.queues)
