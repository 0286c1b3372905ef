"""A delivery's failure path (DESIGN promises 5 and 7): retryable failures are parked on the broker
in delay queues with their history, until ``retry.max_age``; then, or at once for a non-retryable
outcome, a dead letter with attempts, first and last failure. Real local sink, embedded broker."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import AsyncIterator
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from middleware import topology
from middleware.broker import make_broker
from middleware.broker.base import Broker, OutgoingMessage
from middleware.delivery import parking
from middleware.delivery.base import BreakerPolicy, ConnectorSpec, RetryPolicy, make_connector
from middleware.delivery.breaker import CircuitBreaker
from middleware.delivery.http import _retry_after
from middleware.errors import DeliveryError
from middleware.observe import Metrics
from middleware.project import Project, load_project
from middleware.route import DeliveryRule, Route
from middleware.topology import RouteTopology
from middleware.workers import DeliveryWorker
from tests.conftest import Sink

REPO = Path(__file__).resolve().parents[2]
POLICY = RetryPolicy(attempts=2, initial=0.01, max=0.05, jitter=0.0, delays=(1, 2, 4), max_age=3600.0)
CONNECTOR = "case-management"


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {"HTTP_INGEST_TOKEN": "t"})


class Setup:
    def __init__(self, broker: Broker, route: Route, sink: Sink, metrics: Metrics, policy: RetryPolicy) -> None:
        self.broker, self.route, self.sink, self.metrics = broker, route, sink, metrics
        self.names = RouteTopology.of(route)
        spec = ConnectorSpec(CONNECTOR, "http", {"url": sink.url, "timeout": 2}, policy)
        self.worker = DeliveryWorker(route, make_connector(spec), broker, metrics, retry=policy)

    async def deliver(self, headers: dict[str, Any] | None = None) -> None:
        event = OutgoingMessage(b'{"id": "evt-1"}', {"x-mw-route": self.route.name,
                                                      "x-mw-event-type": "patient.admitted.v1", **(headers or {})},
                                "corr-1", "evt-1", "application/cloudevents+json")
        await self.broker.publish(event, queue=self.worker.queue)
        message = await self.broker.get(self.worker.queue)
        assert message is not None
        await self.worker.handle(message)
        assert await self.broker.get(self.worker.queue) is None  # settled: acked, parked or dead-lettered

    async def only(self, queue: str) -> dict[str, Any]:
        message = await self.broker.get(queue)
        assert message is not None, f"nothing in {queue}"
        assert message.body == b'{"id": "evt-1"}' and message.message_id == "evt-1"
        await message.ack()
        assert await self.broker.get(queue) is None
        return message.headers

    async def depths(self) -> dict[str, int]:
        queues = [q for _, q in self.names.delay_queues(CONNECTOR)] + [self.names.dead_letter]
        return {q.rsplit(".", 1)[-1]: (await self.broker.queue_info(q)).messages for q in queues}


@pytest.fixture
async def setup(project: Project, sink: Sink) -> AsyncIterator[Setup]:
    route = dataclasses.replace(project.routes["adt-inbound"], deliver=(DeliveryRule(CONNECTOR, POLICY),))
    broker = make_broker("memory://")
    await broker.connect()
    for queue in RouteTopology.of(route).queues:  # the in-memory broker is one per process: start empty
        await broker.delete_queue(queue)
    await topology.declare(broker, RouteTopology.of(route), delivery_limit=5)
    made = Setup(broker, route, sink, Metrics(), POLICY)
    yield made
    await made.worker.connector.close()
    for queue in RouteTopology.of(route).queues:
        await broker.delete_queue(queue)
    await broker.close()


def _ago(**delta: float) -> str:
    return parking.timestamp(dt.datetime.now(dt.UTC) - dt.timedelta(**delta))


async def test_a_retryable_failure_is_parked_in_the_first_delay_queue_with_its_history(setup: Setup) -> None:
    setup.sink.script = [503, 503]
    await setup.deliver()
    assert len(setup.sink.requests) == 2  # the attempts in process, then parked
    assert await setup.depths() == {"1": 1, "2": 0, "4": 0, "dlq": 0}
    headers = await setup.only(setup.names.delay(CONNECTOR, 1))
    assert headers[parking.ATTEMPTS] == 2 and headers[parking.PARKED] == 1
    assert "HTTP 503" in headers[parking.LAST_ERROR]
    first, last = (dt.datetime.fromisoformat(headers[h]) for h in (parking.FIRST_FAILURE, parking.LAST_FAILURE))
    assert first <= last <= dt.datetime.now(dt.UTC)
    assert headers["x-mw-event-type"] == "patient.admitted.v1"  # the original headers travel on
    assert setup.metrics.value("middleware_deliveries_parked", route="adt-inbound", connector=CONNECTOR) == 1


async def test_a_parked_delivery_waits_longer_each_time_and_keeps_its_first_failure(setup: Setup) -> None:
    setup.sink.script = [503, 503]
    first = _ago(minutes=10)
    await setup.deliver({parking.ATTEMPTS: 4, parking.FIRST_FAILURE: first, parking.PARKED: 1,
                         "x-death": [{"count": 1}], "x-delivery-count": 0})
    assert await setup.depths() == {"1": 0, "2": 1, "4": 0, "dlq": 0}
    headers = await setup.only(setup.names.delay(CONNECTOR, 2))
    assert (headers[parking.ATTEMPTS], headers[parking.PARKED], headers[parking.FIRST_FAILURE]) == (6, 2, first)
    assert "x-death" not in headers  # the broker's own bookkeeping is not carried into the next park
    setup.sink.script = [503, 503]
    await setup.deliver({parking.PARKED: 7, parking.FIRST_FAILURE: first})
    assert await setup.depths() == {"1": 0, "2": 0, "4": 1, "dlq": 0}  # the last tier repeats


async def test_past_max_age_it_dead_letters_with_attempts_first_and_last_failure(setup: Setup) -> None:
    setup.sink.script = [503, 503]
    first = _ago(hours=2)  # POLICY.max_age is 1 h
    before = dt.datetime.now(dt.UTC)
    await setup.deliver({parking.ATTEMPTS: 9, parking.FIRST_FAILURE: first, parking.PARKED: 3,
                         parking.LAST_ERROR: "HTTP 503"})
    assert await setup.depths() == {"1": 0, "2": 0, "4": 0, "dlq": 1}
    headers = await setup.only(setup.names.dead_letter)
    assert headers["x-mw-stage"] == "deliver" and headers["x-mw-connector"] == CONNECTOR
    assert headers["x-mw-attempts"] == 11 and headers["x-mw-first-failure"] == first
    assert dt.datetime.fromisoformat(headers["x-mw-last-failure"]) >= before.replace(microsecond=0)
    assert "HTTP 503" in headers["x-mw-error"] and "retry.max_age 1h" in headers["x-mw-error"]
    assert parking.LAST_ERROR not in headers and parking.PARKED not in headers  # the dead letter's own say


async def test_max_age_forever_keeps_parking(setup: Setup) -> None:
    forever = dataclasses.replace(POLICY, max_age=None)
    setup.worker = DeliveryWorker(setup.route, setup.worker.connector, setup.broker, setup.metrics, retry=forever)
    setup.sink.script = [503, 503]
    await setup.deliver({parking.FIRST_FAILURE: _ago(days=400), parking.PARKED: 50})
    assert await setup.depths() == {"1": 0, "2": 0, "4": 1, "dlq": 0}


async def test_a_non_retryable_outcome_dead_letters_at_once(setup: Setup) -> None:
    setup.sink.script = [400]
    await setup.deliver()
    assert len(setup.sink.requests) == 1
    assert await setup.depths() == {"1": 0, "2": 0, "4": 0, "dlq": 1}
    headers = await setup.only(setup.names.dead_letter)
    assert headers["x-mw-attempts"] == 1 and "HTTP 400" in headers["x-mw-error"]
    first, last = (dt.datetime.fromisoformat(headers[f"x-mw-{h}-failure"]) for h in ("first", "last"))
    assert dt.timedelta(0) <= last - first < dt.timedelta(seconds=1)  # one failure: both its time


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_a_retry_after_longer_than_backoff_max_parks_at_a_tier_that_long_without_sleeping(
        setup: Setup, form: str) -> None:
    wait = format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4), usegmt=True) if form == "http-date" \
        else "3"
    setup.sink.script = [503]
    setup.sink.reply_headers = {"Retry-After": wait}
    started = time.monotonic()
    await setup.deliver()
    assert time.monotonic() - started < 1.0  # no sleeping in process for what the sink asked
    assert len(setup.sink.requests) == 1
    assert await setup.depths() == {"1": 0, "2": 0, "4": 1, "dlq": 0}  # the first tier >= 3 s


async def test_while_the_breaker_is_open_a_delivery_is_parked_unsent(setup: Setup) -> None:
    breaker = CircuitBreaker(CONNECTOR, BreakerPolicy(failures=1))
    breaker.record(DeliveryError("down", retryable=True))
    setup.worker.breaker = breaker
    await setup.deliver({parking.ATTEMPTS: 3, parking.LAST_ERROR: f"{CONNECTOR}: HTTP 503"})
    assert setup.sink.requests == []
    headers = await setup.only(setup.names.delay(CONNECTOR, 1))
    assert headers[parking.ATTEMPTS] == 3  # nothing was sent
    assert "circuit breaker is open" in headers[parking.LAST_ERROR] and "HTTP 503" in headers[parking.LAST_ERROR]


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = dt.datetime(2026, 11, 25, 12, 0, 0, tzinfo=dt.UTC)
    assert _retry_after("120", now) == 120.0
    assert _retry_after("Wed, 25 Nov 2026 12:05:00 GMT", now) == 300.0
    assert _retry_after("Wed, 25 Nov 2026 11:00:00 GMT", now) == 0.0  # in the past: no wait
    assert _retry_after("soon", now) is None and _retry_after(None, now) is None


def test_the_tier_is_the_parked_count_or_at_least_retry_after() -> None:
    assert [parking.tier((5, 30, 300), n) for n in range(5)] == [5, 30, 300, 300, 300]
    assert parking.tier((5, 30, 300), 0, retry_after=20) == 30
    assert parking.tier((5, 30, 300), 0, retry_after=3600) == 300  # no tier that long: the longest
    assert parking.tier((5, 30, 300), 2, retry_after=1) == 300


def test_history_ignores_unreadable_headers() -> None:
    history = parking.History.of({parking.ATTEMPTS: "x", parking.FIRST_FAILURE: "yesterday", parking.PARKED: b"2"})
    assert history == parking.History(0, None, 2, None)


async def test_a_hanging_sink_is_parked_after_its_timeouts_not_dead_lettered(setup: Setup) -> None:
    spec = ConnectorSpec(CONNECTOR, "http", {"url": setup.sink.url, "timeout": 0.2}, POLICY)
    hanging = make_connector(spec)
    setup.worker = DeliveryWorker(setup.route, hanging, setup.broker, setup.metrics, retry=POLICY)
    setup.sink.delay = 1.0
    try:
        await setup.deliver()
    finally:
        await hanging.close()
    assert await setup.depths() == {"1": 1, "2": 0, "4": 0, "dlq": 0}
    assert "timed out" in (await setup.only(setup.names.delay(CONNECTOR, 1)))[parking.LAST_ERROR]


async def test_a_refused_connection_is_parked_not_dead_lettered(setup: Setup) -> None:
    port = setup.sink.url.split(":")[2].split("/")[0]
    assert setup.sink.runner is not None
    await setup.sink.runner.cleanup()  # nothing listens there any more: connection refused
    refused = make_connector(ConnectorSpec(CONNECTOR, "http", {"url": f"http://127.0.0.1:{port}/events"}, POLICY))
    setup.worker = DeliveryWorker(setup.route, refused, setup.broker, setup.metrics, retry=POLICY)
    try:
        await setup.deliver()
    finally:
        await refused.close()
        await setup.sink.start()  # the fixture cleans it up
    assert await setup.depths() == {"1": 1, "2": 0, "4": 0, "dlq": 0}
    headers = await setup.only(setup.names.delay(CONNECTOR, 1))
    assert headers[parking.ATTEMPTS] == 2 and "ClientConnectorError" in headers[parking.LAST_ERROR]
