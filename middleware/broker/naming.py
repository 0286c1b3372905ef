"""Naming rules for every queue and exchange, so operators can guess each name.

With ``prefix`` "" (the default) the names are:

- inbound queue: the route's ``source.queue`` as written, e.g. ``ehr.adt``;
- events exchange: ``middleware.events`` (topic), routing key ``<route>.<type>.v<major>``;
- delivery queue: ``<route>.to.<connector>``, e.g. ``adt-inbound.to.case-management``;
- delay queue: ``<route>.to.<connector>.delay.<seconds>`` (a retry waits there, then returns to the
  delivery queue);
- partition queue: ``<route>.to.<connector>.p<n>`` (ordered deliveries, one consumer each), fed by
  the consistent-hash exchange ``<route>.to.<connector>.partitions``;
- dead-letter queue: ``<route>.dlq``, one per route, whatever the stage that failed.

A prefix (config ``broker.queue_prefix`` or ``MIDDLEWARE_QUEUE_PREFIX``) is put in front of all
of them, so several environments or test runs can share one broker. These are the rules;
:class:`middleware.topology.RouteTopology` applies them to a route, and everything that needs a
route's queue list (declaring, ``status``, ``dlq``, clean-up) reads it from there.
"""

from __future__ import annotations

EVENTS_EXCHANGE = "middleware.events"


def inbound_queue(source_queue: str, prefix: str = "") -> str:
    """The queue a route consumes."""
    return prefix + source_queue


def events_exchange(prefix: str = "") -> str:
    """The topic exchange that routes publish canonical events to."""
    return prefix + EVENTS_EXCHANGE


def event_routing_key(route: str, event_type: str) -> str:
    """Routing key of an event: ``<route>.<type>.v<major>``; bind ``*.patient.admitted.v1`` to tap a type."""
    return f"{route}.{event_type}"


def delivery_queue(route: str, connector: str, prefix: str = "") -> str:
    """The queue a delivery worker consumes to send one route's events to one connector."""
    return f"{prefix}{route}.to.{connector}"


def dead_letter_queue(route: str, prefix: str = "") -> str:
    """Where everything a route could not parse, map, validate or deliver ends up."""
    return f"{prefix}{route}.dlq"


def delay_queue(route: str, connector: str, seconds: int, prefix: str = "") -> str:
    """Where a delivery waits ``seconds`` before it goes back to its delivery queue."""
    return f"{delivery_queue(route, connector, prefix)}.delay.{seconds}"


def partition_queue(route: str, connector: str, partition: int, prefix: str = "") -> str:
    """Partition ``partition`` of an ordered delivery (consistent-hash exchange in front)."""
    return f"{delivery_queue(route, connector, prefix)}.p{partition}"


def partition_exchange(route: str, connector: str, prefix: str = "") -> str:
    """The consistent-hash exchange in front of an ordered delivery's partition queues."""
    return f"{delivery_queue(route, connector, prefix)}.partitions"
