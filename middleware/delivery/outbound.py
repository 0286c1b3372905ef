"""What one delivery sends: its ``when:`` filter and its optional outbound ``map:``.

Both read the CloudEvent JSON with the route language's own pieces (:mod:`middleware.mapping`
over :mod:`middleware.formats.json_format` paths), so ``data.patient.mrn``, ``subject`` and ``id``
are paths, and conditions are the ``equals`` / ``exists`` / ``missing`` of ``filter:``, plus
``type`` (event types: ``patient.admitted`` matches every major, ``patient.admitted.v1`` one,
``patient.*`` a family). Pure and compiled once: the delivery worker runs :meth:`Outbound.prepare`
per message; other connectors (mllp, amqp) may call :func:`compile_map` / :meth:`OutboundMap.apply`.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from middleware.errors import MappingError
from middleware.formats.json_format import JsonDocument, JsonFormat
from middleware.mapping import (
    CONDITION_KEYS,
    Condition,
    FieldRule,
    LookupTable,
    SpecError,
    apply_rules,
    compile_condition,
    compile_field,
)

EVENT_FORMAT = JsonFormat()
MAPPED_CONTENT_TYPE = "application/json"
WHEN_KEYS = (CONDITION_KEYS - {"message_type"}) | {"type"}  # the route condition keys, type for message_type


def _event_type_matcher(pattern: str) -> str:
    """``patient.admitted`` -> ``patient.admitted.v*`` (every major); a pattern with a major or ``*`` as is."""
    last = pattern.rsplit(".", 1)[-1]
    if "*" in pattern or (last.startswith("v") and last[1:].isdigit()):
        return pattern
    return pattern + ".v*"


@dataclass(frozen=True)
class DeliveryFilter:
    """A compiled ``when:`` of a deliver entry: the event's type is one of ``types`` (when given) and
    the event matches ``condition`` (when given)."""

    types: tuple[str, ...] | None
    condition: Condition | None

    def matches(self, event: JsonDocument) -> bool:
        if self.types is not None:
            kind = event.data.get("type") if isinstance(event.data, dict) else None
            if not isinstance(kind, str) or not any(fnmatch.fnmatchcase(kind, t) for t in self.types):
                return False
        return self.condition is None or self.condition.matches(event)


def compile_when(spec: Any) -> DeliveryFilter:
    """Compile a deliver entry's ``when:``; raises :class:`SpecError` (its ``key`` names the bad key)."""
    if not isinstance(spec, dict) or not spec:
        raise SpecError("when is a mapping with type, equals, exists or missing")
    if "message_type" in spec:
        raise SpecError("a delivery sees events, not messages: use type: (an event type such as "
                        "patient.admitted)", "message_type")
    for key in spec:
        if key not in WHEN_KEYS:
            raise SpecError(f"unknown condition {key!r} (use {', '.join(sorted(WHEN_KEYS))})", key)
    types: tuple[str, ...] | None = None
    if "type" in spec:
        items = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        if not items or not all(isinstance(t, str) and t for t in items):
            raise SpecError("type takes an event type or a list of them, e.g. patient.admitted", "type")
        types = tuple(_event_type_matcher(t) for t in items)
    rest = {k: v for k, v in spec.items() if k != "type"}
    condition = compile_condition(rest, EVENT_FORMAT) if rest else None
    return DeliveryFilter(types, condition)


@dataclass(frozen=True)
class OutboundMap:
    """A compiled outbound ``map:``: target path in the outgoing document -> source over the CloudEvent.
    A target step may carry an index (``identifier[0].value``) to build a list."""

    rules: tuple[FieldRule, ...]

    def apply(self, event: Mapping[str, Any] | JsonDocument, tz: dt.tzinfo | None = None) -> dict[str, Any]:
        """The outgoing document; raises :class:`MappingError` (stage ``map``) naming the target."""
        doc = event if isinstance(event, JsonDocument) else JsonDocument(event)
        built: dict[str, Any] = _lists(apply_rules(self.rules, doc, tz=tz))
        return built


_INDEXED = re.compile(r"^(.+)\[(\d+)\]$")


def _lists(node: Any) -> Any:
    """Targets with an index (``identifier[0].value``, ``name[0].given[1]``) become list items, in index
    order (gaps closed): the outgoing document may need lists that the event does not have."""
    if isinstance(node, list):
        return [_lists(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    indexed: dict[str, dict[int, Any]] = {}
    for key, value in node.items():
        match = _INDEXED.match(key)
        if match:
            indexed.setdefault(match.group(1), {})[int(match.group(2))] = _lists(value)
        else:
            out[key] = _lists(value)
    for key, items in indexed.items():
        out[key] = [items[i] for i in sorted(items)]
    return out


def compile_map(spec: Any, lookups: Mapping[str, LookupTable] | None = None) -> OutboundMap:
    """Compile an outbound ``map:`` (the route ``map`` language with JSON paths into the event);
    raises :class:`SpecError` naming the target."""
    if not isinstance(spec, dict) or not spec:
        raise SpecError("map is a mapping of target paths to sources over the event (e.g. data.patient.mrn)")
    rules = []
    for target, source in spec.items():
        try:
            rules.append(compile_field(str(target), source, EVENT_FORMAT, lookups or {}))
        except SpecError as exc:
            raise SpecError(str(exc), str(target)) from None
    return OutboundMap(tuple(rules))


@dataclass(frozen=True)
class Outbound:
    """A deliver entry's ``when`` and ``map`` together."""

    when: DeliveryFilter | None = None
    map: OutboundMap | None = None

    def prepare(self, body: bytes) -> tuple[bytes, str] | None:
        """What to send for the CloudEvent ``body``: ``(bytes, content type)``, or None when ``when``
        does not match (the delivery skips it). A map that fails raises :class:`MappingError`; an event
        that is not JSON raises it too (it cannot have come from a route)."""
        try:
            event = JsonDocument(orjson.loads(body))
        except orjson.JSONDecodeError:
            raise MappingError("the delivered message is not a JSON CloudEvent",
                               hint="only events published by a route can be delivered") from None
        if self.when is not None and not self.when.matches(event):
            return None
        if self.map is None:
            return body, ""
        return orjson.dumps(self.map.apply(event)), MAPPED_CONTENT_TYPE
