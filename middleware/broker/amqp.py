"""RabbitMQ adapter (aio-pika): publisher confirms, robust reconnect, durable quorum work queues.

- Work queues are quorum queues with ``x-delivery-limit``: a message redelivered that often (a
  poison message that crashes or stalls its consumer) is dead-lettered, at-least-once, into the
  route's dead-letter queue instead of looping forever.
- Dead-letter queues are classic durable queues on one node, so operators can browse them; when
  ``broker.url`` lists several nodes (a cluster) they are quorum queues instead, replicated, so dead
  letters survive a node stop (``x-delivery-limit`` set very high: browsing requeues, and RabbitMQ 4's
  default limit of 20 would drop a browsed dead letter). A dead-letter queue that already exists with
  the other type is used as it is (``dlq``, ``status``... may run with one node's URL).
- Delay queues (a delivery parked during a sink outage) are quorum queues with a per-queue
  ``x-message-ttl`` (RabbitMQ 3.10+): messages expire at the head in publish order, and
  ``at-least-once`` dead-lettering (publisher confirms inside RabbitMQ) moves each back to its
  delivery queue, so a parked message survives a node loss and is never dropped on the way back.
- Every publish waits for the broker's confirm; a publish to a queue is ``mandatory``, so a
  message to a queue that does not exist is an error, not a silent drop.
- A publish that fails because the connection dropped waits for the robust connection to come
  back and tries again, and one the broker refuses (``basic.nack``: a quorum queue whose leader was
  on a stopped node, until its new leader is elected) is sent again, for up to
  ``PUBLISH_RETRY_SECONDS``; then :class:`BrokerUnavailable`, and a consumer hands the message it
  was handling back uncounted (``hand_back``). A lost confirm may duplicate a message
  (at-least-once; event ids are deterministic, so sinks dedupe).
- Stopping drains: ``basic.cancel`` first while the consumer's channel stays open (handlers finish
  and ack), then the channel closes. Quorum queues count every return (``nack``/``reject`` with
  requeue, and unacked messages of a closed channel) toward ``x-delivery-limit``, so a message a
  stopping consumer still holds is handed back as a confirmed copy plus an ack of the original,
  which RabbitMQ does not count: restarts never dead-letter healthy work.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import ssl
import time
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from yarl import URL

from middleware.broker.acks import AckBatcher
from middleware.broker.base import Broker, Consumer, Handler, IncomingMessage, OutgoingMessage, QueueInfo
from middleware.broker.failover import FailoverConnection, split_urls
from middleware.broker.frames import COALESCE, CoalescingTransportFactory
from middleware.errors import BrokerError, BrokerUnavailable, EngineStopping
from middleware.observe import safe_url
from middleware.tls import TlsOptions, client_context

log = logging.getLogger("middleware.broker")

PUBLISH_RETRY_SECONDS = 30.0  # a publish refused (nack) or cut off (connection lost) is sent again this long
PUBLISH_RETRY_STEP = 0.5
# one connection attempt (TCP, TLS and the AMQP handshake): a node that takes the connection but never
# answers (seen on a cluster node while another node stopped) would otherwise hold a failover forever
CONNECT_TIMEOUT_SECONDS = 10.0
DEAD_LETTER_DELIVERY_LIMIT = 1_000_000  # a quorum dead-letter queue's: browsing (get, requeue) counts deliveries
RECONNECT_SECONDS = 1.0
STOP_STEP_SECONDS = 5.0  # bound on each step of stopping a consumer (cancel, hand back, close): a dead
# connection must not hang a shutdown; whatever was not handed back returns when the connection goes
_SERIAL = itertools.count(1)
_CONNECTION_ERRORS = (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError,
                      ConnectionError, asyncio.TimeoutError)


class AmqpIncoming(IncomingMessage):
    """An aio-pika message seen through the port."""

    def __init__(self, message: AbstractIncomingMessage, *, queue: str | None = None,
                 channel: AbstractRobustChannel | None = None, acks: AckBatcher | None = None) -> None:
        self._message = message
        self._queue = queue  # where hand_back() puts the copy
        self._channel = channel
        self._acks = acks  # a consumer's acks leave batched (middleware.broker.acks)
        self._raw_channel = message.channel if acks is not None else None
        self.body = message.body
        self.headers = dict(message.headers or {})
        self.correlation_id = message.correlation_id
        self.message_id = message.message_id
        self.content_type = message.content_type
        self.redelivered = bool(message.redelivered)
        count = self.headers.get("x-delivery-count")
        self.delivery_count = int(count) if isinstance(count, int) else int(self.redelivered)
        self.settled = False

    async def ack(self) -> None:
        self.settled = True
        tag = self._message.delivery_tag
        if self._acks is None or tag is None:
            await self._message.ack()
            return
        await self._acks.ack(self._raw_channel, tag)

    async def reject(self, requeue: bool = True) -> None:
        self.settled = True
        await self._message.reject(requeue=requeue)
        if self._acks is not None:
            self._acks.settled(self._raw_channel, self._message.delivery_tag)

    async def hand_back(self) -> None:
        if self._queue is None or self._channel is None:
            await self.reject(requeue=True)
            return
        self.settled = True
        raw = self._message
        if raw.channel.is_closed:  # its connection is gone: the broker has put the original back already
            return
        copy = aio_pika.Message(
            body=raw.body, headers={k: v for k, v in self.headers.items() if k != "x-delivery-count"} or None,
            content_type=raw.content_type, content_encoding=raw.content_encoding,
            correlation_id=raw.correlation_id, message_id=raw.message_id, priority=raw.priority,
            timestamp=raw.timestamp, type=raw.type, app_id=raw.app_id, reply_to=raw.reply_to,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await asyncio.wait_for(
                self._channel.default_exchange.publish(copy, routing_key=self._queue, mandatory=True),
                STOP_STEP_SECONDS)
            await raw.ack()
            if self._acks is not None:
                self._acks.settled(self._raw_channel, raw.delivery_tag)
        except Exception as exc:  # unroutable, refused, timed out, connection gone
            # counted once by the quorum queue either way: returned now if the channel is still open (held
            # unacked, it would take a prefetch slot until the channel closes), else when it closed
            log.warning("hand back failed; the broker requeues the message", extra={
                "queue": self._queue, "error": type(exc).__name__, "correlation_id": self.correlation_id})
            if not raw.channel.is_closed:
                try:
                    await raw.reject(requeue=True)
                    if self._acks is not None:
                        self._acks.settled(self._raw_channel, raw.delivery_tag)
                except Exception as failed:  # the channel went meanwhile: the broker returns it
                    log.debug("requeue after a failed hand back failed", extra={"error": type(failed).__name__})


class AmqpConsumer(Consumer):
    """A subscription on its own channel (so its prefetch is its own); tracks its running handlers."""

    def __init__(self, channel: AbstractRobustChannel, queue: aio_pika.abc.AbstractQueue) -> None:
        self._channel = channel
        self._queue = queue
        self.tag: str | None = None
        self.running: dict[asyncio.Task[object], AmqpIncoming] = {}
        self.acks = AckBatcher()
        self._cancelled = self._closed = False

    @property
    def in_flight(self) -> int:
        return len(self.running)

    async def cancel(self) -> None:
        if self._cancelled or self.tag is None:
            return
        self._cancelled = True
        try:  # basic.cancel only: the channel stays open so running handlers can still ack
            await self._queue.cancel(self.tag, timeout=STOP_STEP_SECONDS)
        except (*_CONNECTION_ERRORS, aiormq.exceptions.AMQPError) as exc:
            log.warning("consumer cancel failed; closing its channel stops it", extra={
                "queue": self._queue.name, "error": type(exc).__name__})

    async def close(self) -> None:
        if self._closed:
            return
        await self.cancel()
        self._closed = True
        held = list(self.running.items())
        for task, _ in held:
            task.cancel()
        if held:
            await asyncio.wait([task for task, _ in held], timeout=STOP_STEP_SECONDS)
        unsettled = [message for _, message in held if not message.settled]
        if unsettled:
            await asyncio.gather(*(message.hand_back() for message in unsettled))
            log.warning("handlers still running at close were stopped; their messages were handed back", extra={
                "queue": self._queue.name, "messages": len(unsettled)})
        try:
            await asyncio.wait_for(self._channel.close(), STOP_STEP_SECONDS)
        except (*_CONNECTION_ERRORS, aiormq.exceptions.AMQPError) as exc:
            log.warning("consumer channel close failed", extra={"queue": self._queue.name,
                                                                "error": type(exc).__name__})


class AmqpBroker(Broker):
    """The port over one robust aio-pika connection."""

    def __init__(self, url: str, *, tls: TlsOptions | None = None) -> None:
        self.url = url
        self.tls = tls  # broker.tls: CA bundle, client certificate, verify (amqps:// only)
        # several node URLs: a cluster, whose dead letters must survive a node stop (module docstring)
        self.dead_letter_queue_type = "quorum" if len(split_urls(url)) > 1 else "classic"
        # unique per connection, so operators (and tests) can tell connections apart in RabbitMQ
        self.connection_name = f"middleware {socket.gethostname()} pid {os.getpid()} #{next(_SERIAL)}"
        self.transport_factory = CoalescingTransportFactory() if COALESCE else None
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self.connection_losses = 0  # connections lost since connect() (logged, and seen by tests)
        self.connection_restores = 0
        self._lost_at: float | None = None  # monotonic time of the loss not yet restored

    async def connect(self) -> None:
        try:
            ssl_context = client_context(self.tls) if self.url.startswith("amqps://") else None
            self._connection = await self._first_node(ssl_context)
            self._channel = await self._new_channel()
        # EOFError: the server hung up mid-handshake (a TLS listener refusing our client certificate)
        except (TimeoutError, aiormq.exceptions.AMQPError, OSError, EOFError) as exc:
            hint = "check MIDDLEWARE_BROKER_URL / broker.url and that RabbitMQ is running"
            if ssl_context is not None:
                hint += ("; for TLS, broker.tls: ca_file (the server's CA) and cert_file (if the server "
                         "requires client certificates)")
            raise BrokerError(f"cannot connect to RabbitMQ: {type(exc).__name__}: {exc}", hint=hint) from None
        self._connection.close_callbacks.add(self._on_connection_closed)
        self._connection.reconnect_callbacks.add(self._on_reconnected)

    async def _first_node(self, ssl_context: ssl.SSLContext | None) -> FailoverConnection:
        """A robust connection to the first node of ``url`` that answers (several: see broker/failover.py)."""
        urls = split_urls(self.url)
        for first, url in enumerate(urls):
            connection = FailoverConnection(
                URL(url), urls=urls, first=first, reconnect_interval=RECONNECT_SECONDS, ssl_context=ssl_context,
                client_properties={"connection_name": self.connection_name})
            if self.transport_factory is not None:  # one socket write per loop turn (broker/frames.py)
                connection.kwargs["transport_factory"] = self.transport_factory  # at every reconnect too
            try:
                await connection.connect(timeout=CONNECT_TIMEOUT_SECONDS)  # bounds every reconnect attempt too
                return connection
            except (TimeoutError, aiormq.exceptions.AMQPError, OSError, EOFError) as exc:
                if first == len(urls) - 1:
                    raise
                log.warning("broker node does not answer; trying the next", extra={
                    "broker": safe_url(url), "error": type(exc).__name__})
        raise AssertionError("unreachable: the last node's error is raised")

    def _on_connection_closed(self, connection: AbstractConnection | None, error: BaseException | None) -> None:
        """Log a lost connection once per outage (aio-pika keeps reconnecting every second)."""
        if connection is not self._connection or self._lost_at is not None:
            return  # closed by close(), or still the same outage
        self._lost_at = time.monotonic()
        self.connection_losses += 1
        log.warning("broker connection lost", extra={
            "broker": self.node, "connection_name": self.connection_name,
            "error": type(error).__name__ if error else None, "losses": self.connection_losses})

    def _on_reconnected(self, connection: AbstractRobustConnection | None) -> None:
        down = time.monotonic() - self._lost_at if self._lost_at is not None else None
        self._lost_at = None
        self.connection_restores += 1
        log.info("broker connection restored", extra={
            "broker": self.node, "connection_name": self.connection_name,
            "down_seconds": round(down, 3) if down is not None else None,
            "losses": self.connection_losses, "restores": self.connection_restores})

    async def _new_channel(self, prefetch: int | None = None) -> AbstractRobustChannel:
        if self._connection is None:
            raise BrokerError("not connected", hint="call connect() first")
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    @property
    def node(self) -> str:
        """The URL (credentials masked) of the node connected to, or being tried now."""
        connection = self._connection
        return safe_url(str(connection.url) if isinstance(connection, FailoverConnection) else split_urls(self.url)[0])

    @property
    def connected(self) -> bool:
        """Connected and not in an outage (False from a lost connection until it is restored)."""
        return self._connection is not None and not self._connection.is_closed and self._lost_at is None

    @property
    def channel(self) -> AbstractRobustChannel:
        if self._channel is None:
            raise BrokerError("not connected", hint="call connect() first")
        return self._channel

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection, self._channel = self._connection, None, None
            await connection.close()

    async def declare_queue(self, name: str, *, kind: str = "work", dead_letter_to: str | None = None,
                            delivery_limit: int = 10, message_ttl: float | None = None) -> None:
        arguments: dict[str, Any]
        if kind == "dead-letter":
            arguments = ({"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT}
                         if self.dead_letter_queue_type == "quorum" else {"x-queue-type": "classic"})
        elif kind == "delay":  # a quorum queue, like the delivery queue it feeds (see the module docstring)
            if not dead_letter_to or message_ttl is None:
                raise ValueError("a delay queue needs dead_letter_to and message_ttl")
            arguments = {"x-queue-type": "quorum", "x-message-ttl": int(message_ttl * 1000),
                         "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_letter_to,
                         "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        elif kind in ("work", "ordered"):
            arguments = {"x-queue-type": "quorum", "x-delivery-limit": delivery_limit}
            if dead_letter_to:
                arguments.update({"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_letter_to,
                                  "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
            if kind == "ordered":  # one consumer at a time across every engine: per-key order
                arguments["x-single-active-consumer"] = True
        else:
            raise ValueError(f"unknown queue kind {kind!r}")
        try:
            # robust=False: not declared again at each reconnect (the queues are durable, they are still there);
            # in a cluster a classic dead-letter queue whose node is down would fail that re-declaration and
            # with it the whole reconnect to the other nodes (found with bench/cluster.py)
            await self.channel.declare_queue(name, durable=True, arguments=arguments, robust=False)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            self._channel = await self._new_channel()
            if kind == "dead-letter":  # classic or quorum, it holds dead letters all the same
                log.info("dead-letter queue exists with another type; used as it is", extra={
                    "queue": name, "wanted": self.dead_letter_queue_type})
                return
            raise BrokerError(f"queue {name!r} exists with other settings: {exc}",
                              hint="delete the queue (after draining it) or use another broker.queue_prefix") from None

    async def declare_exchange(self, name: str, *, hash_header: str | None = None) -> None:
        if hash_header is None:
            await self.channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
            return
        try:
            await self.channel.declare_exchange(name, "x-consistent-hash", durable=True,
                                                arguments={"hash-header": hash_header})
        except aiormq.exceptions.ConnectionCommandInvalid as exc:  # unknown exchange type: the plugin is off
            raise BrokerError(f"cannot declare the consistent-hash exchange {name!r} of an ordered delivery: {exc}",
                              hint="enable the plugin: rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"
                              ) from None

    async def bind_exchange(self, destination: str, source: str, routing_key: str) -> None:
        target = await self.channel.get_exchange(destination, ensure=False)
        await target.bind(source, routing_key)

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        target = await self.channel.get_queue(queue, ensure=False)
        await target.bind(exchange, routing_key)

    async def publish(self, message: OutgoingMessage, *, queue: str | None = None,
                      exchange: str | None = None, routing_key: str = "", mandatory: bool | None = None) -> None:
        if (queue is None) == (exchange is None):
            raise ValueError("publish to exactly one of queue= or exchange=")
        must_route = (queue is not None) if mandatory is None else mandatory
        properties = aiormq.spec.Basic.Properties(
            headers=message.headers or None, correlation_id=message.correlation_id, message_id=message.message_id,
            content_type=message.content_type, delivery_mode=int(aio_pika.DeliveryMode.PERSISTENT))
        target = ("", queue) if queue is not None else (str(exchange), routing_key)
        deadline = asyncio.get_running_loop().time() + PUBLISH_RETRY_SECONDS
        refusals = 0
        while True:
            try:
                # aiormq's basic_publish below aio-pika's Exchange.publish (same frames, same confirm), with
                # wait=False: the frame is queued for the connection's writer and the channel's lock released
                # at once instead of after a write and drain of its own, so the publishes of one loop turn
                # leave in one socket write (broker/frames.py); the confirm is still awaited before returning
                channel = cast(aiormq.Channel, await self.channel.get_underlay_channel())
                if channel.is_closed:
                    raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
                await channel.basic_publish(message.body, exchange=target[0], routing_key=target[1],
                                            properties=properties, mandatory=must_route, wait=not COALESCE)
                return
            except aio_pika.exceptions.PublishError:
                where = f"queue {queue!r} does not exist" if queue is not None else \
                    f"no queue is bound to exchange {exchange!r} for {routing_key!r}"
                raise BrokerError(f"{where}: the message was not accepted",
                                  hint="start the engine once (it declares every queue) or check the name") from None
            except aio_pika.exceptions.DeliveryError as exc:  # a nack: e.g. a quorum queue without a leader
                if asyncio.get_running_loop().time() > deadline:
                    raise BrokerUnavailable(f"RabbitMQ refused the message ({exc.frame.name}) for "
                                            f"{PUBLISH_RETRY_SECONDS:.0f} s",
                                            hint="a queue may be full or without a majority of its nodes") from None
                refusals += 1
                if refusals == 1:  # once per publish: a failover nacks many at once
                    log.warning("publish refused by the broker, sending it again", extra={
                        "broker": self.node, "queue": queue, "exchange": exchange, "frame": exc.frame.name})
                await asyncio.sleep(PUBLISH_RETRY_STEP)
            except _CONNECTION_ERRORS as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise BrokerUnavailable(f"publish failed, connection lost: {type(exc).__name__}",
                                            hint="check that RabbitMQ is running") from None
                log.warning("publish interrupted, waiting for the connection", extra={"error": type(exc).__name__})
                await asyncio.sleep(PUBLISH_RETRY_STEP)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 10) -> Consumer:
        channel = await self._new_channel(prefetch)
        try:  # a passive declare registers the queue, so the robust channel restores the consumer
            target = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise BrokerError(f"queue {queue!r} does not exist", hint="declare it first (the engine does)") from None

        subscription = AmqpConsumer(channel, target)

        async def on_message(raw: AbstractIncomingMessage) -> None:
            subscription.acks.delivered(raw.channel, raw.delivery_tag)
            message = AmqpIncoming(raw, queue=queue, channel=channel, acks=subscription.acks)
            task = asyncio.current_task()
            if task is not None:
                subscription.running[task] = message
            try:
                await handler(message)
            except (EngineStopping, BrokerUnavailable) as exc:  # not a failure of the message: back uncounted
                if isinstance(exc, BrokerUnavailable):
                    log.warning("broker unavailable while handling a message; handed back", extra={
                        "queue": queue, "correlation_id": message.correlation_id, "error": str(exc)})
                if not message.settled:
                    await message.hand_back()
            except Exception:  # the broker failed mid-way: give the message back for another try
                log.exception("handler failed; message requeued", extra={"queue": queue,
                                                                        "correlation_id": message.correlation_id})
                if not message.settled:
                    try:
                        await message.reject(requeue=True)
                    except Exception:  # channel gone: RabbitMQ requeues unacked messages by itself
                        log.warning("requeue failed; the broker will redeliver", extra={"queue": queue})
            finally:
                if task is not None:
                    subscription.running.pop(task, None)

        subscription.tag = await target.consume(on_message, no_ack=False)
        return subscription

    async def get(self, queue: str) -> IncomingMessage | None:
        target = await self.channel.get_queue(queue, ensure=False)
        raw = await target.get(no_ack=False, fail=False)
        return AmqpIncoming(raw, queue=queue, channel=self.channel) if raw is not None else None

    async def queue_info(self, queue: str) -> QueueInfo:
        """Depth and consumers of ``queue`` (a passive declare on a short-lived channel: a 404 closes it).

        The channel is aiormq's, on the current transport, not an aio-pika one: each aio-pika channel
        opened and closed left its close callback, an Event, a Lock and a task on the connection (and a
        404 the whole robust channel, reopened): the console's depth gauges and the breakers' depth checks
        call this per queue every few seconds for as long as the engine runs (found with bench/memtrace.py).
        """
        transport = self._connection.transport if self._connection is not None else None
        if transport is None or transport.connection.is_closed:
            raise BrokerError("not connected", hint="call connect() first, or wait for the reconnect")
        channel = await transport.connection.channel()
        try:
            result = await channel.queue_declare(queue, passive=True)
            return QueueInfo(queue, result.message_count or 0, result.consumer_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise BrokerError(f"queue {queue!r} does not exist", hint="check the name and queue prefix") from None
        finally:
            if not channel.is_closed:
                await channel.close()

    async def purge(self, queue: str) -> int:
        target = await self.channel.get_queue(queue, ensure=False)
        result = await target.purge()
        return int(result.message_count or 0)

    async def delete_queue(self, queue: str) -> None:
        await self.channel.queue_delete(queue)

    async def delete_exchange(self, name: str) -> None:
        await self.channel.exchange_delete(name)
