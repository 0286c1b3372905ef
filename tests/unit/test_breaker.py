"""Circuit breaker per connector: the state machine, and the gate that pauses a connector's delivery
consumers while it is open, probes one message every ``probe_every`` and resumes on a success."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from middleware import topology
from middleware.broker import make_broker
from middleware.broker.base import Consumer, Handler, IncomingMessage, OutgoingMessage
from middleware.broker.kombu_broker import KombuBroker
from middleware.delivery import breaker as breaker_module
from middleware.delivery.base import BreakerPolicy, ConnectorSpec, RetryPolicy, make_connector
from middleware.delivery.breaker import CLOSED, OPEN, CircuitBreaker, ConnectorGate
from middleware.errors import BrokerError, DeliveryError
from middleware.observe import Metrics
from middleware.project import Project, load_project
from middleware.route import DeliveryRule
from middleware.topology import RouteTopology
from middleware.workers import DeliveryWorker
from tests.conftest import Sink

REPO = Path(__file__).resolve().parents[2]
RETRYABLE = DeliveryError("HTTP 503", retryable=True, status=503)
REJECTED = DeliveryError("HTTP 400", retryable=False, status=400)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_it_opens_after_n_retryable_failures_in_a_row() -> None:
    changes: list[str] = []
    breaker = CircuitBreaker("sink", BreakerPolicy(failures=3), on_change=changes.append)
    for error in (RETRYABLE, RETRYABLE, None, RETRYABLE, REJECTED, RETRYABLE):  # a success resets the count
        breaker.record(error)
    assert breaker.state == CLOSED and breaker.failures == 2  # a 400 means the sink answered: not counted
    breaker.record(RETRYABLE)
    assert breaker.state == OPEN and changes == [OPEN]
    breaker.record(RETRYABLE)
    assert changes == [OPEN]  # opened once


def test_while_open_a_probe_is_due_every_probe_every_and_one_success_closes_it() -> None:
    clock = Clock()
    changes: list[str] = []
    breaker = CircuitBreaker("sink", BreakerPolicy(failures=1, probe_every=30), clock=clock, on_change=changes.append)
    assert not breaker.probe_due()  # closed: nothing to probe
    breaker.record(RETRYABLE)
    assert breaker.is_open and not breaker.probe_due()
    clock.now += 29.9
    assert not breaker.probe_due()
    clock.now += 0.1
    assert breaker.probe_due()
    breaker.probed()
    breaker.record(RETRYABLE)  # the probe failed
    assert breaker.is_open and not breaker.probe_due()
    clock.now += 30
    assert breaker.probe_due()
    breaker.probed()
    breaker.record(None)
    assert breaker.state == CLOSED and breaker.failures == 0 and changes == [OPEN, CLOSED]


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {"HTTP_INGEST_TOKEN": "t"})


async def test_an_open_breaker_pauses_the_consumer_probes_and_resumes_on_success(project: Project,
                                                                               sink: Sink) -> None:
    policy = RetryPolicy(attempts=1, initial=0.01, max=0.05, jitter=0.0, delays=(1,), max_age=None)
    route = dataclasses.replace(project.routes["adt-inbound"], deliver=(DeliveryRule("case-management", policy),))
    names = RouteTopology.of(route)
    broker = make_broker("memory://")
    await broker.connect()
    await topology.declare(broker, names, delivery_limit=5)
    metrics = Metrics()
    connector = make_connector(ConnectorSpec("case-management", "http", {"url": sink.url}, policy))
    worker = DeliveryWorker(route, connector, broker, metrics, retry=policy)
    gate = ConnectorGate("case-management", BreakerPolicy(failures=3, probe_every=0.5), broker, metrics,
                         refresh_every=0.05)
    worker.breaker = gate.breaker
    consumer = await gate.consume(worker.queue, worker.handle, 10, worker.probe, route=route.name,
                                  delay_queues=[q for _, q in names.delay_queues("case-management")])
    try:
        sink.script = [503] * 1000
        for n in range(20):
            await broker.publish(OutgoingMessage(f'{{"n": {n}}}'.encode(), message_id=f"evt-{n}"), queue=worker.queue)
        for _ in range(200):
            if gate.breaker.is_open and consumer.paused:
                break
            await asyncio.sleep(0.02)
        assert gate.breaker.is_open and consumer.paused
        parked = metrics.value("middleware_deliveries_parked", route="adt-inbound", connector="case-management")
        assert parked >= 1  # those in flight when it opened: parked, not dead-lettered

        def waiting() -> float | None:
            return metrics.registry.get_sample_value("middleware_parked_messages",
                                                     {"route": "adt-inbound", "connector": "case-management"})

        for _ in range(50):
            if waiting():
                break
            await asyncio.sleep(0.02)
        assert 0 < (waiting() or 0) <= parked  # the gauge reads the delay queues' depths (some may be back)
        assert metrics.registry.get_sample_value("middleware_breaker_open", {"connector": "case-management"}) == 1
        await asyncio.sleep(0.3)
        sent_while_open = len(sink.requests)
        await asyncio.sleep(1.2)  # two probes' worth: one request each, no more
        assert len(sink.requests) - sent_while_open <= 3
        sink.script = []  # the sink is back: the next probe closes the breaker, the consumer resumes
        for _ in range(300):
            if not gate.breaker.is_open and metrics.value("middleware_events_delivered", route="adt-inbound",
                                                          connector="case-management") == 20:
                break
            await asyncio.sleep(0.02)
        assert not gate.breaker.is_open and not consumer.paused
        assert metrics.value("middleware_events_delivered", route="adt-inbound", connector="case-management") == 20
        assert metrics.value("middleware_breaker_opened", connector="case-management") == 1
        assert metrics.total("middleware_dead_lettered") == 0
    finally:
        await consumer.cancel()
        await gate.stop()
        await consumer.close()
        await connector.close()
        for queue in names.queues:
            await broker.delete_queue(queue)
        await broker.close()


class _RefusingOnce(KombuBroker):
    """The embedded broker, refusing one subscription (as a broker in the middle of a restart would)."""

    refuse = False

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 10) -> Consumer:
        if self.refuse:
            self.refuse = False
            raise BrokerError("connection lost", hint="it comes back")
        return await super().consume(queue, handler, prefetch=prefetch)


async def test_deliveries_resume_even_if_the_broker_refuses_the_first_new_subscription(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(breaker_module, "RESUME_RETRY", 0.05)
    broker = _RefusingOnce("memory://")
    await broker.connect()
    await broker.declare_queue("gate.work", kind="work")

    async def handler(message: IncomingMessage) -> None:
        await message.ack()

    async def probe(message: IncomingMessage) -> bool:
        return True

    gate = ConnectorGate("sink", BreakerPolicy(failures=1, probe_every=60), broker, Metrics())
    consumer = await gate.consume("gate.work", handler, 10, probe)
    try:
        gate.breaker.record(RETRYABLE)
        for _ in range(100):
            if consumer.paused:
                break
            await asyncio.sleep(0.01)
        assert consumer.paused
        broker.refuse = True
        gate.breaker.record(None)  # closed: the first subscription fails, the next one is made
        for _ in range(100):
            if not consumer.paused:
                break
            await asyncio.sleep(0.02)
        assert not consumer.paused and not broker.refuse
    finally:
        await consumer.cancel()
        await gate.stop()
        await consumer.close()
        await broker.delete_queue("gate.work")
        await broker.close()


class _LosingCancels(KombuBroker):
    """The embedded broker whose depth reads turn a cancellation into a broker error, as aiormq does
    (a channel open cancelled mid-way comes back as ConnectionChannelError, not as the cancel)."""

    reads = 0

    async def queue_info(self, queue: str):  # type: ignore[no-untyped-def]
        self.reads += 1
        try:
            await asyncio.sleep(0.01)  # the read in flight, where stop()'s cancel lands
        except asyncio.CancelledError:
            raise BrokerError("channel closed", hint="reopened") from None
        return await super().queue_info(queue)


@pytest.mark.timeout(60)  # the regression hangs rather than fails
async def test_stop_returns_even_when_a_cancel_is_lost_in_the_depth_refresh(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM once waited forever on the parked-depth refresh loop (one SIGTERM was not enough):
    its cancel came back as a broker error, which the loop took for a hiccup and went on. The loop now
    ends on stop() by itself, and stop() waits for it only so long."""
    monkeypatch.setattr(breaker_module, "STOP_WAIT", 0.5)
    broker = _LosingCancels("memory://")
    await broker.connect()
    await broker.declare_queue("gate.work", kind="work")
    await broker.declare_queue("gate.delay", kind="work")

    async def handler(message: IncomingMessage) -> None:
        await message.ack()

    async def probe(message: IncomingMessage) -> bool:
        return True

    gate = ConnectorGate("sink", BreakerPolicy(failures=1, probe_every=60), broker, Metrics(), refresh_every=0.0)
    consumer = await gate.consume("gate.work", handler, 10, probe, route="r", delay_queues=["gate.delay"])
    try:
        while broker.reads < 3:  # the refresh loop reads the delay queue's depth without pause
            await asyncio.sleep(0.005)
        await consumer.cancel()
        stopping = asyncio.create_task(gate.stop())
        done, _ = await asyncio.wait({stopping}, timeout=5.0)
        assert done, "gate.stop() did not return"  # before the fix: it never did
        reads = broker.reads
        await asyncio.sleep(0.1)
        assert broker.reads <= reads + 1  # and the loop itself ended at its next turn
    finally:
        await consumer.close()
        await broker.delete_queue("gate.work")
        await broker.delete_queue("gate.delay")
        await broker.close()
