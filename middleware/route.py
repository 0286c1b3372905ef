"""The pure route pipeline: (route, raw bytes) -> canonical events, or a typed error.

parse -> filter -> pick event rules -> map -> validate -> envelope. No I/O: the same function
serves ``middleware transform``, ``middleware test`` and the route worker.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from middleware.delivery.base import RetryPolicy
from middleware.delivery.outbound import Outbound
from middleware.envelope import build_event, resolve_correlation_id, rfc3339, rfc3339_when
from middleware.errors import (
    FilterError,
    MappingError,
    ParseError,
    PipelineError,
    SchemaValidationError,
)
from middleware.formats import Format, SplitInfo
from middleware.mapping import Condition, FieldRule, Template, apply_rules, data_get
from middleware.ordering import Ordering
from middleware.schemas import EventSchema

if TYPE_CHECKING:
    from middleware.journal.config import Sla

_DATA_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_STAGE_ERRORS: dict[str, type[PipelineError]] = {
    "parse": ParseError, "filter": FilterError, "map": MappingError, "validate": SchemaValidationError,
}


@dataclass(frozen=True)
class EventRule:
    """``events[i]`` of a route: when it applies and how its data is mapped."""

    type: str
    version: int
    schema: EventSchema
    fields: tuple[FieldRule, ...]
    when: Condition | None = None
    subject: str | None = None  # template over data paths, e.g. "Patient/{patient.mrn}"
    line: int = 0
    for_each: str | None = None  # one event per group anchored at this (``ORC``, ``OBR``, ``PID``)

    @property
    def name(self) -> str:
        return f"{self.type}.v{self.version}"

    def groups(self, fmt: Format, doc: Any) -> list[Any]:
        """What this rule maps: the whole document, or with ``for_each`` one view per group (paths in
        it read the group's segments, header segments such as MSH/EVN/PID the message's)."""
        if self.for_each is None:
            return [doc]
        found = fmt.each(doc, self.for_each)
        if not found:
            raise MappingError(f"rule {self.name}: no {self.for_each} in the message (for_each: {self.for_each})",
                               hint="fix the source message, or add a rule without for_each for such messages")
        return found

    def render_subject(self, data: dict[str, Any]) -> str | None:
        """The ``subject`` with its ``{data.path}`` placeholders filled; None when one of them is absent."""
        if self.subject is None:
            return None
        pieces = _template_pieces(self.subject)
        out = []
        for number, piece in enumerate(pieces):
            if number % 2:  # odd places hold the placeholders' paths
                value = data_get(data, piece)
                if value is None:
                    return None
                piece = str(value)
            out.append(piece)
        return "".join(out)


@lru_cache(maxsize=256)
def _template_pieces(text: str) -> tuple[str, ...]:
    """Literal text and placeholder paths alternating (``Patient/{patient.mrn}`` -> ``Patient/``, ``patient.mrn``,
    ``""``), split once per template."""
    return tuple(_DATA_PLACEHOLDER.split(text))


def subject_placeholders(template: str) -> list[str]:
    """The data paths a ``subject`` template refers to."""
    return _DATA_PLACEHOLDER.findall(template)


@dataclass(frozen=True)
class DeliveryRule:
    """``deliver[i]``: a connector name, an optional retry policy override and the entry's
    ``when:`` / ``map:`` (:class:`middleware.delivery.outbound.Outbound`, None without them)."""

    connector: str
    retry: RetryPolicy | None = None
    outbound: Outbound | None = None
    ordering: Ordering | None = None  # ``ordering:``: per-key order through partition queues


@dataclass(frozen=True)
class Route:
    """A compiled route; built once by :mod:`middleware.project`."""

    name: str
    source_queue: str
    format: Format
    events: tuple[EventRule, ...]
    deliver: tuple[DeliveryRule, ...] = ()
    filter: Condition | None = None
    match: str = "first"  # "first" matching event rule, or "all" of them
    validation: str = "lenient"  # "strict": the format also checks the message's structure
    description: str = ""
    file: str = ""
    line: int = 0
    sla: Sla | None = None  # sla: deliver_within, silent_after, max_error_rate (docs/routes.md)


@dataclass(frozen=True)
class MessageContext:
    """What the transport knows about a message besides its bytes."""

    correlation_id: str | None = None  # AMQP correlation_id
    header_correlation_id: str | None = None  # X-Correlation-ID header
    message_id: str | None = None  # AMQP message_id
    received_at: dt.datetime | None = None
    batch_id: str | None = None  # x-mw-batch-id header: the batch a record was split from
    batch_position: str | None = None  # x-mw-batch-position header: the record's place in it


_NO_CONTEXT = MessageContext()
_UTC = ZoneInfo("UTC")


@dataclass
class Outcome:
    """Result of running a route on one message."""

    correlation_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    filtered: bool = False
    message_type: str | None = None
    source_id: str | None = None  # the message's own id (HL7 MSH-10, a FHIR resource id), for the journal


def source_identity(doc: Any, raw: bytes, context: MessageContext) -> tuple[str, ...]:
    """What event ids are derived from: the document's own identity (each format says what it is; a
    digest of the bytes for a format that does not), plus the batch id and position of a batch record."""
    identify = getattr(doc, "source_identity", None)
    parts = tuple(identify()) if callable(identify) else ("sha256:" + hashlib.sha256(raw).hexdigest(),)
    if context.batch_id is not None or context.batch_position is not None:
        parts += ("batch", context.batch_id or "", context.batch_position or "")
    return parts


def transform(route: Route, raw: bytes, context: MessageContext | None = None,
              tz: ZoneInfo | None = None) -> Outcome:
    """Run ``route`` on ``raw``. Raises a :class:`PipelineError` carrying route, stage and
    correlation id; any other exception is a bug and is wrapped as such by the caller."""
    context = context or _NO_CONTEXT
    tz = tz or _UTC
    correlation_id = context.correlation_id or context.header_correlation_id or ""
    stage = "parse"
    try:
        doc = route.format.parse(raw)
        correlation_id = resolve_correlation_id(context.correlation_id, doc.message_id,
                                                context.header_correlation_id)
        if route.validation == "strict":
            route.format.check_structure(doc)  # type: ignore[attr-defined]  # checked by the loader
        outcome = Outcome(correlation_id, message_type=doc.message_type, source_id=doc.message_id)
        stage = "filter"
        if route.filter is not None and not route.filter.matches(doc):
            unsplit = getattr(doc, "unsplit_reason", None)  # a FHIR Bundle: a container, not a resource
            if unsplit:
                raise FilterError(unsplit, hint="publish it through the publisher (publish, HTTP ingest), which "
                                                "splits bundles unless source.split is false, or give the route "
                                                "rules for the Bundle's type")
            if route.filter.lacks_trigger(doc):  # a v2.1 ``ADT`` without EVN-1: neither in nor out
                raise FilterError(f"MSH-9 {doc.message_type} has no trigger event and none can be inferred",
                                  hint=f"send the trigger (MSH-9.2 or EVN-1), or list {doc.message_type} in "
                                       "the route's filter and give it an event rule")
            outcome.filtered = True
            return outcome
        stage = "map"
        rules = [r for r in route.events if r.when is None or r.when.matches(doc)]
        if not rules:
            raise MappingError(f"no event rule matches message type {doc.message_type or '(none)'}",
                               hint="add an events rule for it, or exclude it with the route's filter")
        if route.match == "first":
            rules = rules[:1]
        identity = source_identity(doc, raw, context)
        occurred_when = getattr(doc, "occurred_when", None)  # HL7 v2: the checked value, not its ISO text
        time = rfc3339_when(occurred_when(), tz) if occurred_when else rfc3339(doc.occurred_at(), tz)
        if time is None:
            time = (context.received_at or dt.datetime.now(dt.UTC)).isoformat().replace("+00:00", "Z")
        index = 0  # distinct per event of this message (with for_each: the group's position)
        for rule in rules:
            groups = rule.groups(route.format, doc)
            for number, group in enumerate(groups, start=1):
                where = f"{rule.for_each}[{number}] " if rule.for_each else ""
                try:
                    data = apply_rules(rule.fields, group, tz=tz)
                except MappingError as exc:
                    exc.message = f"rule {rule.name}: {where}{exc.message}"
                    raise
                stage = "validate"
                try:
                    rule.schema.validate(data)
                except SchemaValidationError as exc:
                    exc.message = f"{where}{exc.message}"
                    raise
                stage = "map"
                outcome.events.append(build_event(
                    route=route.name, event_type=rule.type, major=rule.version, index=index,
                    source_identity=identity, data=data, subject=rule.render_subject(data),
                    time=time, correlation_id=correlation_id))
                index += 1
        return outcome
    except PipelineError as exc:
        raise exc.with_context(route=route.name, correlation_id=correlation_id or None) from None
    except Exception as exc:  # a bug must not crash the worker: the message dead-letters instead
        raise _STAGE_ERRORS[stage](
            f"internal error {type(exc).__name__} while processing (stage {stage})",
            route=route.name, correlation_id=correlation_id or None,
            hint="this is a middleware bug: report it with the dead letter's correlation id",
        ) from exc


def transform_split(route: Route, raw: bytes, context: MessageContext | None = None,
                    tz: ZoneInfo | None = None) -> Outcome:
    """:func:`transform` on each record of ``raw`` as publishing splits it (``Format.split``: a FHIR
    Bundle gives its entries), with the batch id and position a published record carries: one outcome
    with every record's events in order, filtered only when every record was. The first record that
    fails raises, as its dead letter would."""
    context = context or MessageContext()
    info = SplitInfo()
    records = list(route.format.split(io.BytesIO(raw), info))
    if len(records) == 1 and records[0].position is None:
        return transform(route, records[0].raw, context, tz)
    merged: Outcome | None = None
    for record in records:
        if record.error is not None:
            raise ParseError(record.error, route=route.name, hint="the record is dead-lettered when published")
        batch = replace(context, batch_id=info.batch_id, batch_position=str(record.position))
        outcome = transform(route, record.raw, batch, tz)
        if merged is None:
            merged = outcome
        else:
            merged.events.extend(outcome.events)
            merged.filtered = merged.filtered and outcome.filtered
    if merged is None:  # nothing to publish (a FHIR subscription heartbeat)
        return Outcome(context.correlation_id or "", filtered=True, message_type=info.feed)
    return merged


__all__ = ["DeliveryRule", "EventRule", "MessageContext", "Outcome", "Route", "Template", "transform",
           "transform_split"]
