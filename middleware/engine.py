"""Wires route workers, delivery workers and connectors on one broker for ``middleware run``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from middleware import topology
from middleware.broker import make_broker
from middleware.broker.base import Broker, Consumer, Handler, IncomingMessage
from middleware.delivery import ordered as ordered_delivery
from middleware.delivery.base import Connector, ConnectorSpec, make_connector
from middleware.delivery.breaker import ConnectorGate
from middleware.delivery.ordered import OrderedDeliveryWorker
from middleware.ingest import Gateway, GatewayContext, make_gateway
from middleware.journal import open_journal
from middleware.journal.hooks import attach as attach_journal
from middleware.journal.hooks import publishers_of
from middleware.journal.monitor import SlaMonitor
from middleware.observe import Metrics, safe_url
from middleware.project import Project, Settings
from middleware.route import Route
from middleware.topology import RouteTopology, Topology
from middleware.tracing import Tracing, open_tracing
from middleware.tracing import attach as attach_tracing
from middleware.workers import DeliveryWorker, RouteWorker

CANCEL_WAIT = 10.0  # seconds a consumer's cancel may take while stopping (the broker may be away)
log = logging.getLogger("middleware.engine")


async def declare_route_topology(broker: Broker, route: Route, settings: Settings) -> None:
    """Declare a route's queues, the events exchange and bindings (:func:`middleware.topology.declare`)."""
    await topology.declare(broker, RouteTopology.of(route, settings.queue_prefix), settings.delivery_limit)


def project_queues(project: Project) -> list[str]:
    """Every work queue of the project: inbound and delivery queues (dead-letter queues excluded)."""
    return Topology.of(project.routes.values(), project.settings.queue_prefix).work_queues


@dataclass
class _Tracked:
    """Counts handlers in flight so callers can tell when the engine is idle."""

    count: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def wrap(self, handler: Handler) -> Handler:
        async def tracked(message: IncomingMessage) -> None:
            self.count += 1
            self.idle.clear()
            try:
                await handler(message)
            finally:
                self.count -= 1
                if self.count == 0:
                    self.idle.set()

        return tracked


class Engine:
    """Runs every route of a project: one consumer per inbound and per delivery queue.

    ``connector_specs`` replaces connectors by name (the demo points http connectors at a local
    sink this way). With ``gateways`` (default) it also starts every ``ingest.<kind>[]`` listener
    (MLLP, HTTP, any registered gateway), before the workers (a taken port fails the start before
    anything is consumed); the demo passes False. ``tracing`` replaces the one ``tracing:`` configures
    (:func:`middleware.tracing.open_tracing`; tests give one with an in-memory exporter).
    """

    def __init__(self, project: Project, *, broker: Broker | None = None, metrics: Metrics | None = None,
                 connector_specs: Mapping[str, ConnectorSpec] | None = None, gateways: bool = True,
                 tracing: Tracing | None = None) -> None:
        self.project = project
        self.settings = project.settings
        self.topology = Topology.of(project.routes.values(), self.settings.queue_prefix)
        self.broker = broker or make_broker(self.settings.broker_url, self.settings.broker_tls)
        self.metrics = metrics or Metrics()
        self.journal = open_journal(self.settings.journal, self.metrics)  # hop records (middleware.journal)
        self.tracing = tracing or open_tracing(self.settings.tracing)  # spans per hop, when on
        self.sla = SlaMonitor(lambda: self.project.routes.values(), self.metrics)  # silent feeds, error rates
        specs = {**project.connectors, **(connector_specs or {})}
        used = {d.connector for r in project.routes.values() for d in r.deliver}
        self.connectors: dict[str, Connector] = {name: make_connector(specs[name]) for name in sorted(used)}
        self._consumers: list[Consumer] = []
        self.gates: dict[str, ConnectorGate] = {}  # per connector: its breaker and delivery consumers
        self._start_gateways = gateways
        self.gateways: list[Gateway] = []
        self._tracked = _Tracked()
        self._tracked.idle.set()

    @property
    def in_flight(self) -> int:
        return self._tracked.count

    async def start(self) -> None:
        """Connect, declare the topology, open connectors, bind the listeners, then start consuming.

        Listeners bind first: a port that is taken fails the start before any message is taken.
        """
        await self.broker.connect()
        await self.journal.start()
        for route_topology in self.topology:
            await topology.declare(self.broker, route_topology, self.settings.delivery_limit)
        for connector in self.connectors.values():
            await connector.start()
        if self._start_gateways:
            await self._start_listeners()
        await self.start_workers()
        self.sla.start()
        log.info("engine started", extra={"routes": sorted(self.project.routes), "broker": safe_url(self.broker.url)})

    async def start_workers(self) -> None:
        """Consume every inbound, delivery and partition queue of ``self.project`` with ``self.connectors``
        (started). :mod:`middleware.reload` calls it again after :meth:`cancel_consumers` and :meth:`drain`."""
        prefetch, prefix, tz = self.settings.prefetch, self.settings.queue_prefix, self.settings.tz
        for route in self.project.routes.values():
            for rule in route.deliver:
                if rule.ordering is not None:  # one consumer per partition queue, one message at a time
                    for partition in range(rule.ordering.partitions):
                        ordered = OrderedDeliveryWorker(route, self.connectors[rule.connector], self.broker,
                                                        self.metrics, partition=partition, retry=rule.retry,
                                                        prefix=prefix, delivery_limit=self.settings.delivery_limit)
                        ordered.journal, ordered.tracing = self.journal, self.tracing
                        await self._consume(ordered.queue, ordered.handle, ordered_delivery.PREFETCH)
                    continue
                worker = DeliveryWorker(route, self.connectors[rule.connector], self.broker, self.metrics,
                                        retry=rule.retry, prefix=prefix, delivery_limit=self.settings.delivery_limit)
                worker.journal, worker.tracing = self.journal, self.tracing
                gate = self.gates.get(rule.connector)
                if gate is None:
                    gate = self.gates[rule.connector] = ConnectorGate(
                        rule.connector, self.connectors[rule.connector].spec.breaker, self.broker, self.metrics)
                worker.breaker = gate.breaker
                self._consumers.append(await gate.consume(
                    worker.queue, self._tracked.wrap(worker.handle), prefetch, worker.probe, route=route.name,
                    delay_queues=list(worker.delay_queues.values())))
            route_worker = RouteWorker(route, self.broker, self.metrics, prefix=prefix, tz=tz,
                                       delivery_limit=self.settings.delivery_limit)
            route_worker.journal, route_worker.tracing = self.journal, self.tracing
            if route_worker.ordered:  # events leave in the order messages came in (middleware.ordering)
                await self._consume(route_worker.queue, ordered_delivery.in_place(route_worker.handle),
                                    ordered_delivery.PREFETCH)
            else:
                await self._consume(route_worker.queue, route_worker.handle, prefetch)

    async def _consume(self, queue: str, handler: Handler, prefetch: int) -> None:
        self._consumers.append(await self.broker.consume(queue, self._tracked.wrap(handler), prefetch=prefetch))

    async def _start_listeners(self) -> None:
        """Start every configured ``ingest.<kind>[]`` listener through the gateway registry."""
        context = GatewayContext(self.broker, self.settings, self.project.routes, self.metrics)
        for kind, listeners in self.settings.ingest.items():
            for listener in listeners:
                gateway = make_gateway(kind, listener, context)
                attach_journal(gateway, self.journal)  # the publishers record what comes in
                attach_tracing(publishers_of(gateway), self.tracing)  # and make its ingest span
                await gateway.start(declare=False)  # start() above declared every route's queues
                self.gateways.append(gateway)

    async def stop(self) -> None:
        """Drain (DESIGN promise 6), then close.

        Every consumer is cancelled first, all at once (no new deliveries; channels stay open, so
        handlers in flight finish and ack), then the gateways stop (their publishes need no consumer);
        after at most ``engine.drain_timeout`` seconds the consumers close: handlers still running are
        stopped and their messages handed back uncounted (a shutdown never dead-letters a healthy
        message). Connectors and the broker connection close last.
        """
        consumers = await self.cancel_consumers()
        gateways, self.gateways = self.gateways, []
        await asyncio.gather(*(gateway.stop() for gateway in gateways))  # together: their drains overlap
        await self.drain(consumers)
        await self.sla.stop()
        await self.journal.stop()  # writes what is still queued
        await asyncio.to_thread(self.tracing.shutdown)  # exports the spans still buffered
        await self.broker.close()
        log.info("engine stopped")

    async def cancel_consumers(self) -> list[Consumer]:
        """Stop every consumer's new deliveries at once (channels stay open: handlers in flight finish
        and ack) and the breakers' probes; returns the consumers for :meth:`drain`."""
        consumers, self._consumers = self._consumers, []
        await asyncio.gather(*(_cancel(consumer) for consumer in consumers))
        for gate in self.gates.values():  # no more probes nor resumes
            await gate.stop()
        draining = self.in_flight
        if draining:
            log.info("draining", extra={"in_flight": draining, "drain_timeout": self.settings.drain_timeout})
        return consumers

    async def drain(self, consumers: list[Consumer]) -> None:
        """Wait up to ``engine.drain_timeout`` for the handlers in flight, then close ``consumers``
        (what still runs is handed back uncounted) and the connectors."""
        try:
            await asyncio.wait_for(self._tracked.idle.wait(), timeout=self.settings.drain_timeout)
        except TimeoutError:
            log.warning("drain timed out; messages still in flight are handed back to their queues",
                        extra={"in_flight": self.in_flight, "drain_timeout": self.settings.drain_timeout})
        for consumer in consumers:
            await consumer.close()
        for connector in self.connectors.values():
            await connector.close()

    async def is_idle(self) -> bool:
        """True when nothing is in flight and every work queue (inbound, delivery, partition) and delay
        queue is empty: a delivery parked while its sink is down is not done."""
        if self.in_flight:
            return False
        for queue in self.topology.pending_queues:
            if (await self.broker.queue_info(queue)).messages:
                return False
        return self.in_flight == 0


async def _cancel(consumer: Consumer) -> None:
    """``consumer.cancel()``, bounded: on a broker that is away it would wait for the reconnect; the
    consumer's close() then stops it (and its unsettled messages go back when the channel goes)."""
    try:
        await asyncio.wait_for(consumer.cancel(), CANCEL_WAIT)
    except TimeoutError:
        log.warning("consumer cancel timed out; closing stops it", extra={"cancel_wait": CANCEL_WAIT})
