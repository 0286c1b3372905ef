"""Route and delivery workers: thin async shells around the pure pipeline and the connectors.

Acks follow DESIGN.md promise 1: an inbound message is acked only after every event it produced
was confirmed by the broker, or after it was confirmed into the dead-letter queue; a delivery
message only after the sink accepted it or it was confirmed into the dead-letter queue. If the
broker fails mid-way the message is not acked and comes back (at-least-once).

Every dead letter has a reason (DESIGN promise 7): on a message's last allowed delivery (RabbitMQ
dead-letters a message returned with ``x-delivery-count`` = ``delivery_limit``), a failure that
would give it back dead-letters it here instead, with stage, error and attempts. A stopping engine
(:class:`EngineStopping`, a cancelled handler) is never such a failure, nor is a broker that cannot take
a publish for a while (:class:`BrokerUnavailable`: a lost connection, a cluster node down, a queue
electing a leader, after the adapter's own retries): the consumer hands such a message back without
counting a delivery (an ordered route's inbound message goes back to the head of its queue instead,
counted, except on its last allowed delivery), so a broker outage never dead-letters work.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import replace
from zoneinfo import ZoneInfo

import orjson

from middleware.broker import naming
from middleware.broker.base import Broker, IncomingMessage, OutgoingMessage
from middleware.deadletter import dead_letter
from middleware.delivery import parking
from middleware.delivery.base import Connector, Delivery, RetryPolicy
from middleware.delivery.breaker import CircuitBreaker
from middleware.delivery.retry import send_with_retry
from middleware.errors import (
    BrokerError,
    BrokerUnavailable,
    DeliveryError,
    EngineStopping,
    MappingError,
    MiddlewareError,
    PipelineError,
)
from middleware.journal import NULL_JOURNAL, NullJournal
from middleware.journal import hooks as journal_hooks
from middleware.observe import Metrics
from middleware.ordering import order_headers
from middleware.route import MessageContext, Route, transform
from middleware.tracecontext import TRACEPARENT
from middleware.tracing import NULL_SPAN, NULL_TRACING, Span, Tracing

log = logging.getLogger("middleware.worker")


def _header_text(value: object) -> str | None:
    """A header value as text (AMQP headers may arrive as bytes or numbers); None when absent."""
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

EVENT_CONTENT_TYPE = "application/cloudevents+json"


def is_last_delivery(message: IncomingMessage, delivery_limit: int) -> bool:
    """True if giving ``message`` back now would make the broker dead-letter it: RabbitMQ delivers
    with ``x-delivery-count`` 0, 1, … ``delivery_limit`` and dead-letters the next return."""
    return message.delivery_count >= delivery_limit


class RouteWorker:
    """Consumes a route's inbound queue: parse -> filter -> map -> validate -> publish events -> ack."""

    journal: NullJournal = NULL_JOURNAL  # the engine gives its own (middleware.journal)
    tracing: Tracing = NULL_TRACING  # spans per hop when on (middleware.tracing)

    def __init__(self, route: Route, broker: Broker, metrics: Metrics, *, prefix: str = "",
                 tz: ZoneInfo | None = None, delivery_limit: int = 10) -> None:
        self.route = route
        self.broker = broker
        self.metrics = metrics
        self.tz = tz or ZoneInfo("UTC")
        self.delivery_limit = delivery_limit
        self.queue = naming.inbound_queue(route.source_queue, prefix)
        self.dead_letter_queue = naming.dead_letter_queue(route.name, prefix)
        self.exchange = naming.events_exchange(prefix)
        self.ordered = any(rule.ordering for rule in route.deliver)  # keep events in order (middleware.ordering)

    async def handle(self, message: IncomingMessage) -> None:
        """Process one inbound message; raises only if the broker failed (message is then redelivered),
        except on its last allowed delivery, where it is dead-lettered with stage ``parse`` (the
        route worker never finished with it) and the error."""
        try:
            await self._route(message)
        except EngineStopping:
            raise
        except BrokerUnavailable:  # not the message's fault: never counted toward a dead letter
            if self.ordered and not message.settled and not is_last_delivery(message, self.delivery_limit):
                await message.reject(requeue=True)  # to the head of its queue: per-key order first
                return
            raise  # the consumer hands it back uncounted (middleware.broker.amqp)
        except Exception as exc:
            if message.settled or not is_last_delivery(message, self.delivery_limit):
                raise
            log.warning("failed on its last allowed delivery", extra={
                "route": self.route.name, "correlation_id": message.correlation_id,
                "error_class": type(exc).__name__, "deliveries": message.delivery_count + 1})
            await self._dead_letter(message, exc, stage="parse", attempts=message.delivery_count + 1)

    async def _route(self, message: IncomingMessage) -> None:
        span = self.tracing.start("route", message.headers.get(TRACEPARENT), route=self.route.name,
                                  correlation_id=message.correlation_id, message_id=message.message_id)
        try:
            await self._route_traced(message, span)
        except BaseException as exc:
            span.end("failed", exc)
            raise

    async def _route_traced(self, message: IncomingMessage, span: Span) -> None:
        name = self.route.name
        self.metrics.received.labels(name).inc()
        arrival = journal_hooks.route_received(self, message)  # when it came in, its trace context
        header_cid = message.headers.get("X-Correlation-ID") or message.headers.get("x-correlation-id")
        context = MessageContext(
            correlation_id=message.correlation_id,
            header_correlation_id=str(header_cid) if header_cid else None,
            message_id=message.message_id,
            received_at=dt.datetime.fromtimestamp(arrival.received_at, dt.UTC),  # the first receipt, also on replay
            batch_id=_header_text(message.headers.get("x-mw-batch-id")),
            batch_position=_header_text(message.headers.get("x-mw-batch-position")),
        )
        started = time.perf_counter()
        step = span.child("transform")  # parse, filter, map, validate
        try:
            outcome = transform(self.route, message.body, context, self.tz)
        except PipelineError as exc:
            step.end("failed", exc)
            await self._dead_letter(message, exc)
            span.end("dead_lettered", exc)
            return
        finally:
            self.metrics.processing.labels(name).observe(time.perf_counter() - started)
        step.end("filtered" if outcome.filtered else "mapped", events=len(outcome.events),
                 message_type=outcome.message_type)
        if outcome.filtered:
            await message.ack()
            self.metrics.filtered.labels(name).inc()
            journal_hooks.route_finished(self, message, outcome, arrival)
            span.end("filtered", correlation_id=outcome.correlation_id)
            log.info("filtered", extra={"route": name, "correlation_id": outcome.correlation_id,
                                        "message_type": outcome.message_type})
            return
        if self.ordered:  # one at a time: a message's events reach the partitions in their order
            for event in outcome.events:
                await self._publish(event, arrival, span)
        else:
            await asyncio.gather(*(self._publish(event, arrival, span) for event in outcome.events))
        await message.ack()
        for event in outcome.events:
            self.metrics.events.labels(name, event["type"]).inc()
        journal_hooks.route_finished(self, message, outcome, arrival)
        log.info("routed", extra={"route": name, "correlation_id": outcome.correlation_id,
                                  "message_type": outcome.message_type, "events": len(outcome.events),
                                  "event_ids": [e["id"] for e in outcome.events]})
        span.end("routed", correlation_id=outcome.correlation_id, events=len(outcome.events))

    async def _publish(self, event: dict[str, object], arrival: journal_hooks.Arrival | None = None,
                       span: Span = NULL_SPAN) -> None:
        event_type = str(event["type"])
        headers = {"x-mw-route": self.route.name, "x-mw-event-type": event_type,
                   **order_headers(self.route.deliver, event), **journal_hooks.event_headers(event, arrival)}
        step = span.child("publish", "producer", event_type=event_type, event_id=event["id"])
        if step.traceparent:  # the event's hop is a child of its publish span
            headers[TRACEPARENT] = step.traceparent
        try:
            await self._send_event(event, event_type, headers)
        except BaseException as exc:
            step.end("failed", exc)
            raise
        step.end("published")

    async def _send_event(self, event: dict[str, object], event_type: str, headers: dict[str, object]) -> None:
        await self.broker.publish(
            OutgoingMessage(
                body=orjson.dumps(event),
                headers=headers,
                correlation_id=str(event["correlationid"]),
                message_id=str(event["id"]),
                content_type=EVENT_CONTENT_TYPE,
            ),
            exchange=self.exchange,
            routing_key=naming.event_routing_key(self.route.name, event_type),
            mandatory=bool(self.route.deliver),  # a route with deliveries must never lose an event unrouted
        )

    async def _dead_letter(self, message: IncomingMessage, error: Exception, *, stage: str | None = None,
                           attempts: int = 1) -> None:
        stage = stage or getattr(error, "stage", None) or "map"
        correlation_id = getattr(error, "correlation_id", None) or message.correlation_id
        await self.broker.publish(
            dead_letter(message, route=self.route.name, stage=stage, error=error, replay_queue=self.queue,
                        correlation_id=correlation_id, attempts=attempts),
            queue=self.dead_letter_queue,
        )
        await message.ack()
        self.metrics.dead_lettered.labels(self.route.name, stage).inc()
        journal_hooks.route_dead_lettered(self, message, error, stage, correlation_id)
        log.warning("dead-lettered", extra={"route": self.route.name, "stage": stage,
                                            "correlation_id": correlation_id,
                                            "error_class": type(error).__name__})


class DeliveryWorker:
    """Consumes one (route, connector) delivery queue and sends each event with retries."""

    journal: NullJournal = NULL_JOURNAL  # the engine gives its own (middleware.journal)
    tracing: Tracing = NULL_TRACING  # spans per hop when on (middleware.tracing)

    def __init__(self, route: Route, connector: Connector, broker: Broker, metrics: Metrics, *,
                 retry: RetryPolicy | None = None, prefix: str = "", delivery_limit: int = 10) -> None:
        self.route = route
        self.connector = connector
        self.broker = broker
        self.metrics = metrics
        self.retry = retry or connector.spec.retry
        self.delivery_limit = delivery_limit  # deliveries after which a connector bug dead-letters
        self.queue = naming.delivery_queue(route.name, connector.name, prefix)
        self.delay_queues = {s: naming.delay_queue(route.name, connector.name, s, prefix) for s in self.retry.delays}
        self.breaker: CircuitBreaker | None = None  # the engine sets its connector's (middleware.delivery.breaker)
        self.dead_letter_queue = naming.dead_letter_queue(route.name, prefix)
        self.outbound = next((d.outbound for d in route.deliver if d.connector == connector.name), None)

    async def handle(self, message: IncomingMessage) -> None:
        """Deliver one event; ack on success, park it on the broker after a retryable failure (until
        ``retry.max_age``), dead-letter (then ack) on a final failure.

        A broker failure gives the message back, except on its last allowed delivery: then it is
        dead-lettered here with the error (never for a stopping engine)."""
        await self._handle(message, probe=False)

    async def probe(self, message: IncomingMessage) -> bool:
        """Try ``message`` once while the breaker is open (parked again if it fails); True if it went."""
        await self._handle(message, probe=True)
        return self.breaker is None or not self.breaker.is_open

    async def _handle(self, message: IncomingMessage, *, probe: bool) -> None:
        span = self.tracing.start("deliver", message.headers.get(TRACEPARENT), route=self.route.name,
                                  connector=self.connector.name, event_id=message.message_id,
                                  correlation_id=message.correlation_id, probe=probe or None)
        try:
            await self._deliver(message, probe=probe, span=span)
        except (EngineStopping, BrokerUnavailable) as exc:  # the consumer hands it back, uncounted
            span.end("failed", exc)
            raise
        except Exception as exc:
            span.end("failed", exc)
            if message.settled or not is_last_delivery(message, self.delivery_limit):
                raise
            log.warning("failed on its last allowed delivery", extra={
                "route": self.route.name, "connector": self.connector.name, "correlation_id": message.correlation_id,
                "error_class": type(exc).__name__, "deliveries": message.delivery_count + 1})
            delivery = Delivery(body=message.body, event_id=message.message_id or "",
                                correlation_id=message.correlation_id or "", route=self.route.name,
                                event_type=str(message.headers.get("x-mw-event-type", "")))
            await self._dead_letter(message, delivery, exc, None, attempts=message.delivery_count + 1)

    async def _deliver(self, message: IncomingMessage, *, probe: bool = False, span: Span = NULL_SPAN) -> None:
        labels = (self.route.name, self.connector.name)
        correlation_id = message.correlation_id or ""
        delivery = Delivery(
            body=message.body,
            event_id=message.message_id or "",
            correlation_id=correlation_id,
            route=self.route.name,
            event_type=str(message.headers.get("x-mw-event-type", "")),
            traceparent=span.traceparent or journal_hooks.next_traceparent(message.headers),  # a span per delivery
            span=span,
        )
        if self.outbound is not None:  # the deliver entry's when: / map: (middleware.delivery.outbound)
            prepared = await self._prepare(message, delivery)
            if prepared is None:
                return
            delivery = prepared
        history = parking.History.of(message.headers)
        breaker = self.breaker
        if breaker is not None and breaker.is_open and not probe:  # in flight when it opened, or came back
            await self._failed(message, delivery, parking.not_sent(self.connector.name, history.last_error),
                               history, None)
            return
        first_failure: list[str] = []

        def on_retry(attempt: int, error: DeliveryError) -> None:
            if not first_failure:
                first_failure.append(dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"))
            self.metrics.retries.labels(*labels).inc()
            journal_hooks.delivery_retry(self, delivery, attempt, error)
            log.info("delivery retry", extra={"route": labels[0], "connector": labels[1], "attempt": attempt,
                                              "correlation_id": correlation_id, "event_id": delivery.event_id,
                                              "status": error.status})

        started = time.perf_counter()
        try:
            attempts = await send_with_retry(
                self.connector, delivery, replace(self.retry, attempts=1) if probe else self.retry,
                on_retry=on_retry, interrupted=(lambda: breaker.is_open) if breaker and not probe else None,
                on_attempt=breaker.record if breaker else None)
        except DeliveryError as exc:
            await self._failed(message, delivery, exc, history, first_failure[0] if first_failure else None)
            return
        except (BrokerError, EngineStopping):
            raise  # the broker failed mid-way, or we are stopping: the message comes back
        except Exception as exc:  # a connector bug: retried by redelivery, a bounded number of times
            deliveries = message.delivery_count + 1
            log.exception("connector failed", extra={"route": labels[0], "connector": labels[1],
                                                     "correlation_id": correlation_id, "deliveries": deliveries})
            if deliveries < self.delivery_limit:
                raise
            error = DeliveryError(f"{labels[1]}: connector failed with {type(exc).__name__} on each of "
                                  f"{deliveries} deliveries", retryable=False,
                                  hint="a middleware or connector bug: report it, replay the dead letter once fixed")
            error.attempts = deliveries
            await self._dead_letter(message, delivery, error, None)
            return
        finally:
            self.metrics.delivery_seconds.labels(*labels).observe(time.perf_counter() - started)
        await message.ack()
        self.metrics.delivered.labels(*labels).inc()
        journal_hooks.delivered(self, message, delivery, attempts)
        span.end("delivered", attempts=attempts)
        log.info("delivered", extra={"route": labels[0], "connector": labels[1], "correlation_id": correlation_id,
                                     "event_id": delivery.event_id, "attempts": attempts})

    async def _prepare(self, message: IncomingMessage, delivery: Delivery) -> Delivery | None:
        """Apply the deliver entry's ``when`` / ``map``: the delivery to send, or None when the event was
        skipped (acked and counted) or its map failed (dead-lettered)."""
        assert self.outbound is not None
        try:
            prepared = self.outbound.prepare(message.body)
        except MappingError as exc:
            await self._dead_letter(message, delivery, exc, None)
            return None
        if prepared is None:
            await message.ack()
            self.metrics.skipped.labels(self.route.name, self.connector.name).inc()
            delivery.span.end("skipped")
            log.debug("skipped by when", extra={"route": self.route.name, "connector": self.connector.name,
                                                "event_id": delivery.event_id, "event_type": delivery.event_type})
            return None
        body, content_type = prepared
        return replace(delivery, body=body, content_type=content_type or delivery.content_type)

    async def _failed(self, message: IncomingMessage, delivery: Delivery, error: DeliveryError,
                      history: parking.History, first_failure: str | None) -> None:
        """Park a retryable failure on the broker until ``retry.max_age``; dead-letter the others."""
        now = dt.datetime.now(dt.UTC)
        first = history.first_failure or (dt.datetime.fromisoformat(first_failure) if first_failure else now)
        attempts = history.attempts + error.attempts
        if error.retryable and not parking.expired(first, self.retry.max_age, now):
            await self._park(message, delivery, error, history, attempts, first, now)
            return
        if error.retryable:  # retried for max_age: DESIGN promise 5's only retryable dead letter
            error = parking.gave_up(error, first, now, self.retry.max_age)
        await self._dead_letter(message, delivery, error, parking.timestamp(first), attempts=attempts)

    async def _park(self, message: IncomingMessage, delivery: Delivery, error: DeliveryError,
                    history: parking.History, attempts: int, first: dt.datetime, now: dt.datetime) -> None:
        seconds = parking.tier(self.retry.delays, history.parked, error.retry_after)
        copy = parking.parked_message(message, attempts=attempts, first_failure=first, now=now, error=error,
                                      parked=history.parked + 1)
        await parking.park(self.broker, message, self.delay_queues[seconds], copy)
        self.metrics.parked.labels(self.route.name, self.connector.name).inc()
        journal_hooks.delivery_parked(self, delivery, error, attempts, seconds)
        delivery.span.end("parked", error, attempts=attempts, delay_seconds=seconds)
        log.info("parked", extra={"route": self.route.name, "connector": self.connector.name,
                                  "correlation_id": delivery.correlation_id or None, "event_id": delivery.event_id,
                                  "delay_seconds": seconds, "attempts": attempts, "parked": history.parked + 1,
                                  "status": error.status, "error_class": type(error).__name__})

    async def _dead_letter(self, message: IncomingMessage, delivery: Delivery, error: Exception,
                           first_failure: str | None, *, attempts: int | None = None) -> None:
        correlation_id = delivery.correlation_id or None
        if isinstance(error, MiddlewareError):
            error.with_context(route=self.route.name, correlation_id=correlation_id)
        attempts = attempts if attempts is not None else getattr(error, "attempts", 1)
        await self.broker.publish(
            dead_letter(message, route=self.route.name, stage="deliver", error=error, replay_queue=self.queue,
                        correlation_id=correlation_id, connector=self.connector.name,
                        attempts=attempts, first_failure=first_failure),
            queue=self.dead_letter_queue,
        )
        await message.ack()
        self.metrics.dead_lettered.labels(self.route.name, "deliver").inc()
        journal_hooks.delivery_dead_lettered(self, message, delivery, error, attempts)
        delivery.span.end("dead_lettered", error, attempts=attempts)
        log.warning("dead-lettered", extra={"route": self.route.name, "connector": self.connector.name,
                                            "stage": "deliver", "correlation_id": correlation_id,
                                            "event_id": delivery.event_id, "error_class": type(error).__name__,
                                            "status": getattr(error, "status", None), "attempts": attempts})
