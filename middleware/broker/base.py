"""The broker port: what the engine needs from a message broker, whatever the adapter.

Two adapters implement it: :mod:`middleware.broker.amqp` (aio-pika, RabbitMQ) and
:mod:`middleware.broker.kombu_broker` (kombu: ``memory://`` for tests, a file-backed transport as
the embedded default). One contract test suite (tests/contract/) runs against both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OutgoingMessage:
    """A message to publish. ``headers`` values are str, int, float or bool."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    message_id: str | None = None
    content_type: str = "application/octet-stream"


class IncomingMessage:
    """A consumed message; exactly one of :meth:`ack` or :meth:`reject` must be awaited."""

    body: bytes
    headers: dict[str, Any]
    correlation_id: str | None
    message_id: str | None
    content_type: str | None
    redelivered: bool
    delivery_count: int  # 0 on first delivery; from x-delivery-count (quorum queues) when known
    settled: bool  # True once ack, reject or hand_back was called

    async def ack(self) -> None:
        """Remove the message from the queue."""
        raise NotImplementedError

    async def reject(self, requeue: bool = True) -> None:
        """Give the message back (``requeue=True``) or drop it.

        A requeue counts as a failed delivery: on its ``delivery_limit``-th redelivery's return the
        broker dead-letters the message (RabbitMQ quorum queues; emulated by the embedded broker)."""
        raise NotImplementedError

    async def hand_back(self) -> None:
        """Give the message back because this process is stopping, not because handling it failed.

        Its next delivery does not count toward the delivery limit, so a shutdown never turns a
        healthy message into a dead letter. On RabbitMQ a copy (same body, properties and headers)
        is published to the queue and confirmed, then the original is acked: the message goes to
        the back of the queue, and a crash in between leaves a duplicate, never a loss."""
        raise NotImplementedError


Handler = Callable[[IncomingMessage], Awaitable[None]]


@dataclass(frozen=True)
class QueueInfo:
    """Depth and consumer count of a queue, as the broker reports them."""

    name: str
    messages: int
    consumers: int


class Consumer:
    """A running subscription, stopped in two steps so that a shutdown drains (DESIGN promise 6).

    1. :meth:`cancel` stops new deliveries (``basic.cancel`` on RabbitMQ). The channel stays open:
       handlers already running finish and can still ack or reject.
    2. :meth:`close` ends the subscription: handlers still running are cancelled, the messages
       they did not settle are handed back (:meth:`IncomingMessage.hand_back`: not counted as a
       failed delivery), then the channel closes.
    """

    @property
    def in_flight(self) -> int:
        """Handlers running now."""
        raise NotImplementedError

    async def cancel(self) -> None:
        """Stop new deliveries; in-flight handlers keep running. Idempotent."""
        raise NotImplementedError

    async def close(self) -> None:
        """Cancel (if not yet), stop the handlers still running, hand back what they held, close. Idempotent."""
        raise NotImplementedError


class Broker:
    """The port. Every publish returns only once the broker has confirmed the message."""

    url: str
    connection_losses: int = 0  # connections lost since connect() (adapters with a network link count them)

    async def connect(self) -> None:
        """Open the connection; raises :class:`middleware.errors.BrokerError` if unreachable."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close the connection; unacked messages go back to their queues."""
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        """Whether the broker can take a publish now (readiness); adapters without a network link: True."""
        return True

    async def declare_queue(self, name: str, *, kind: str = "work", dead_letter_to: str | None = None,
                            delivery_limit: int = 10, message_ttl: float | None = None) -> None:
        """Declare a durable queue. ``kind`` is ``work`` (quorum on RabbitMQ, with a delivery
        limit that dead-letters poison messages to ``dead_letter_to``), ``dead-letter``
        (classic durable, so it can be browsed without counting deliveries) or ``delay`` (nobody
        consumes it: each message goes to queue ``dead_letter_to`` ``message_ttl`` seconds after
        it was published). ``ordered`` is a ``work`` queue with a single active consumer across
        every engine (ordered deliveries' partitions and their route's inbound queue)."""
        raise NotImplementedError

    async def declare_exchange(self, name: str, *, hash_header: str | None = None) -> None:
        """Declare a durable topic exchange; with ``hash_header``, a consistent-hash exchange that
        sends each message to one bound queue by the hash of that header's value (RabbitMQ's
        ``rabbitmq_consistent_hash_exchange`` plugin; the embedded broker refuses it)."""
        raise NotImplementedError

    async def bind_exchange(self, destination: str, source: str, routing_key: str) -> None:
        """Route messages published to exchange ``source`` with a matching key into exchange ``destination``."""
        raise NotImplementedError

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        """Route messages published to ``exchange`` with a matching key into ``queue``."""
        raise NotImplementedError

    async def publish(self, message: OutgoingMessage, *, queue: str | None = None,
                      exchange: str | None = None, routing_key: str = "", mandatory: bool | None = None) -> None:
        """Publish persistently to a queue (default exchange) or to an exchange; wait for the confirm.

        ``mandatory`` (default: True for a queue, False for an exchange): a message no queue takes
        is an error (:class:`middleware.errors.BrokerError`), not a silent drop.
        """
        raise NotImplementedError

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 10) -> Consumer:
        """Call ``handler`` for each message, at most ``prefetch`` unacked at once."""
        raise NotImplementedError

    async def get(self, queue: str) -> IncomingMessage | None:
        """Fetch one message without a subscription (None if empty); ack or reject it."""
        raise NotImplementedError

    async def queue_info(self, queue: str) -> QueueInfo:
        """Depth and consumers; raises :class:`middleware.errors.BrokerError` if it does not exist."""
        raise NotImplementedError

    async def purge(self, queue: str) -> int:
        """Delete every ready message of ``queue``; returns how many."""
        raise NotImplementedError

    async def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` (tests clean up what they declared)."""
        raise NotImplementedError

    async def delete_exchange(self, name: str) -> None:
        """Delete exchange ``name``."""
        raise NotImplementedError
