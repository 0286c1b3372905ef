"""Ingest gateways: how source systems that cannot speak AMQP get messages onto route queues.

Each gateway publishes raw bytes to a route's inbound queue and answers the sender only after
the broker confirmed the message. Settings come from ``ingest.<kind>[]`` in config/middleware.yaml;
each kind is one module that registers its factory and the spec of one listener entry
(:func:`register`), found through a ``middleware.ingest`` entry point. The engine starts every
configured listener through :func:`make_gateway`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from middleware import spec as registry

if TYPE_CHECKING:
    from middleware.broker.base import Broker
    from middleware.observe import Metrics
    from middleware.project import Settings
    from middleware.route import Route


class Gateway(Protocol):
    """A running listener: binds in :meth:`start`, answers senders after the broker's confirm."""

    port: int  # the bound port once started

    async def start(self, *, declare: bool = True) -> None:
        """Bind and listen; declare the routes' queues first unless ``declare`` is False."""

    async def stop(self) -> None:
        """Stop taking messages, let those in flight finish, close."""


@dataclass(frozen=True)
class GatewayContext:
    """What every gateway is built with, beside its listener entry."""

    broker: Broker
    settings: Settings
    routes: Mapping[str, Route]
    metrics: Metrics | None = None


GatewayFactory = Callable[[Any, GatewayContext], Gateway]


def register(kind: str, spec: Mapping[str, Any]) -> Callable[[GatewayFactory], GatewayFactory]:
    """Decorator: ``factory(listener, context)`` builds the gateway of an ``ingest.<kind>[]`` entry;
    ``spec`` is the JSON Schema of one entry (``validate`` checks each entry against it)."""

    def add(factory: GatewayFactory) -> GatewayFactory:
        registry.register("ingest", kind, spec, factory)
        return factory

    return add


def gateway_specs() -> dict[str, Mapping[str, Any]]:
    """The spec of one listener entry, by gateway kind (the ``ingest:`` keys of the config)."""
    return {kind: item.spec for kind, item in registry.components("ingest").items()}


def make_gateway(kind: str, listener: Any, context: GatewayContext) -> Gateway:
    """Build the gateway for one ``ingest.<kind>[]`` entry; raises ``KeyError`` for an unknown kind."""
    gateway: Gateway = registry.component("ingest", kind).factory(listener, context)
    return gateway


@dataclass(frozen=True)
class MllpTls:
    """``tls:`` of an MLLP listener: the server's certificate, and client certificates if ``ca_file``.

    Paths are absolute once the project is loaded (relative ones are taken from the project folder).
    ``require_client_cert``: refuse senders without a certificate signed by ``ca_file`` (mutual TLS);
    otherwise a certificate a sender offers is still checked against ``ca_file``.
    """

    cert_file: str
    key_file: str
    ca_file: str | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class MllpListener:
    """One ``ingest.mllp[]`` entry: an MLLP (HL7 over TCP) listener feeding one route queue.

    ``ack``: ``after-confirm`` (default) sends the HL7 ACK only once the broker confirmed the
    message; ``none`` sends no ACK (senders that do not read them).

    Limits (docs/operations.md, "MLLP gateway"): ``max_connections`` open at once (more are closed
    at accept); ``max_message_bytes`` per frame; ``max_buffered_bytes`` for the unfinished frames of
    all connections together (past it the connection holding the most is dropped);
    ``frame_timeout`` seconds from a start block to its end block; ``idle_timeout`` seconds
    without a byte. ``allowed_peers``: IP addresses or CIDR networks allowed to connect (empty: any).
    """

    name: str
    port: int
    queue: str  # a route's source.queue (without the queue prefix)
    host: str = "127.0.0.1"
    ack: str = "after-confirm"
    max_message_bytes: int = 1_048_576
    idle_timeout: float = 300.0
    frame_timeout: float = 60.0
    max_connections: int = 500
    max_buffered_bytes: int = 33_554_432
    allowed_peers: tuple[str, ...] = ()
    tls: MllpTls | None = None
    file: str = ""
    line: int = 0


ServerTls = MllpTls  # the ``tls:`` block of any ingest listener (HTTP uses the same keys as MLLP)


@dataclass(frozen=True)
class HttpRateLimit:
    """``rate_limit:`` of an HTTP listener: a token bucket of ``burst`` requests refilled at ``per_second``."""

    per_second: float
    burst: int


@dataclass(frozen=True)
class HttpListener:
    """One ``ingest.http[]`` entry: an HTTP endpoint (``POST /v1/routes/{route}/messages``).

    ``bearer_tokens`` (``Authorization: Bearer``) and ``api_keys`` (``X-API-Key``) are the secrets a
    caller may present, from ``${ENV}``; at least one must be set when the listener starts.
    ``routes``: the route names it accepts (empty: every route). ``max_body_bytes`` per request;
    ``rate_limit`` for the whole listener; ``idempotency_window`` seconds an ``Idempotency-Key`` is
    remembered (in memory, per process: at most ``idempotency_max_keys``); ``confirm_timeout``
    seconds to wait for the broker's confirms before answering 503. docs/ingest.md has the contract.
    """

    name: str
    port: int
    host: str = "127.0.0.1"
    bearer_tokens: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    max_body_bytes: int = 10_485_760
    rate_limit: HttpRateLimit | None = None
    idempotency_window: float = 86_400.0
    idempotency_max_keys: int = 10_000
    confirm_timeout: float = 10.0
    allowed_peers: tuple[str, ...] = ()  # IPs / CIDR networks allowed to call (empty: any); others get 403
    tls: ServerTls | None = None
    file: str = ""
    line: int = 0


@dataclass(frozen=True)
class FolderListener:
    """One ``ingest.folder[]`` entry: a watched inbox whose files are published to one route.

    ``path`` (the inbox), ``done`` and ``failed`` are absolute once the project is loaded (relative
    ones are taken from the project folder; ``done``/``failed`` default to ``done/`` and ``failed/``
    beside the inbox's own ``processing/``). A file is taken when ``pattern`` (a glob) matches its name
    and it is complete: its size and modification time unchanged for ``min_age`` seconds
    (``complete: stable``), or a ``<name>.done`` marker beside it (``complete: marker``). The inbox is
    looked at every ``poll_interval`` seconds. ``ledger``: the folder of the ingest ledger (checkpoints
    for resume, finished files), set by the loader. docs/ingest.md, "Watched folder".
    """

    name: str
    path: str
    route: str = ""  # the route its files are published to, or
    queue: str = ""  # the route's source queue
    pattern: str = "*"
    complete: str = "stable"
    min_age: float = 2.0
    poll_interval: float = 1.0
    done: str = ""
    failed: str = ""
    ledger: str = ""
    file: str = ""
    line: int = 0
