"""The delivery worker with a deliver entry's when: / map: on the in-memory broker: a skipped event is acked
and counted without a request, a mapped one reaches the real local sink as application/json, and one whose
map fails is dead-lettered as published (stage deliver, MappingError)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from middleware.broker import make_broker
from middleware.broker.base import Broker, OutgoingMessage
from middleware.deadletter import DeadLetter
from middleware.delivery import ConnectorSpec, RetryPolicy, make_connector
from middleware.delivery.outbound import Outbound, compile_map, compile_when
from middleware.observe import Metrics
from middleware.project import load_project
from middleware.route import DeliveryRule, Route
from middleware.workers import DeliveryWorker

from ..conftest import Sink

REPO = Path(__file__).resolve().parents[2]
EVENT: dict[str, Any] = {"specversion": "1.0", "id": "e-1", "type": "patient.admitted.v1", "correlationid": "c-1",
                         "data": {"patient": {"mrn": "MRN-1"}, "encounter": {"location": {"bed": "B"}}}}


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    memory = make_broker("memory://")
    await memory.connect()
    await memory.declare_queue("adt-inbound.dlq", kind="dead-letter")
    await memory.declare_queue("adt-inbound.to.case-management", kind="work", dead_letter_to="adt-inbound.dlq")
    yield memory
    await memory.close()


async def deliver(broker: Broker, sink: Sink, outbound: Outbound, event: dict[str, Any]) -> Metrics:
    shipped = load_project(REPO, {}, offline=True).routes["adt-inbound"]
    route = Route(shipped.name, shipped.source_queue, shipped.format, shipped.events,
                  deliver=(DeliveryRule("case-management", outbound=outbound),))
    connector = make_connector(ConnectorSpec("case-management", "http", {"url": sink.url}, RetryPolicy(attempts=1)))
    metrics = Metrics()
    worker = DeliveryWorker(route, connector, broker, metrics)
    await broker.publish(OutgoingMessage(orjson.dumps(event), {"x-mw-event-type": event["type"]}, "c-1", event["id"],
                                         "application/cloudevents+json"), queue=worker.queue)
    message = await broker.get(worker.queue)
    assert message is not None
    try:
        await worker.handle(message)
    finally:
        await connector.close()
    assert message.settled and await broker.get(worker.queue) is None
    return metrics


async def test_an_event_when_does_not_take_is_acked_and_counted_without_a_request(broker: Broker, sink: Sink) -> None:
    metrics = await deliver(broker, sink, Outbound(when=compile_when({"type": "patient.discharged"})), EVENT)
    assert sink.requests == [] and await broker.get("adt-inbound.dlq") is None
    assert metrics.value("middleware_deliveries_skipped", route="adt-inbound", connector="case-management") == 1


async def test_a_mapped_event_is_sent_as_json_with_the_event_ids(broker: Broker, sink: Sink) -> None:
    outbound = Outbound(when=compile_when({"type": "patient.admitted", "exists": "data.encounter.location.bed"}),
                        map=compile_map({"mrn": "data.patient.mrn", "bed": "data.encounter.location.bed"}))
    metrics = await deliver(broker, sink, outbound, EVENT)
    [(headers, body)] = sink.requests
    assert orjson.loads(body) == {"mrn": "MRN-1", "bed": "B"}
    assert (headers["Content-Type"], headers["Idempotency-Key"], headers["X-Correlation-ID"]) == \
        ("application/json", "e-1", "c-1")
    assert metrics.value("middleware_events_delivered", route="adt-inbound", connector="case-management") == 1


async def test_a_failing_map_dead_letters_the_event_as_published(broker: Broker, sink: Sink) -> None:
    outbound = Outbound(map=compile_map({"room": {"path": "data.encounter.location.room", "required": True}}))
    await deliver(broker, sink, outbound, EVENT)
    message = await broker.get("adt-inbound.dlq")
    assert message is not None and sink.requests == []
    letter = DeadLetter.from_message(message)
    assert (letter.stage, letter.connector, letter.error_class) == ("deliver", "case-management", "MappingError")
    assert "room: required value missing" in letter.error and orjson.loads(letter.body) == EVENT
