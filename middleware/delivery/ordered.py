"""The delivery worker of one partition of an ordered delivery (``ordering:`` on a deliver entry).

Each partition queue has one active consumer across every engine (single-active-consumer) and
this worker takes one message at a time (prefetch 1), so the events of one key reach the sink in
the order they were published. Its failure path differs from :class:`DeliveryWorker`'s on purpose:
a failing event is **retried in place**, never parked in a delay queue (that would let later
events of its key overtake it), and blocks only its own partition:

- a retryable failure (connection, timeout, 429, 5xx) is tried again after the policy's backoff
  (exponential, capped at ``max``, never shorter than a ``Retry-After``), while the message stays
  unacked at the head of its partition;
- RabbitMQ cancels a consumer that holds a message longer than its ``consumer_timeout`` (30 min by
  default), so after a hold window (:data:`middleware.ordering.HOLD_SECONDS`) the message is
  returned to its partition, whose head it stays (quorum queues deliver returned messages first)
  and comes back at once; a wait that outlasts the window (a long ``Retry-After``) goes on in the
  next one. Each return counts as a delivery, so the partition queue's delivery limit is sized for
  ``max_age`` (:func:`middleware.ordering.partition_delivery_limit`);
- as for a parked delivery (:mod:`.parking`), only the delivery's ``max_age`` (counted from the
  first failure this process saw, across its hold windows; ``forever``: never) or a non-retryable
  outcome ends the wait: the event is dead-lettered with its attempts, first and last failure,
  and the partition moves on. Its last allowed delivery (left only when engines crashed or
  handed the partition over meanwhile) dead-letters it too, with its reason;
- a stopping engine returns the message to the head of its partition (a hand-back would put it at
  the back, behind later events of its key).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from dataclasses import dataclass

from middleware import ordering
from middleware.broker import naming
from middleware.broker.base import Broker, Handler, IncomingMessage
from middleware.delivery import parking
from middleware.delivery.base import Connector, Delivery, RetryPolicy
from middleware.errors import BrokerError, BrokerUnavailable, DeliveryError, EngineStopping
from middleware.journal import hooks as journal_hooks
from middleware.observe import Metrics
from middleware.route import Route
from middleware.tracecontext import TRACEPARENT
from middleware.tracing import NULL_SPAN, Span
from middleware.workers import DeliveryWorker, is_last_delivery

log = logging.getLogger("middleware.worker")

PREFETCH = 1


def backoff(policy: RetryPolicy, attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait after failed ``attempt`` (1-based): exponential up to ``max`` plus jitter, and
    at least the sink's ``Retry-After`` (which may exceed ``max``: the sink asked)."""
    wait = min(policy.initial * policy.multiplier ** (attempt - 1), policy.max) + random.uniform(0, policy.jitter)
    return max(wait, retry_after) if retry_after else wait


@dataclass
class _Failing:
    """An event failing in place: when it first failed (in this process) and the sends so far."""

    since: float  # time.monotonic() of the first failure
    first: dt.datetime  # the same, as the dead letter's first failure
    attempts: int
    due: float = 0.0  # time.monotonic() when the next try is due (its backoff or Retry-After)
    error: DeliveryError | None = None  # the last failure


def in_place(handler: Handler) -> Handler:
    """``handler``, but a stopping engine, or a broker that refuses a publish for a while, returns its
    unsettled message to the head of its queue (a hand-back would put it behind later messages): for the
    inbound queue of an ordered route and the partition queues."""

    async def ordered(message: IncomingMessage) -> None:
        try:
            await handler(message)
        except (EngineStopping, BrokerUnavailable, asyncio.CancelledError):
            if not message.settled:
                await message.reject(requeue=True)
            raise

    return ordered


class OrderedDeliveryWorker(DeliveryWorker):
    """Consumes partition ``partition`` of the ordered delivery of ``route`` to ``connector``."""

    def __init__(self, route: Route, connector: Connector, broker: Broker, metrics: Metrics, *, partition: int,
                 retry: RetryPolicy | None = None, prefix: str = "", delivery_limit: int = 10,
                 hold_seconds: float | None = None) -> None:
        super().__init__(route, connector, broker, metrics, retry=retry, prefix=prefix, delivery_limit=delivery_limit)
        self.partition = partition
        self.queue = naming.partition_queue(route.name, connector.name, partition, prefix)  # replay comes back here
        self.hold_seconds = ordering.HOLD_SECONDS if hold_seconds is None else hold_seconds
        # the partition queue's limit (topology.declare sizes it alike): returns until max_age, then some
        self.partition_limit = ordering.partition_delivery_limit(delivery_limit, self.retry.max_age,
                                                                  self.hold_seconds)
        self._failing: dict[str, _Failing] = {}  # event id -> its failure so far, across hold windows

    async def handle(self, message: IncomingMessage) -> None:
        """Deliver one event in place; a stopping engine returns it to the head of its partition."""
        span = self.tracing.start("deliver", message.headers.get(TRACEPARENT), route=self.route.name,
                                  connector=self.connector.name, event_id=message.message_id,
                                  correlation_id=message.correlation_id, partition=self.partition)
        try:
            await in_place(lambda m: self._deliver_in_place(m, span))(message)
        except BaseException as exc:
            span.end("failed", exc)
            raise
        span.end("returned")  # given back at the end of a hold window (any other outcome ended it already)

    def _delivery(self, message: IncomingMessage, span: Span = NULL_SPAN) -> Delivery:
        return Delivery(body=message.body, event_id=message.message_id or "",
                        correlation_id=message.correlation_id or "", route=self.route.name,
                        event_type=str(message.headers.get("x-mw-event-type", "")),
                        traceparent=span.traceparent or journal_hooks.next_traceparent(message.headers), span=span)

    async def _deliver_in_place(self, message: IncomingMessage, span: Span = NULL_SPAN) -> None:
        labels = (self.route.name, self.connector.name)
        delivery = self._delivery(message, span)
        if self.outbound is not None:  # the deliver entry's when: / map:
            prepared = await self._prepare(message, delivery)
            if prepared is None:
                return
            delivery = prepared
        key = delivery.event_id or f"{id(message)}"
        held_since = time.monotonic()
        attempt = 0
        started = time.perf_counter()
        try:
            while True:
                if await self._wait_until_due(message, delivery, key, held_since):
                    return
                attempt += 1
                try:
                    await self.connector.send(delivery)
                    break
                except DeliveryError as exc:
                    if await self._after_failure(message, delivery, exc, key, attempt):
                        return
                except (BrokerError, EngineStopping, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a connector bug: tried in place up to the delivery limit
                    log.exception("connector failed", extra={"route": labels[0], "connector": labels[1],
                                                             "correlation_id": delivery.correlation_id,
                                                             "attempt": attempt})
                    if attempt >= self.delivery_limit:
                        error = DeliveryError(f"{labels[1]}: connector failed with {type(exc).__name__} on each "
                                              f"of {attempt} attempts", retryable=False,
                                              hint="a middleware or connector bug: report it, replay the dead "
                                                   "letter once fixed")
                        error.attempts = attempt
                        await self._finish_dead(message, delivery, error, key)
                        return
                    await asyncio.sleep(backoff(self.retry, attempt))
        finally:
            self.metrics.delivery_seconds.labels(*labels).observe(time.perf_counter() - started)
        self._failing.pop(key, None)
        await message.ack()
        self.metrics.delivered.labels(*labels).inc()
        journal_hooks.delivered(self, message, delivery, attempt)
        span.end("delivered", attempts=attempt)
        log.info("delivered", extra={"route": labels[0], "connector": labels[1],
                                     "correlation_id": delivery.correlation_id, "event_id": delivery.event_id,
                                     "attempts": attempt, "partition": self.partition})

    async def _after_failure(self, message: IncomingMessage, delivery: Delivery, error: DeliveryError, key: str,
                             attempt: int) -> bool:
        """Count the failure and set when the next try is due; True when the message was dead-lettered
        instead (a non-retryable outcome, or ``max_age`` over)."""
        labels = (self.route.name, self.connector.name)
        failing = self._failing.get(key)
        if failing is None:  # earlier deliveries (another process's hold windows) made one send at least
            failing = self._failing[key] = _Failing(time.monotonic(), dt.datetime.now(dt.UTC),
                                                    message.delivery_count)
        failing.attempts += 1
        error.attempts = failing.attempts
        if not error.retryable:
            await self._finish_dead(message, delivery, error, key)
            return True
        max_age = self.retry.max_age
        if max_age is not None and time.monotonic() - failing.since >= max_age:  # as a parked delivery
            await self._finish_dead(message, delivery, parking.gave_up(error, failing.first, dt.datetime.now(dt.UTC),
                                                                       max_age), key)
            return True
        failing.due, failing.error = time.monotonic() + backoff(self.retry, attempt, error.retry_after), error
        self.metrics.retries.labels(*labels).inc()
        journal_hooks.delivery_retry(self, delivery, attempt, error)
        log.info("delivery retry in place", extra={"route": labels[0], "connector": labels[1],
                                                   "attempt": failing.attempts,
                                                   "correlation_id": delivery.correlation_id,
                                                   "event_id": delivery.event_id, "status": error.status,
                                                   "partition": self.partition})
        return False

    async def _wait_until_due(self, message: IncomingMessage, delivery: Delivery, key: str,
                              held_since: float) -> bool:
        """Sleep until a failing event's next try is due (this delivery's, or one an earlier hold window
        left: a ``Retry-After`` may be longer than a window). True when the hold window ends first:
        the message was returned to the head of its partition (dead-lettered on its last allowed
        delivery), each window lasting ``hold_seconds`` in full."""
        failing = self._failing.get(key)
        if failing is None:
            return False
        window_end = held_since + self.hold_seconds
        if failing.due <= window_end:
            await asyncio.sleep(max(failing.due - time.monotonic(), 0.0))
            return False
        await asyncio.sleep(max(window_end - time.monotonic(), 0.0))
        if is_last_delivery(message, self.partition_limit) and failing.error is not None:
            await self._finish_dead(message, delivery, failing.error, key)  # crashes or hand-overs used the returns up
        else:  # back to the head of the partition, delivered again at once (RabbitMQ's consumer_timeout)
            await message.reject(requeue=True)
        return True

    async def _finish_dead(self, message: IncomingMessage, delivery: Delivery, error: DeliveryError,
                           key: str) -> None:
        failing = self._failing.pop(key, None)
        await self._dead_letter(message, delivery, error, parking.timestamp(failing.first) if failing else None,
                                attempts=error.attempts)
