"""The delivery worker's journal records on its failure path (a real local sink, the embedded broker):
each failed attempt a retry, then parked on the broker with its delay; the traceparent it sends."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from middleware import topology, tracecontext
from middleware.broker import make_broker
from middleware.broker.base import OutgoingMessage
from middleware.delivery.base import ConnectorSpec, RetryPolicy, make_connector
from middleware.journal import Journal, JournalSettings, trace
from middleware.observe import Metrics
from middleware.project import load_project
from middleware.route import DeliveryRule
from middleware.topology import RouteTopology
from middleware.workers import DeliveryWorker
from tests.conftest import Sink

REPO = Path(__file__).resolve().parents[2]
POLICY = RetryPolicy(attempts=2, initial=0.01, max=0.05, jitter=0.0, delays=(1, 2, 4), max_age=3600.0)
GIVEN = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def worker(sink: Sink, tmp_path: Path) -> AsyncIterator[DeliveryWorker]:
    project = load_project(REPO, {"HTTP_INGEST_TOKEN": "t"})
    route = dataclasses.replace(project.routes["adt-inbound"], deliver=(DeliveryRule("case-management", POLICY),))
    broker = make_broker("memory://")
    await broker.connect()
    await topology.declare(broker, RouteTopology.of(route), delivery_limit=5)
    spec = ConnectorSpec("case-management", "http", {"url": sink.url, "timeout": 2}, POLICY)
    made = DeliveryWorker(route, make_connector(spec), broker, Metrics(), retry=POLICY)
    made.journal = Journal(JournalSettings(url=f"sqlite:///{tmp_path / 'journal.db'}"))
    await made.journal.start()
    yield made
    await made.journal.stop()
    await made.connector.close()
    for queue in RouteTopology.of(route).queues:
        await broker.delete_queue(queue)
    await broker.close()


async def test_retries_and_parking_are_journaled_and_the_sink_gets_the_trace(worker: DeliveryWorker,
                                                                            sink: Sink) -> None:
    sink.script = [503, 503]
    headers = {"x-mw-route": "adt-inbound", "x-mw-event-type": "patient.admitted.v1",
               "x-mw-received-at": time.time() - 1, "traceparent": GIVEN}
    await worker.broker.publish(OutgoingMessage(b'{"id": "evt-9"}', headers, "corr-9", "evt-9",
                                                "application/cloudevents+json"), queue=worker.queue)
    message = await worker.broker.get(worker.queue)
    assert message is not None
    await worker.handle(message)
    await worker.journal.flush()  # type: ignore[attr-defined]
    [path] = trace(worker.journal.store, "evt-9")  # type: ignore[attr-defined]
    assert [(h.outcome, h.detail) for h in path.hops] == [("retry", "503"), ("parked", "1s")]
    [delivery] = path.events[0].deliveries
    assert (delivery.outcome, delivery.retries, delivery.parked, delivery.attempts) == ("pending", 1, 1, 2)
    sent = [h["traceparent"] for h, _ in sink.requests]
    assert all(tracecontext.trace_id(t) == tracecontext.trace_id(GIVEN) for t in sent) and GIVEN not in sent
