"""Benchmark: CPU cost per message of OpenTelemetry tracing (middleware/tracing.py), off and on.

Rows (µs of this process's CPU per message, the median of ``--repeat`` alternating passes):
  - hooks: the tracing calls one ADT^A01 message makes on its way (ingest span, route span with its
    transform and publish children, one deliver span per connector: 2), alone; off is the null span,
    on is the SDK with a no-op exporter (spans are made, ended and handed to the processor);
  - pipeline: the route worker and the delivery workers (case-management, bed-board) on the same
    messages with an in-process stand-in broker (publishes collected, acks free) and a connector that
    accepts at once, so the figure is the engine's own CPU: off (the default) vs on.
No RabbitMQ: the broker's cost is the same either way and would only add noise here.

Run: .venv/bin/python bench/tracing.py [--messages 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mllp import make_messages  # noqa: E402

from middleware.broker.base import Broker, IncomingMessage, OutgoingMessage  # noqa: E402
from middleware.delivery.base import Connector, Delivery  # noqa: E402
from middleware.observe import Metrics  # noqa: E402
from middleware.project import load_project  # noqa: E402
from middleware.tracecontext import new as new_trace  # noqa: E402
from middleware.tracing import NULL_TRACING, Tracing, TracingSettings, open_tracing  # noqa: E402
from middleware.workers import DeliveryWorker, RouteWorker  # noqa: E402

ROUTE = "adt-inbound"


class Message(IncomingMessage):
    """A consumed message whose ack costs nothing."""

    def __init__(self, out: OutgoingMessage) -> None:
        self.body, self.headers = out.body, dict(out.headers)
        self.correlation_id, self.message_id, self.content_type = out.correlation_id, out.message_id, out.content_type
        self.redelivered, self.delivery_count, self.settled = False, 0, False

    async def ack(self) -> None:
        self.settled = True


class CollectingBroker(Broker):
    """Keeps what is published, confirms at once."""

    url = "bench://"

    def __init__(self) -> None:
        self.published: list[OutgoingMessage] = []

    async def publish(self, message: OutgoingMessage, *, exchange: str = "", routing_key: str = "",
                      queue: str | None = None, mandatory: bool = False) -> None:
        self.published.append(message)


class Accepting(Connector):
    async def send(self, delivery: Delivery) -> None:
        return None


def hooks(tracing: Tracing, count: int) -> None:
    """The tracing calls of ``count`` messages (what publisher and workers call, in order)."""
    parent = new_trace()
    for n in range(count):
        ingest = tracing.start("ingest", parent, "producer", route=ROUTE, source="mllp:ehr-adt",
                               correlation_id="c", message_id=str(n))
        ingest.end("published")
        route = tracing.start("route", ingest.traceparent or parent, route=ROUTE, correlation_id="c", message_id="m")
        step = route.child("transform")
        step.end("mapped", events=1, message_type="ADT^A01")
        publish = route.child("publish", "producer", event_type="patient.admitted.v1", event_id="e")
        publish.end("published")
        route.end("routed", correlation_id="c", events=1)
        for connector in ("case-management", "bed-board"):
            span = tracing.start("deliver", publish.traceparent or parent, route=ROUTE, connector=connector,
                                 event_id="e", correlation_id="c", probe=None)
            span.end("delivered", attempts=1)


def make_workers(tracing: Tracing) -> tuple[RouteWorker, list[DeliveryWorker], CollectingBroker]:
    env = {**os.environ, "HTTP_INGEST_TOKEN": "t", "CASE_MANAGEMENT_URL": "http://127.0.0.1:9/",
           "CDR_URL": "http://127.0.0.1:9/", "MIDDLEWARE_JOURNAL_URL": ""}
    project = load_project(REPO, env)
    route = project.routes[ROUTE]
    broker, metrics = CollectingBroker(), Metrics()
    router = RouteWorker(route, broker, metrics)
    router.tracing = tracing
    deliverers = []
    for rule in route.deliver:
        worker = DeliveryWorker(route, Accepting(project.connectors[rule.connector]), broker, metrics)
        worker.tracing = tracing
        deliverers.append(worker)
    return router, deliverers, broker


def pipeline(tracing: Tracing, raws: Sequence[bytes]) -> float:
    """CPU µs per message of the workers (built beforehand, not timed) handling ``raws``."""
    workers = make_workers(tracing)
    started = time.process_time()
    asyncio.run(handle(workers, raws))
    return (time.process_time() - started) / len(raws) * 1e6


async def handle(workers: tuple[RouteWorker, list[DeliveryWorker], CollectingBroker], raws: Sequence[bytes]) -> None:
    router, deliverers, broker = workers
    for n, raw in enumerate(raws):
        headers = {"x-mw-ingest": "mllp:ehr-adt", "x-mw-received-at": f"{time.time():.6f}", "traceparent": new_trace()}
        await router.handle(Message(OutgoingMessage(body=raw, headers=headers, correlation_id=f"c{n}",
                                                    message_id=f"m{n}")))
        events, broker.published = broker.published, []
        for event in events:
            for worker in deliverers:
                await worker.handle(Message(event))
    for worker in deliverers:  # measured what it should: every event delivered, none dead-lettered
        labels = {"route": ROUTE, "connector": worker.connector.name}
        assert worker.metrics.registry.get_sample_value("middleware_events_delivered_total", labels) == len(raws)


def cpu_us(run: Callable[[], Any], count: int) -> float:
    started = time.process_time()
    run()
    return (time.process_time() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    on = open_tracing(TracingSettings(), Discard())
    raws = make_messages(args.messages)
    modes: dict[str, Tracing] = {"off": NULL_TRACING, "on": on}
    rows: dict[str, list[float]] = {f"{what} {mode}": [] for what in ("hooks", "pipeline") for mode in modes}
    pipeline(NULL_TRACING, raws[:200])  # warm up: imports, compiled maps
    pipeline(on, raws[:200])
    for _ in range(args.repeat):
        for mode, tracing in modes.items():
            rows[f"hooks {mode}"].append(cpu_us(lambda t=tracing: hooks(t, args.messages), args.messages))
            rows[f"pipeline {mode}"].append(pipeline(tracing, raws))
    on.shutdown()
    print(f"CPU µs per ADT^A01 message (1 event, 2 deliveries), median of {args.repeat}, {args.messages} messages")
    for name, values in rows.items():
        print(f"  {name:<13} {statistics.median(values):9.1f}   (min {min(values):.1f}, max {max(values):.1f})")
    off, on_ = statistics.median(rows["pipeline off"]), statistics.median(rows["pipeline on"])
    print(f"  tracing on adds {on_ - off:.1f} µs/message to the pipeline ({on_ / off:.2f}x); "
          f"off, the hooks cost {statistics.median(rows['hooks off']):.2f} µs/message")


if __name__ == "__main__":
    main()
