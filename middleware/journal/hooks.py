"""What the workers and the publisher call at each hop: one journal record plus the age, last-received
and SLA metrics, so each hook in the I/O shell is one line.

Two headers carry times between hops (Unix seconds): ``x-mw-received-at``, set by the publisher when
a message enters the middleware and copied onto its events by the route worker (a dead letter keeps
it, so a replay's age still counts from the first receipt), and ``x-mw-event-time``, the event's
business time (CloudEvents ``time``), set by the route worker. They are written as decimal text
(:func:`stamp`): an AMQP client encodes a Python float as a 32-bit float (pamqp: field type ``f``),
which holds today's Unix time only to 128 s; numbers are still read (older messages).
"""

from __future__ import annotations

import datetime as dt
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from middleware import tracecontext
from middleware.journal.records import (
    DEAD_LETTERED,
    DELIVER,
    DELIVERED,
    FILTERED,
    PARKED,
    RETRY,
    ROUTE,
    ROUTED,
)

RECEIVED_AT_HEADER = "x-mw-received-at"
EVENT_TIME_HEADER = "x-mw-event-time"
INGEST_HEADER = "x-mw-ingest"
MAX_SOURCE_LABELS = 64
"""Distinct ``source`` label values of ``middleware_source_last_received_timestamp_seconds`` per process.
The header is ours (``publish``, ``mllp:<listener>``, ``http:<listener>``...), but any AMQP client may
set it: past this many values, new ones are counted as ``other`` (a label set per value never shrinks)."""
OTHER_SOURCE = "other"
_source_labels: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _seconds(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str | bytes):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def stamp(seconds: float) -> str:
    """A time header's value: Unix seconds as text, to the microsecond (read back by :func:`received_at`)."""
    return f"{seconds:.6f}"


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def event_seconds(event: dict[str, Any]) -> float | None:
    """An event's ``time`` as Unix seconds (None when absent or not a date-time)."""
    try:
        return dt.datetime.fromisoformat(str(event["time"])).timestamp()
    except (KeyError, ValueError, TypeError):
        return None


def received_at(headers: dict[str, Any]) -> float | None:
    """When the message entered the middleware, from its ``x-mw-received-at`` header."""
    return _seconds(headers.get(RECEIVED_AT_HEADER))


@dataclass(frozen=True)
class Arrival:
    """A message as its route worker took it: when it came in, and its trace context."""

    received_at: float
    trace_id: str  # the inbound message's trace (its traceparent's), or a new one when it brought none
    trace_flags: str = "01"


def event_headers(event: dict[str, Any], arrival: Arrival | None) -> dict[str, Any]:
    """The headers an event is published with: when its message came in, its business time, and a
    ``traceparent`` in its message's trace (a new span per event)."""
    headers: dict[str, Any] = {}
    occurred = event_seconds(event) if "time" in event else None
    if occurred is not None:
        headers[EVENT_TIME_HEADER] = stamp(occurred)
    if arrival is not None:
        headers[RECEIVED_AT_HEADER] = stamp(arrival.received_at)
        headers[tracecontext.TRACEPARENT] = tracecontext.span_of(arrival.trace_id, arrival.trace_flags)
    return headers


def next_traceparent(headers: Mapping[str, Any]) -> str:
    """The traceparent for the next hop of a message with these headers (its trace, a new span)."""
    return tracecontext.child(headers.get(tracecontext.TRACEPARENT))


# -- route worker ---------------------------------------------------------------------------------


def route_received(worker: Any, message: Any) -> Arrival:
    """A message reached its route worker: last-received gauges (route, source) and its age since it
    came in; returns when it came in (now if no publisher stamped it) and its trace context (kept from
    a ``traceparent`` header, which HTTP ingest and AMQP publishers may set, else new)."""
    now = time.time()
    name = worker.route.name
    came_in = received_at(message.headers) or now
    metrics = worker.metrics
    metrics.last_received.labels(name).set(now)
    source = _text(message.headers.get(INGEST_HEADER))
    if source:
        metrics.source_last_received.labels(source_label(metrics, source)).set(now)
    metrics.route_age.labels(name).observe(max(0.0, now - came_in))
    trace = tracecontext.parse(message.headers.get(tracecontext.TRACEPARENT))
    return Arrival(came_in, trace[0], trace[2]) if trace else Arrival(came_in, tracecontext.new_trace_id())


def source_label(metrics: Any, source: str) -> str:
    """``source`` as a label value of these ``metrics``: itself among the first :data:`MAX_SOURCE_LABELS`
    distinct ones, then :data:`OTHER_SOURCE`."""
    seen = _source_labels.setdefault(metrics, set())
    if source in seen:
        return source
    if len(seen) >= MAX_SOURCE_LABELS:
        return OTHER_SOURCE
    seen.add(source)
    return source


def route_finished(worker: Any, message: Any, outcome: Any, arrival: Arrival) -> None:
    """Routed (one record per event, with its id and type) or filtered."""
    name, journal = worker.route.name, worker.journal
    common = {"correlation_id": outcome.correlation_id, "message_id": message.message_id,
              "source_id": outcome.source_id, "received_at": arrival.received_at,
              "source": _text(message.headers.get(INGEST_HEADER))}
    if outcome.filtered:
        journal.record(name, ROUTE, FILTERED, **common)
        return
    now = time.time()
    ages = worker.metrics.route_event_age.labels(name)
    for event in outcome.events:
        occurred = event_seconds(event)
        if occurred is not None:
            ages.observe(max(0.0, now - occurred))
        journal.record(name, ROUTE, ROUTED, event_id=event.get("id"), event_type=event.get("type"),
                       event_time=occurred, at=now, **common)


def route_dead_lettered(worker: Any, message: Any, error: Exception, stage: str, correlation_id: str | None) -> None:
    worker.journal.record(worker.route.name, ROUTE, DEAD_LETTERED, correlation_id=correlation_id,
                          message_id=message.message_id, error_class=type(error).__name__, detail=stage,
                          received_at=received_at(message.headers),
                          source=_text(message.headers.get(INGEST_HEADER)))


# -- delivery worker ------------------------------------------------------------------------------


def _delivery_fields(worker: Any, delivery: Any) -> dict[str, Any]:
    return {"correlation_id": delivery.correlation_id or None, "event_id": delivery.event_id or None,
            "event_type": delivery.event_type or None, "connector": worker.connector.name}


def delivery_retry(worker: Any, delivery: Any, attempt: int, error: Any) -> None:
    status = getattr(error, "status", None)
    worker.journal.record(worker.route.name, DELIVER, RETRY, attempt=attempt, error_class=type(error).__name__,
                          detail=str(status) if status else None, **_delivery_fields(worker, delivery))


def delivery_parked(worker: Any, delivery: Any, error: Exception, attempts: int, seconds: float) -> None:
    """Parked on the broker for ``seconds`` (a delay queue) after a retryable failure or an open breaker."""
    worker.journal.record(worker.route.name, DELIVER, PARKED, attempt=attempts, error_class=type(error).__name__,
                          detail=f"{seconds:g}s", **_delivery_fields(worker, delivery))


def delivered(worker: Any, message: Any, delivery: Any, attempts: int) -> None:
    """An event accepted by its sink: the record, its ages at delivery, the deliver_within check."""
    now = time.time()
    route, connector = worker.route.name, worker.connector.name
    came_in = received_at(message.headers)
    occurred = _seconds(message.headers.get(EVENT_TIME_HEADER))
    worker.journal.record(route, DELIVER, DELIVERED, attempt=attempts, at=now, received_at=came_in,
                          event_time=occurred, **_delivery_fields(worker, delivery))
    metrics = worker.metrics
    if occurred is not None:
        metrics.delivery_event_age.labels(route, connector).observe(max(0.0, now - occurred))
    if came_in is not None:
        age = max(0.0, now - came_in)
        metrics.delivery_age.labels(route, connector).observe(age)
        sla = worker.route.sla
        if sla is not None and sla.deliver_within is not None and age > sla.deliver_within:
            metrics.sla_deliver_breaches.labels(route, connector).inc()


def delivery_dead_lettered(worker: Any, message: Any, delivery: Any, error: Exception, attempts: int) -> None:
    status = getattr(error, "status", None)
    worker.journal.record(worker.route.name, DELIVER, DEAD_LETTERED, attempt=attempts,
                          error_class=type(error).__name__, detail=str(status) if status else None,
                          received_at=received_at(message.headers), **_delivery_fields(worker, delivery))


def publishers_of(gateway: Any) -> list[Any]:
    """A gateway's publishers: gateways keep theirs as ``publisher`` or ``publishers`` (a mapping)."""
    found: list[Any] = list(getattr(gateway, "publishers", {}).values())
    if getattr(gateway, "publisher", None) is not None:
        found.append(gateway.publisher)
    return found


def attach(gateway: Any, journal: Any) -> None:
    """Give a gateway's publishers the engine's journal; a gateway with none records nothing at ingest."""
    for publisher in publishers_of(gateway):
        publisher.journal = journal
