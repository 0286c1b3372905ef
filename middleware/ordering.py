"""Per-key order for one delivery: ``ordering: {key: patient.mrn, partitions: 8}`` on a ``deliver:`` entry.

The pure part of the feature (the worker is :mod:`middleware.delivery.ordered`, the queues are
:mod:`middleware.topology`'s):

- :class:`Ordering` is the compiled YAML block;
- :func:`order_headers` gives the headers the route worker puts on each event it publishes: one
  ``x-mw-order.<key>`` header per ordering key, valued with the key's value in the event. The
  delivery's consistent-hash exchange hashes that header, so every event of one key lands in
  the same partition queue, in publish order;
- :func:`ordering_problems` is what ``validate`` says about a block, at its line;
- :func:`partition_delivery_limit` sizes a partition queue's delivery limit so that a failing
  event held in place is given back to its partition (one return per :data:`HOLD_SECONDS`) until
  its ``max_age``, never dead-lettered sooner by the limit.

The key is ``subject`` (the CloudEvent's subject) or a dotted path into its ``data``
(``patient.mrn``). An event without a value for the key hashes the empty string: all such events
share one partition, still in order among themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

HEADER_PREFIX = "x-mw-order."
SUBJECT = "subject"
DEFAULT_PARTITIONS = 8
MAX_PARTITIONS = 256
# seconds an ordered delivery holds a failing event before it returns it to the head of its partition
# (below RabbitMQ's default consumer_timeout, 30 min, which would close the channel); read at call time
HOLD_SECONDS = 20 * 60.0
UNLIMITED_DELIVERIES = 2**31 - 1  # a partition queue's delivery limit for ``max_age: forever``

SCHEMA: dict[str, Any] = {  # the ``ordering:`` block of a deliver entry
    "type": "object",
    "additionalProperties": False,
    "required": ["key"],
    "properties": {
        "key": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_-]*(\\.[A-Za-z_][A-Za-z0-9_-]*)*$"},
        "partitions": {"type": "integer", "minimum": 1, "maximum": MAX_PARTITIONS},
    },
}


@dataclass(frozen=True)
class Ordering:
    """A delivery's ordering: events with the same ``key`` value are delivered one at a time, in
    publish order, through one of ``partitions`` partition queues."""

    key: str
    partitions: int = DEFAULT_PARTITIONS

    @property
    def header(self) -> str:
        """The message header that carries the key's value (the exchange's ``hash-header``)."""
        return HEADER_PREFIX + self.key

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> Ordering:
        """From a schema-valid YAML ``ordering:`` block."""
        return cls(str(spec["key"]), int(spec.get("partitions", DEFAULT_PARTITIONS)))


class _Ordered(Protocol):
    @property
    def ordering(self) -> Ordering | None: ...


def key_value(event: Mapping[str, Any], key: str) -> str:
    """The value of ``key`` in a CloudEvent as text ("" when the event has none)."""
    value: Any
    if key == SUBJECT:
        value = event.get("subject")
    else:
        value = event.get("data")
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def order_headers(rules: Iterable[_Ordered], event: Mapping[str, Any]) -> dict[str, str]:
    """``{header: value}`` for every ordering key among a route's deliver ``rules`` (empty when none)."""
    return {o.header: key_value(event, o.key) for rule in rules if (o := rule.ordering) is not None}


def partition_delivery_limit(delivery_limit: int, max_age: float | None, hold_seconds: float | None = None) -> int:
    """``x-delivery-limit`` of an ordered delivery's partition queues.

    Each hold window's return counts as a delivery, so the engine's ``delivery_limit`` (the
    deliveries a crash-looping message gets) is raised by the returns a wait of ``max_age`` takes
    (``max_age / hold_seconds``, one spare): the wait ends on ``max_age``, not on the limit
    (RabbitMQ's default consumer_timeout and 24 h: 10 + 73 = 83). ``max_age`` None (``forever``):
    no practical limit.
    """
    if max_age is None:
        return UNLIMITED_DELIVERIES
    hold = HOLD_SECONDS if hold_seconds is None else hold_seconds
    return min(delivery_limit + math.ceil(max_age / hold) + 1, UNLIMITED_DELIVERIES)


def ordering_problems(ordering: Ordering, map_targets: Sequence[Iterable[str]], subjects: Sequence[bool],
                      broker_url: str | None) -> list[tuple[tuple[str, ...], str]]:
    """``(key path under ordering, message)`` for a block that cannot work.

    ``map_targets``: each event rule's map targets; ``subjects``: whether each rule sets a
    ``subject``; ``broker_url``: the broker the engine will use (None offline: ``transform`` and
    ``test`` deliver nothing, so the broker does not matter).
    """
    problems: list[tuple[tuple[str, ...], str]] = []
    key = ordering.key
    if key == SUBJECT:
        if not any(subjects):
            problems.append((("key",), "ordering key 'subject': no event of this route sets a subject"))
    elif not any(_sets(targets, key) for targets in map_targets):
        every = sorted({t for targets in map_targets for t in targets})
        problems.append((("key",), f"ordering key {key!r} is not set by any event's map "
                                   f"(use 'subject' or one of: {', '.join(every)})"))
    if broker_url is not None and not broker_url.startswith(("amqp://", "amqps://")):
        problems.append(((), "ordering needs RabbitMQ (amqp:// or amqps://) with the "
                             "rabbitmq_consistent_hash_exchange plugin: the embedded broker has no "
                             "consistent-hash exchange (set broker.url or MIDDLEWARE_BROKER_URL, or remove ordering:)"))
    return problems


def _sets(targets: Iterable[str], key: str) -> bool:
    """Whether a map with ``targets`` sets data path ``key`` (itself, or an object that holds it)."""
    return any(key == t or key.startswith(t + ".") for t in targets)
