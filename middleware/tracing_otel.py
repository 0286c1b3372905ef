"""Tracing on: the OpenTelemetry SDK behind :mod:`middleware.tracing` (imported only when enabled).

The engine owns its ``TracerProvider`` (the process-wide one is left alone): spans go through a
batch processor to the OTLP/HTTP exporter, or, when a test gives an exporter, straight to it.
Parents come from the message's ``traceparent`` header, never from an ambient context, so a span is
always parented on the message it is about.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from middleware import tracecontext
from middleware.tracing import Span, Tracing, TracingSettings

_KINDS = {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT,
          "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER}
_NAMED_BY = ("connector", "event_type", "route")  # the span name's second word: "deliver bed-board"


def _attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    """``mw.<key>`` for every value given (None left out; other types as text)."""
    return {f"mw.{key}": value if isinstance(value, str | bool | int | float) else str(value)
            for key, value in attributes.items() if value is not None}


def parent_context(traceparent: object) -> Context:
    """The context of a remote parent from a ``traceparent`` (text or bytes); an empty one (a new
    trace) when absent or invalid."""
    found = tracecontext.parse(traceparent)
    if found is None:
        return Context()
    trace_id, span_id, flags = found
    remote = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16)))
    return trace.set_span_in_context(NonRecordingSpan(remote), Context())


class OtelSpan(Span):
    """A live OpenTelemetry span."""

    __slots__ = ("_open", "_span", "_tracer", "traceparent")

    def __init__(self, span: trace.Span, tracer: trace.Tracer) -> None:
        self._span, self._tracer, self._open = span, tracer, True
        ctx = span.get_span_context()
        self.traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def child(self, name: str, kind: str = "internal", **attributes: Any) -> Span:
        context = trace.set_span_in_context(self._span, Context())
        return _start(self._tracer, name, context, kind, attributes)

    def set(self, **attributes: Any) -> None:
        self._span.set_attributes(_attributes(attributes))

    def end(self, outcome: str | None = None, error: BaseException | None = None, **attributes: Any) -> None:
        """End it once: a later call (a failure after the outcome was recorded) changes nothing."""
        if not self._open:
            return
        self._open = False
        if error is not None:
            attributes["error_class"] = type(error).__name__
            attributes.setdefault("stage", getattr(error, "stage", None))
            self._span.set_status(Status(StatusCode.ERROR, type(error).__name__))  # the class, not the text
        if outcome is not None:
            attributes["outcome"] = outcome
        if attributes:
            self._span.set_attributes(_attributes(attributes))
        self._span.end()


def _start(tracer: trace.Tracer, name: str, context: Context, kind: str, attributes: dict[str, Any]) -> OtelSpan:
    word = next((str(attributes[k]) for k in _NAMED_BY if attributes.get(k)), None)
    span = tracer.start_span(f"{name} {word}" if word else name, context=context, kind=_KINDS[kind],
                             attributes=_attributes(attributes), record_exception=False,
                             set_status_on_exception=False)
    return OtelSpan(span, tracer)


class OtelTracing(Tracing):
    """Tracing on: an own ``TracerProvider`` exporting over OTLP/HTTP (or to ``exporter``)."""

    enabled = True

    def __init__(self, settings: TracingSettings, exporter: SpanExporter | None = None) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": settings.service}))
        if exporter is None:
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("middleware")

    def start(self, name: str, parent: object, kind: str = "consumer", **attributes: Any) -> Span:
        return _start(self.tracer, name, parent_context(parent), kind, attributes)

    def shutdown(self) -> None:
        self.provider.shutdown()
