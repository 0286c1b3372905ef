"""Every queue and exchange name of a route, in one object built from the naming rules.

:mod:`middleware.broker.naming` holds the rules (one function per kind of name); a
:class:`RouteTopology` applies them to one route and a :class:`Topology` to a whole project.
Declaring (the engine, the publisher, gateways), ``status``, ``dlq``, the demo's clean-up and the
tests' clean-up read queue lists from here; nothing else builds them.

    topology = Topology.of(project.routes.values(), project.settings.queue_prefix)
    topology.route("adt-inbound").dead_letter   # "adt-inbound.dlq"
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from middleware.broker import naming
from middleware.broker.base import Broker
from middleware.delivery.base import RetryPolicy
from middleware.ordering import Ordering, partition_delivery_limit

if TYPE_CHECKING:
    from middleware.route import Route


@dataclass(frozen=True)
class RouteTopology:
    """The names of one route's queues and exchange (``prefix`` already applied).

    ``deliveries`` maps each connector the route delivers to onto its delivery queue, in the
    route's ``deliver:`` order; ``delays`` maps it onto its retry policy's delay tiers (seconds),
    one delay queue each. An ordered delivery (``ordered``: connector -> its ordering) has no
    delivery queue: a consistent-hash exchange bound to the events exchange feeds its partition
    queues, one active consumer each; the route's inbound queue is then single-active-consumer too.
    ``max_ages`` maps each ordered delivery onto its retry policy's ``max_age`` (None: forever),
    which sizes its partition queues' delivery limit.
    """

    route: str
    prefix: str
    inbound: str
    exchange: str
    deliveries: Mapping[str, str]
    dead_letter: str
    delays: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    ordered: Mapping[str, Ordering] = field(default_factory=dict)
    max_ages: Mapping[str, float | None] = field(default_factory=dict)

    @classmethod
    def of(cls, route: Route, prefix: str = "") -> RouteTopology:
        """The topology of ``route`` under ``prefix``."""
        return cls(route=route.name, prefix=prefix,
                   inbound=naming.inbound_queue(route.source_queue, prefix),
                   exchange=naming.events_exchange(prefix),
                   deliveries={rule.connector: naming.delivery_queue(route.name, rule.connector, prefix)
                               for rule in route.deliver if rule.ordering is None},
                   ordered={rule.connector: rule.ordering for rule in route.deliver if rule.ordering is not None},
                   dead_letter=naming.dead_letter_queue(route.name, prefix),
                   delays={rule.connector: (rule.retry or RetryPolicy()).delays for rule in route.deliver},
                   max_ages={rule.connector: (rule.retry or RetryPolicy()).max_age for rule in route.deliver
                             if rule.ordering is not None})

    @property
    def binding_key(self) -> str:
        """The routing-key pattern binding each delivery queue to the events exchange."""
        return f"{self.route}.#"

    def delivery(self, connector: str) -> str:
        """The delivery queue to ``connector``; raises ``KeyError`` if the route does not deliver there."""
        return self.deliveries[connector]

    def delay(self, connector: str, seconds: int) -> str:
        """The delay queue of a delivery to ``connector`` waiting ``seconds`` (a parked delivery waits there)."""
        self.delivery(connector)  # an unknown connector is a KeyError here too
        return naming.delay_queue(self.route, connector, seconds, self.prefix)

    def delay_queues(self, connector: str) -> list[tuple[int, str]]:
        """``(seconds, queue)`` of each delay tier of the delivery to ``connector``, shortest first."""
        return [(seconds, self.delay(connector, seconds)) for seconds in sorted(set(self.delays.get(connector, ())))]

    def partition(self, connector: str, partition: int) -> str:
        """Partition queue ``partition`` of an ordered delivery to ``connector`` (``KeyError`` if the
        route does not deliver there)."""
        if connector not in self.ordered:
            self.delivery(connector)
        return naming.partition_queue(self.route, connector, partition, self.prefix)

    def partition_queues(self, connector: str) -> list[str]:
        """Every partition queue of the ordered delivery to ``connector``, ``.p0`` first."""
        return [self.partition(connector, n) for n in range(self.ordered[connector].partitions)]

    def partition_exchange(self, connector: str) -> str:
        """The consistent-hash exchange of the ordered delivery to ``connector``."""
        self.ordered[connector]  # an unordered or unknown connector is a KeyError
        return naming.partition_exchange(self.route, connector, self.prefix)

    @property
    def exchanges(self) -> list[str]:
        """The consistent-hash exchanges of the route's ordered deliveries (the events exchange is shared)."""
        return [self.partition_exchange(connector) for connector in self.ordered]

    @property
    def work_queues(self) -> list[str]:
        """Queues that workers consume: inbound, then each delivery queue, then each partition queue."""
        return [self.inbound, *self.deliveries.values(), *(q for c in self.ordered for q in self.partition_queues(c))]

    @property
    def parking_queues(self) -> list[str]:
        """Every delay queue of the route's (unordered) deliveries: where deliveries wait while parked."""
        return [queue for connector in self.deliveries for _, queue in self.delay_queues(connector)]

    @property
    def pending_queues(self) -> list[str]:
        """Queues whose messages are work still to do: the work queues, then the delay queues."""
        return [*self.work_queues, *self.parking_queues]

    @property
    def queues(self) -> list[str]:
        """Every queue the route declares: inbound, delivery queues, delay queues, dead letters."""
        return [*self.pending_queues, self.dead_letter]


@dataclass(frozen=True)
class Topology:
    """The topology of every route of a project, by route name (sorted)."""

    routes: Mapping[str, RouteTopology]
    prefix: str = ""

    @classmethod
    def of(cls, routes: Iterable[Route], prefix: str = "") -> Topology:
        """The topology of ``routes`` under ``prefix`` (``project.routes.values()``)."""
        return cls({r.name: RouteTopology.of(r, prefix) for r in sorted(routes, key=lambda r: r.name)}, prefix)

    def route(self, name: str) -> RouteTopology:
        """One route's topology; raises ``KeyError`` for an unknown route."""
        return self.routes[name]

    def __iter__(self) -> Iterator[RouteTopology]:
        return iter(self.routes.values())

    @property
    def work_queues(self) -> list[str]:
        """Every inbound, delivery and partition queue (what ``status`` watches)."""
        return [queue for route in self for queue in route.work_queues]

    @property
    def pending_queues(self) -> list[str]:
        """Every work and delay queue: messages there are not done yet (what ``Engine.is_idle`` watches;
        a delivery parked while its sink is down sits in a delay queue, in no work queue)."""
        return [queue for route in self for queue in route.pending_queues]

    @property
    def queues(self) -> list[str]:
        """Every queue of every route, dead-letter queues included (what clean-up deletes)."""
        return list(dict.fromkeys(queue for route in self for queue in route.queues))

    @property
    def exchanges(self) -> list[str]:
        """Every exchange the routes declare (the events exchange, ordered deliveries' hash exchanges)."""
        return [naming.events_exchange(self.prefix), *(exchange for route in self for exchange in route.exchanges)]


async def declare(broker: Broker, topology: RouteTopology, delivery_limit: int) -> None:
    """Declare a route's dead-letter, inbound, delivery and delay queues, the events exchange and bindings.

    The engine, the publisher and the gateways all declare through this, so every declaration of a
    queue carries the same arguments (RabbitMQ refuses a redeclaration with different ones).
    """
    await broker.declare_queue(topology.dead_letter, kind="dead-letter")
    inbound_kind = "ordered" if topology.ordered else "work"  # per-key order starts at the route worker
    await broker.declare_queue(topology.inbound, kind=inbound_kind, dead_letter_to=topology.dead_letter,
                               delivery_limit=delivery_limit)
    await broker.declare_exchange(topology.exchange)
    for queue in topology.deliveries.values():
        await broker.declare_queue(queue, kind="work", dead_letter_to=topology.dead_letter,
                                   delivery_limit=delivery_limit)
        await broker.bind(queue, topology.exchange, topology.binding_key)
    for connector, queue in topology.deliveries.items():
        for seconds, delay in topology.delay_queues(connector):  # a parked delivery waits there, then returns
            await broker.declare_queue(delay, kind="delay", dead_letter_to=queue, message_ttl=seconds)
    for connector, ordering in topology.ordered.items():  # events -> hash exchange (by key header) -> partitions
        exchange = topology.partition_exchange(connector)
        await broker.declare_exchange(exchange, hash_header=ordering.header)
        await broker.bind_exchange(exchange, topology.exchange, topology.binding_key)
        # a failing event is returned to its partition once per hold window until its max_age
        limit = partition_delivery_limit(delivery_limit, topology.max_ages.get(connector, RetryPolicy().max_age))
        for queue in topology.partition_queues(connector):
            await broker.declare_queue(queue, kind="ordered", dead_letter_to=topology.dead_letter,
                                       delivery_limit=limit)
            await broker.bind(queue, exchange, "1")  # equal weights: keys spread evenly


async def delete(broker: Broker, topology: Topology) -> list[str]:
    """Delete every queue and exchange of ``topology`` (messages in them too); their names."""
    for queue in topology.queues:
        await broker.delete_queue(queue)
    for exchange in topology.exchanges:
        await broker.delete_exchange(exchange)
    return [*topology.queues, *topology.exchanges]
