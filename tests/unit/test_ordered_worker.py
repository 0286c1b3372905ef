"""The ordered delivery worker's failure path, without a broker: a connector bug is bounded and
dead-lettered with its reason, a stopping engine returns the event to the head of its partition
(reject with requeue, never a hand-back to the tail), and a hold window gives the event back."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from middleware.broker.base import Broker, IncomingMessage, OutgoingMessage
from middleware.deadletter import PREFIX
from middleware.delivery.base import Connector, ConnectorSpec, Delivery, RetryPolicy
from middleware.delivery.ordered import OrderedDeliveryWorker, backoff, in_place
from middleware.errors import BrokerUnavailable, DeliveryError
from middleware.observe import Metrics
from middleware.project import load_project
from middleware.route import Route

from ..ordering_kit import write_project

AMQP = {"MIDDLEWARE_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/", "ORDER_SINK_URL": "http://127.0.0.1:9/events"}
FAST = RetryPolicy(attempts=3, initial=0.001, max=0.002, multiplier=2, jitter=0, max_age=None)


class Message(IncomingMessage):
    """A consumed event that records how it was settled."""

    def __init__(self, delivery_count: int = 0) -> None:
        self.body = orjson.dumps({"id": "e1", "data": {"patient": {"mrn": "P1"}, "seq": 1}})
        self.headers: dict[str, Any] = {"x-mw-event-type": "visit.recorded.v1"}
        self.correlation_id, self.message_id, self.content_type = "c1", "e1", "application/cloudevents+json"
        self.redelivered, self.delivery_count, self.settled = delivery_count > 0, delivery_count, False
        self.outcome: str | None = None

    async def ack(self) -> None:
        self.settled, self.outcome = True, "ack"

    async def reject(self, requeue: bool = True) -> None:
        self.settled, self.outcome = True, f"reject requeue={requeue}"

    async def hand_back(self) -> None:
        self.settled, self.outcome = True, "hand back"


class Recorder(Broker):
    def __init__(self) -> None:
        self.published: list[tuple[OutgoingMessage, str | None]] = []

    async def publish(self, message: OutgoingMessage, *, queue: str | None = None, exchange: str | None = None,
                      routing_key: str = "", mandatory: bool | None = None) -> None:
        self.published.append((message, queue))


class Scripted(Connector):
    """Fails with ``errors`` in turn (an exception instance each), then accepts."""

    def __init__(self, errors: list[Exception], wait: float = 0.0) -> None:
        super().__init__(ConnectorSpec("order-sink", "http"))
        self.errors, self.wait, self.calls = errors, wait, 0

    async def send(self, delivery: Delivery) -> None:
        self.calls += 1
        await asyncio.sleep(self.wait)
        if self.errors:
            raise self.errors.pop(0)


@pytest.fixture
def route(tmp_path: Path) -> Route:
    return load_project(write_project(tmp_path / "p", partitions=2), AMQP).routes["visits"]


def _worker(route: Route, connector: Connector, broker: Broker, **options: Any) -> OrderedDeliveryWorker:
    return OrderedDeliveryWorker(route, connector, broker, Metrics(), partition=1, retry=options.pop("retry", FAST),
                                 prefix="X.", **options)


async def test_a_connector_bug_is_retried_in_place_then_dead_lettered_with_its_reason(route: Route) -> None:
    broker, message = Recorder(), Message()
    connector = Scripted([RuntimeError("boom")] * 20)
    await _worker(route, connector, broker, delivery_limit=4).handle(message)
    assert connector.calls == 4 and message.outcome == "ack"
    [(letter, queue)] = broker.published
    assert queue == "X.visits.dlq"
    assert "connector failed with RuntimeError on each of 4 attempts" in letter.headers[f"{PREFIX}error"]
    assert letter.headers[f"{PREFIX}replay-queue"] == "X.visits.to.order-sink.p1"  # replay: its partition


async def test_retryable_failures_are_retried_in_place_until_accepted(route: Route) -> None:
    broker, message = Recorder(), Message()
    connector = Scripted([DeliveryError("503", retryable=True, status=503) for _ in range(7)])
    await _worker(route, connector, broker).handle(message)
    assert connector.calls == 8 and message.outcome == "ack" and broker.published == []  # more than attempts: 3


async def test_a_stopping_engine_returns_the_event_to_the_head_of_its_partition(route: Route) -> None:
    message = Message()
    connector = Scripted([DeliveryError("503", retryable=True, status=503) for _ in range(1000)])
    task = asyncio.create_task(_worker(route, connector, Recorder()).handle(message))
    while connector.calls < 3:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert message.outcome == "reject requeue=True"  # a hand-back would put it behind later events


async def test_a_hold_window_gives_the_event_back_and_the_last_delivery_dead_letters(route: Route) -> None:
    failing: list[Exception] = [DeliveryError("503", retryable=True, status=503) for _ in range(1000)]
    policy = dataclasses.replace(FAST, max_age=1.0)  # the partition queue's limit: 10 + 1.0 / 0.02 + 1 = 61
    message = Message(delivery_count=2)
    await _worker(route, Scripted(failing), Recorder(), retry=policy, hold_seconds=0.02, delivery_limit=10
                  ).handle(message)
    assert message.outcome == "reject requeue=True"
    broker, last = Recorder(), Message(delivery_count=61)
    worker = _worker(route, Scripted(failing), broker, retry=policy, hold_seconds=0.02, delivery_limit=10)
    assert worker.partition_limit == 61
    await worker.handle(last)
    assert last.outcome == "ack" and len(broker.published) == 1  # dead-lettered with its reason instead


async def test_hold_windows_go_on_past_the_delivery_limit_until_max_age(route: Route) -> None:
    """The wait is bounded by max_age, not by the engine's delivery_limit: each hold window's return
    is one more delivery, and the dead letter counts every send since the first failure."""
    connector = Scripted([DeliveryError("503", retryable=True, status=503) for _ in range(100_000)])
    broker = Recorder()
    worker = _worker(route, connector, broker, retry=dataclasses.replace(FAST, max_age=0.3), hold_seconds=0.02,
                     delivery_limit=2)
    outcomes = []
    for count in range(1000):  # the broker delivers the returned event again, delivery_count one higher
        message = Message(delivery_count=count)
        await worker.handle(message)
        outcomes.append(message.outcome)
        if message.outcome == "ack":
            break
    assert outcomes[-1] == "ack" and len(outcomes) > 5  # returned far more often than delivery_limit 2
    assert set(outcomes[:-1]) == {"reject requeue=True"}
    [(letter, _)] = broker.published
    headers = letter.headers
    assert "retry.max_age" in headers[f"{PREFIX}error"] and "503" in headers[f"{PREFIX}error"]
    assert headers[f"{PREFIX}attempts"] == connector.calls  # every send, every hold window
    first = dt.datetime.fromisoformat(headers[f"{PREFIX}first-failure"])
    last = dt.datetime.fromisoformat(headers[f"{PREFIX}last-failure"])
    assert (last - first).total_seconds() >= 0.3


async def test_a_retry_after_longer_than_a_hold_window_is_waited_across_windows(route: Route) -> None:
    """The returned event is not sent again before the sink's Retry-After (0.12 s, windows of 0.05 s)."""
    connector = Scripted([DeliveryError("429", retryable=True, status=429, retry_after=0.12)])
    sent: list[float] = []
    send = connector.send

    async def timed(delivery: Delivery) -> None:
        sent.append(time.monotonic())
        await send(delivery)

    connector.send = timed  # type: ignore[method-assign]
    worker = _worker(route, connector, Recorder(), hold_seconds=0.05, delivery_limit=10)
    outcomes = []
    for count in range(20):
        message = Message(delivery_count=count)
        await worker.handle(message)
        outcomes.append(message.outcome)
        if message.outcome == "ack":
            break
    assert outcomes[-1] == "ack" and "reject requeue=True" in outcomes and connector.calls == 2
    assert sent[1] - sent[0] >= 0.12


async def test_max_age_ends_the_wait(route: Route) -> None:
    broker, message = Recorder(), Message()
    connector = Scripted([DeliveryError("503", retryable=True, status=503) for _ in range(10_000)])
    policy = dataclasses.replace(FAST, max_age=0.05)
    await _worker(route, connector, broker, retry=policy).handle(message)
    [(letter, _)] = broker.published
    assert message.outcome == "ack" and "503" in letter.headers[f"{PREFIX}error"]


def test_backoff_grows_to_max_and_honours_retry_after() -> None:
    policy = RetryPolicy(initial=1, max=4, multiplier=2, jitter=0)
    assert [backoff(policy, n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert backoff(policy, 1, retry_after=60) == 60  # the sink asked: above max


async def test_an_event_its_map_cannot_shape_is_dead_lettered_and_the_partition_goes_on(tmp_path: Path) -> None:
    root = write_project(tmp_path / "m", partitions=2)
    yaml = root / "routes" / "visits.yaml"
    yaml.write_text(yaml.read_text() + "    map:\n      nhs: {path: data.patient.nhs, required: true}\n")
    route = load_project(root, AMQP).routes["visits"]
    broker, message, connector = Recorder(), Message(), Scripted([])
    await _worker(route, connector, broker).handle(message)
    [(letter, queue)] = broker.published
    assert message.outcome == "ack" and connector.calls == 0 and queue == "X.visits.dlq"
    assert letter.headers[f"{PREFIX}stage"] == "deliver" and "nhs" in letter.headers[f"{PREFIX}error"]


async def test_a_broker_refusal_returns_the_event_to_the_head_of_its_partition() -> None:
    """A broker that refuses publishes for a while (a cluster node's queues electing a leader) is not the
    event's fault: it goes back to the head of its queue (reject with requeue), never behind later events."""

    async def refused(message: IncomingMessage) -> None:
        raise BrokerUnavailable("RabbitMQ refused the message (Basic.Nack)")

    message = Message()
    with pytest.raises(BrokerUnavailable):
        await in_place(refused)(message)
    assert message.outcome == "reject requeue=True"
