"""What every connector type provides, and the registry keyed by the ``type`` used in YAML."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from middleware import spec as registry
from middleware.tracing import NULL_SPAN, Span


@dataclass(frozen=True)
class RetryPolicy:
    """How a delivery is retried (tenacity: exponential backoff with full jitter, bounded).

    Parameters:
        attempts: total tries including the first (1 = no retry).
        initial: first backoff in seconds; ``multiplier`` grows it up to ``max``.
        jitter: add up to this many seconds of random jitter to each wait.
        retry_on: outcomes that are retried: ``connection``, ``timeout``, ``429``, ``5xx``.
        delays: once the attempts in process are used up, the message waits on the broker this many
            seconds (one delay queue per tier, the last tier repeats) and is tried again.
        max_age: seconds after its first failure that a delivery is still retried (None: forever);
            after that, or on a non-retryable outcome, it is dead-lettered.
    """

    attempts: int = 5
    initial: float = 0.5
    max: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5
    retry_on: frozenset[str] = frozenset({"connection", "timeout", "429", "5xx"})
    delays: tuple[int, ...] = (5, 30, 300, 1800)
    max_age: float | None = 86400.0


@dataclass(frozen=True)
class BreakerPolicy:
    """A connector's circuit breaker: ``failures`` retryable failures in a row open it; while open its
    delivery consumers pause and one message is tried every ``probe_every`` seconds; a success closes it."""

    failures: int = 5
    probe_every: float = 30.0


@dataclass(frozen=True)
class ConnectorSpec:
    """A connector as declared in connectors/<name>.yaml, ``${VAR}`` already interpolated.

    ``options`` holds the type-specific keys (http: url, method, headers, timeout; file: path).
    """

    name: str
    type: str
    options: Mapping[str, Any] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    file: str = ""
    line: int = 0


@dataclass(frozen=True)
class Delivery:
    """One event to send: the CloudEvent JSON bytes plus the ids sinks need. With a deliver entry's
    outbound ``map:``, ``body`` is the mapped document and ``content_type`` says so (``application/json``)."""

    body: bytes
    event_id: str
    correlation_id: str
    route: str
    event_type: str
    content_type: str = "application/cloudevents+json"
    traceparent: str | None = None  # W3C trace context sent with it (middleware.tracecontext)
    span: Span = field(default=NULL_SPAN, compare=False, repr=False)  # its ``deliver`` span (middleware.tracing)

    @property
    def mapped(self) -> bool:
        """True when ``body`` is an outbound map's document rather than the CloudEvent."""
        return self.content_type != "application/cloudevents+json"


class Connector:
    """Sends events to one downstream system.

    :meth:`send` returns when the sink accepted the event (2xx, fsync, broker confirm) and raises
    :class:`middleware.errors.DeliveryError` otherwise, with ``retryable`` set per the
    connector's :class:`RetryPolicy` outcomes. Retrying is the caller's job (:mod:`.retry`).
    """

    def __init__(self, spec: ConnectorSpec) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self) -> None:
        """Open pools, files or connections."""

    async def send(self, delivery: Delivery) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what :meth:`start` opened."""

    def describe(self) -> str:
        """Where events go, for humans (``POST http://...``, a file path)."""
        return self.spec.type

    @staticmethod
    def check(options: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
        """``(key path, message)`` for options that cannot work together (the schema checked each
        key alone); ``middleware validate`` reports them at their line."""
        return []


ConnectorFactory = Callable[[ConnectorSpec], Connector]


def register(type_name: str, spec: Mapping[str, Any] | None = None) -> Callable[[ConnectorFactory], ConnectorFactory]:
    """Decorator: make a connector class available as ``type: <type_name>`` in YAML.

    ``spec`` is the JSON Schema of its own keys (beside ``connector``, ``type``, ``description``,
    ``retry``): ``validate`` checks a connector file against it and docs/ print it
    (:mod:`middleware.spec`). The module is found through a ``middleware.connectors`` entry point.
    """

    def add(factory: ConnectorFactory) -> ConnectorFactory:
        registry.register("connector", type_name, spec, factory)
        return factory

    return add


def connector_types() -> list[str]:
    """Every registered connector type."""
    return list(registry.components("connector"))


def make_connector(spec: ConnectorSpec) -> Connector:
    """Build the connector for ``spec.type``; raises ``KeyError`` for an unknown type."""
    connector: Connector = registry.component("connector", spec.type).factory(spec)
    return connector


def connector_problems(type_name: str, options: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """What ``validate`` finds wrong in a schema-valid connector of ``type_name`` (see :meth:`Connector.check`)."""
    component = registry.components("connector").get(type_name)
    check = getattr(component.factory, "check", None) if component else None
    return list(check(options)) if check is not None else []
