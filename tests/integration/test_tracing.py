"""On the real RabbitMQ with tracing on (an in-memory exporter): a message sent to the HTTP gateway
with a caller's traceparent gives one trace, ingest -> route (transform, publish) -> deliver per
connector, each span the child of the previous hop's, and the request the sink receives is a child
of its delivery span. No span carries the message's content."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from middleware.broker.base import Broker
from middleware.engine import Engine
from middleware.ingest.http import HttpGateway
from middleware.project import Project
from middleware.tracing import TracingSettings, open_tracing

from ..conftest import Sink
from .test_journal_trace import TRACEPARENT, adt

pytestmark = pytest.mark.rabbitmq
CALLER_TRACE, CALLER_SPAN = TRACEPARENT.split("-")[1:3]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced_engine(rabbit_project: Project, broker: Broker, exporter: InMemorySpanExporter
                        ) -> AsyncIterator[Engine]:
    running = Engine(rabbit_project, tracing=open_tracing(TracingSettings(), exporter))
    await running.start()
    yield running
    await running.stop()


async def post(engine: Engine, body: bytes) -> None:
    gateway = next(g for g in engine.gateways if isinstance(g, HttpGateway))
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{gateway.port}/v1/routes/adt-inbound/messages", data=body,
            headers={"Content-Type": "x-application/hl7-v2+er7", "traceparent": TRACEPARENT,
                     "Authorization": "Bearer integration-test-token"}) as response:
        assert response.status == 202, await response.text()


def ids(span: ReadableSpan) -> tuple[str, str, str | None]:
    """(trace id, span id, parent span id) in hex."""
    ctx = span.get_span_context()
    parent = f"{span.parent.span_id:016x}" if span.parent else None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", parent


async def spans_when(exporter: InMemorySpanExporter, names: set[str]) -> dict[str, ReadableSpan]:
    """The finished spans by name once every one of ``names`` is there."""
    for _ in range(200):
        found = {span.name: span for span in exporter.get_finished_spans()}
        if names <= set(found):
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"spans: {sorted(found)}; wanted {sorted(names)}")


async def test_one_trace_from_the_caller_through_every_hop_to_the_sink(
        traced_engine: Engine, sink: Sink, exporter: InMemorySpanExporter) -> None:
    await post(traced_engine, adt(f"OTL{uuid.uuid4().hex[:10]}"))
    await sink.wait_for(1)
    spans = await spans_when(exporter, {"ingest adt-inbound", "route adt-inbound", "transform",
                                              "deliver case-management", "deliver bed-board"})
    [publish] = [s for name, s in spans.items() if name.startswith("publish ")]
    chain = [spans["ingest adt-inbound"], spans["route adt-inbound"], publish, spans["deliver case-management"]]
    assert {ids(s)[0] for s in spans.values()} == {CALLER_TRACE}  # one trace: the caller's
    assert ids(chain[0])[2] == CALLER_SPAN  # the ingest span is the caller's span's child
    for parent, child in itertools.pairwise(chain):
        assert ids(child)[2] == ids(parent)[1], f"{child.name} is not a child of {parent.name}"
    assert ids(spans["transform"])[2] == ids(spans["route adt-inbound"])[1]
    assert ids(spans["deliver bed-board"])[2] == ids(publish)[1]

    [(headers, _)] = sink.requests
    sent = headers["traceparent"].split("-")
    assert sent[1] == CALLER_TRACE and sent[2] == ids(spans["deliver case-management"])[1]

    deliver: dict[str, Any] = dict(spans["deliver case-management"].attributes or {})
    assert deliver["mw.outcome"] == "delivered" and deliver["mw.attempts"] == 1
    assert deliver["mw.connector"] == "case-management" and deliver["mw.route"] == "adt-inbound"
    assert spans["route adt-inbound"].attributes["mw.outcome"] == "routed"  # type: ignore[index]
    values = " ".join(str(v) for s in spans.values() for v in (s.attributes or {}).values())
    assert "DOE" not in values and "4711" not in values  # ids and outcomes only, never the patient


async def test_a_dead_lettered_message_ends_its_spans_with_the_stage_and_error_class(
        traced_engine: Engine, sink: Sink, exporter: InMemorySpanExporter) -> None:
    no_pid = b"MSH|^~\\&|EHR|GHH|ADT|GHH|20260101120000||ADT^A01|X1|P|2.5\rEVN|A01|20260101120000\rPV1|1|I\r"
    await post(traced_engine, no_pid)  # the map needs PID-3
    spans = await spans_when(exporter, {"route adt-inbound", "transform"})
    route = dict(spans["route adt-inbound"].attributes or {})
    assert route["mw.outcome"] == "dead_lettered" and route["mw.stage"] == "map"
    assert route["mw.error_class"] == "MappingError"
    assert not spans["transform"].status.is_ok
    assert ids(spans["route adt-inbound"])[0] == CALLER_TRACE
