"""OpenTelemetry spans per hop, optional (``pip install 'middleware[otel]'``) and off by default.

``tracing:`` in config/middleware.yaml switches it on. Each hop then emits a span parented on the
message's W3C ``traceparent`` (:mod:`middleware.tracecontext`), and the traceparent the hop passes
on (the events it publishes, the request it sends downstream) is its own span's, so one trace
crosses the source system, every hop here and the receiving system:

    ingest <route>            producer   the gateway / publisher put the message on its queue
    route <route>             consumer   the route worker took it
      transform               internal   parse, filter, map, validate (``mw.stage`` where it failed)
      publish <event type>    producer   one per event
    deliver <connector>       consumer   one per handling of a delivery message (its attempts, outcome)

Attributes carry ids, route, stage, connector, attempts, outcome and error class: never payloads, never
error messages (they may quote a field's value).

Off (the default, or no ``tracing:``), nothing of OpenTelemetry is imported: every hook gets
:data:`NULL_SPAN`, whose methods do nothing, and the traceparents are made as before
(:mod:`middleware.tracecontext`). The SDK lives in :mod:`middleware.tracing_otel`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from middleware.errors import MiddlewareError

INSTALL_HINT = "pip install 'middleware[otel]'"
DEFAULT_SERVICE_NAME = "middleware"


class TracingError(MiddlewareError):
    """Tracing is switched on but cannot run (the ``otel`` extra is not installed)."""


@dataclass(frozen=True)
class TracingSettings:
    """``tracing:``: whether spans are emitted, where the OTLP/HTTP exporter sends them (None: the
    exporter's own default, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``
    or http://localhost:4318/v1/traces) and the ``service.name`` of the spans."""

    enabled: bool = False
    otlp_endpoint: str | None = None
    service_name: str | None = None  # None: OTEL_SERVICE_NAME, else "middleware"

    @property
    def service(self) -> str:
        return self.service_name or os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME


def available() -> bool:
    """True when the OpenTelemetry SDK and its OTLP/HTTP exporter can be imported (looked up, not imported)."""
    try:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http"))
    except ModuleNotFoundError:  # the opentelemetry namespace itself is absent
        return False


def missing_problem(settings: TracingSettings) -> str | None:
    """Why ``settings`` cannot run here (the extra is not installed), or None."""
    if settings.enabled and not available():
        return f"tracing.enabled is true but OpenTelemetry is not installed: {INSTALL_HINT}"
    return None


class Span:
    """A hop's span. This class is the one used when tracing is off: it does nothing, and its
    ``traceparent`` is None (the caller then makes one as it always did)."""

    __slots__ = ()
    traceparent: str | None = None  # this span's W3C traceparent, to pass on to the next hop

    def child(self, name: str, kind: str = "internal", **attributes: Any) -> Span:
        """A span inside this one (ended by the caller)."""
        return self

    def set(self, **attributes: Any) -> None:
        """Add attributes (``mw.<name>``; None values are left out)."""

    def end(self, outcome: str | None = None, error: BaseException | None = None, **attributes: Any) -> None:
        """End the span with its outcome (``mw.outcome``) and, on a failure, the error's class."""


NULL_SPAN = Span()


class Tracing:
    """Makes the spans of the hops. This class is tracing off: every span is :data:`NULL_SPAN`."""

    enabled = False

    def start(self, name: str, parent: object, kind: str = "consumer", **attributes: Any) -> Span:
        """A new span ``name`` (with the route or connector as its second word, when given), child
        of ``parent`` (a traceparent, text or bytes; absent or invalid: a new trace)."""
        return NULL_SPAN

    def shutdown(self) -> None:
        """Send what is still buffered and stop the exporter."""


NULL_TRACING = Tracing()


def open_tracing(settings: TracingSettings, exporter: Any = None) -> Tracing:
    """The tracing for ``settings``: :data:`NULL_TRACING` when off (nothing imported). ``exporter``
    (an OpenTelemetry ``SpanExporter``, tests pass an in-memory one) switches it on and replaces
    the OTLP exporter. Raises :class:`TracingError` when the ``otel`` extra is not installed."""
    if not settings.enabled and exporter is None:
        return NULL_TRACING
    try:
        from middleware import tracing_otel
    except ImportError as exc:
        raise TracingError(f"tracing is enabled but OpenTelemetry cannot be imported ({exc.name or exc})",
                           hint=INSTALL_HINT) from exc
    return tracing_otel.OtelTracing(settings, exporter)


def settings_of(block: Mapping[str, Any]) -> TracingSettings:
    """``tracing:`` of config/middleware.yaml (already schema-checked) as :class:`TracingSettings`."""
    return TracingSettings(enabled=bool(block.get("enabled", False)), otlp_endpoint=block.get("otlp_endpoint"),
                           service_name=block.get("service_name"))


def attach(publishers: Iterable[Any], tracing: Tracing) -> None:
    """Give publishers (a gateway's) the engine's tracing, for their ``ingest`` spans."""
    for publisher in publishers:
        publisher.tracing = tracing


SCHEMA: dict[str, Any] = {  # tracing: in config/middleware.yaml (middleware.project_schema)
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "enabled": {"type": "boolean"},
        "otlp_endpoint": {"type": "string", "pattern": "^https?://"},
        "service_name": {"type": "string", "minLength": 1},
    },
}
