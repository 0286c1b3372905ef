"""Outbound HL7 v2 templates: a canonical event -> an ER7 message (pure; no sockets, no clock).

A template names the message type and, per segment, which event value goes into which field:
``PID-5.1 <- patient.name.family``. Sources are dotted paths into the event's ``data``; ``@time``,
``@id``, ``@subject``, ``@type`` and ``@correlationid`` read the CloudEvent's own attributes. A
segment with ``for_each`` repeats once per item of a list (``OBX`` per observation); inside it,
paths are relative to the item and ``.`` is the item itself. Every value is escaped for the
delimiters (``|`` -> ``\\F\\``, ``^`` -> ``\\S\\``, ``~`` -> ``\\R\\``, ``\\`` -> ``\\E\\``,
``&`` -> ``\\T\\``); line breaks become ``\\.br\\``.

Built-in templates: ``patient.admitted`` -> ADT^A01, ``patient.transferred`` -> ADT^A02,
``patient.discharged`` -> ADT^A03, ``patient.registered`` -> ADT^A04, ``patient.updated`` -> ADT^A08,
``result.reported`` -> ORU^R01.
A connector's ``templates:`` block changes or removes fields of a built-in one, or declares a
template for another event type (:func:`from_yaml`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from middleware import dates
from middleware.formats.hl7v2 import DEFAULT_DELIMITERS, Delimiters, escape

_CONVERSIONS = ("date", "datetime", "value", "value_type")


class TemplateError(ValueError):
    """The event cannot be written with this template (a required value missing, a value of the wrong kind)."""


@dataclass(frozen=True)
class Target:
    """Where a value goes inside a segment: field, repetition, component, subcomponent (1-based)."""

    field: int
    repetition: int | None = None  # None: the first, or one per item when the value is a list
    component: int = 1
    subcomponent: int = 1

    @classmethod
    def parse(cls, text: str) -> Target:
        """``5``, ``5.1``, ``3[2].1``, ``3.1.2`` (the part after ``SEG-``)."""
        head, *rest = text.split(".")
        repetition = None
        if head.endswith("]") and "[" in head:
            head, _, index = head[:-1].partition("[")
            repetition = int(index)
        numbers = [int(part) for part in rest]
        if len(numbers) > 2 or not head.isdigit() or min([int(head), *numbers]) < 1 or (repetition or 1) < 1:
            raise ValueError(f"not an HL7 field path: {text!r} (write e.g. 5, 5.1, 3[2].1, 3.1.2)")
        return cls(int(head), repetition, *numbers)


@dataclass(frozen=True)
class Source:
    """Where a value comes from: an event path, a constant, or the item's number in its ``for_each``.

    ``map`` translates values (``male: M``; ``default`` for the rest), ``as`` converts them:
    ``date`` / ``datetime`` (ISO 8601 -> HL7 DT / DTM at the precision sent), ``value`` (an OBX-5
    typed value: number, text, code, structured numeric) and ``value_type`` (OBX-2 of an
    observation: its ``value_type``, else guessed from its value).
    """

    path: str | None = None
    constant: str | None = None
    seq: bool = False
    convert: str | None = None
    table: Mapping[str, str] | None = None
    default: str | None = None
    required: bool = False

    @classmethod
    def parse(cls, spec: Any) -> Source:
        """A YAML source: ``patient.mrn``, ``{path, as, map, default, required}``, ``{value: MR}``, ``{seq: true}``."""
        if isinstance(spec, str):
            return cls(path=spec)
        if not isinstance(spec, Mapping):
            raise ValueError(f"a source is a path or a mapping, not {type(spec).__name__}")
        unknown = set(spec) - {"path", "value", "seq", "as", "map", "default", "required"}
        if unknown:
            raise ValueError(f"unknown source key(s): {', '.join(sorted(unknown))}")
        convert = spec.get("as")
        if convert is not None and convert not in _CONVERSIONS:
            raise ValueError(f"as: {convert!r} is not one of {', '.join(_CONVERSIONS)}")
        if sum(key in spec for key in ("path", "value", "seq")) != 1:
            raise ValueError("a source needs exactly one of path, value, seq")
        table = spec.get("map")
        return cls(path=spec.get("path"), constant=None if spec.get("value") is None else str(spec["value"]),
                   seq=bool(spec.get("seq")), convert=convert,
                   table={str(k): str(v) for k, v in table.items()} if isinstance(table, Mapping) else None,
                   default=None if spec.get("default") is None else str(spec["default"]),
                   required=bool(spec.get("required")))


@dataclass(frozen=True)
class SegmentRule:
    """One segment of a template: its fields, and ``for_each`` when it repeats per list item."""

    name: str
    fields: Mapping[str, Source] = field(default_factory=dict)  # "5.1" -> source
    for_each: str | None = None
    children: tuple[SegmentRule, ...] = ()  # segments written after each repetition (NTE after OBX)


@dataclass(frozen=True)
class Hl7Template:
    """How one event type is written: MSH-9 and the segments after MSH (MSH itself comes from the connector)."""

    message_type: str  # MSH-9 with ^ between components: ADT^A01^ADT_A01
    segments: tuple[SegmentRule, ...]


@dataclass(frozen=True)
class Header:
    """The MSH values that come from the connector and the moment of sending."""

    control_id: str
    timestamp: str  # MSH-7, already HL7 DTM
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"
    version: str = "2.5.1"
    charset: str = ""  # MSH-18; "" leaves it empty (ASCII)


# -- building ---------------------------------------------------------------------------------------

_Field = list[list[list[str]]]  # repetitions -> components -> subcomponents (escaped)


class _Segment:
    def __init__(self, name: str) -> None:
        self.name = name
        self.fields: dict[int, _Field] = {}

    def put(self, target: Target, value: str | tuple[str, ...] | list[Any], d: Delimiters) -> None:
        """Write ``value`` (escaped here) at ``target``: a tuple fills components from the target one on,
        a list gives one repetition per item."""
        if isinstance(value, list):
            for index, item in enumerate(value, start=(target.repetition or 1)):
                self.put(replace(target, repetition=index), item, d)
            return
        reps = self.fields.setdefault(target.field, [])
        rep_index = (target.repetition or 1) - 1
        while len(reps) <= rep_index:
            reps.append([])
        components = reps[rep_index]
        parts = value if isinstance(value, tuple) else (value,)
        for offset, part in enumerate(parts):
            index = target.component - 1 + offset
            while len(components) <= index:
                components.append([])
            subs = components[index]
            sub_index = target.subcomponent - 1 if offset == 0 else 0
            while len(subs) <= sub_index:
                subs.append("")
            subs[sub_index] = _escape(part, d)

    def render(self, d: Delimiters) -> str:
        fields = self.fields
        values = [""] * max(fields, default=0)
        for number, reps in fields.items():
            values[number - 1] = self._field(reps, d)
        if self.name == "MSH":  # MSH-1 is the field separator itself, MSH-2 the encoding characters
            return "MSH" + d.field + d.field.join([d.encoding_characters, *values[2:]])
        return d.field.join([self.name, *values])

    @staticmethod
    def _field(reps: _Field, d: Delimiters) -> str:
        if len(reps) == 1 and len(reps[0]) == 1 and len(reps[0][0]) == 1:  # most fields: one plain value
            return reps[0][0][0]
        return d.repetition.join(d.component.join(d.subcomponent.join(subs) for subs in comps) for comps in reps)


@lru_cache(maxsize=16)
def _specials(d: Delimiters) -> re.Pattern[str]:
    """Characters that need escaping with these delimiters (most values have none: they are kept as they are)."""
    return re.compile("[" + re.escape(d.field + d.encoding_characters) + "\r\n]")


def _escape(value: str, d: Delimiters) -> str:
    if _specials(d).search(value) is None:
        return value
    out = escape(value, d)
    if "\r" in out or "\n" in out:  # a segment ends at CR: line breaks travel as the formatting escape
        out = out.replace("\r\n", "\n").replace("\r", "\n").replace("\n", f"{d.escape}.br{d.escape}")
    return out


def render(template: Hl7Template, event: Mapping[str, Any], header: Header,
           delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
    """The ER7 text (segments ended by CR) of ``event`` written with ``template``; raises :class:`TemplateError`."""
    d = delimiters
    msh = _Segment("MSH")
    values = {3: header.sending_application, 4: header.sending_facility, 5: header.receiving_application,
              6: header.receiving_facility, 7: header.timestamp, 10: header.control_id, 11: header.processing_id,
              12: header.version, 18: header.charset}
    for number, value in values.items():
        if value:
            msh.put(Target(number), value, d)
    msh.put(Target(9), tuple(template.message_type.split("^")), d)
    data = event.get("data")  # a delivery's outbound map: may have reshaped the event into plain data
    scope = data if isinstance(data, Mapping) else {} if "specversion" in event else event
    segments = [msh]
    for rule in template.segments:
        if rule.name == "MSH":
            _fill(msh, rule, scope, event, 1, d)
        else:
            segments.extend(_segments(rule, scope, event, d))
    return "".join(segment.render(d) + "\r" for segment in segments)


def _segments(rule: SegmentRule, scope: Any, event: Mapping[str, Any], d: Delimiters) -> Iterator[_Segment]:
    if rule.for_each is None:
        items: Sequence[Any] = [scope]
    else:
        found = _lookup(scope, event, rule.for_each)
        items = found if isinstance(found, list) else [] if found is None else [found]
    for number, item in enumerate(items, start=1):
        segment = _Segment(rule.name)
        _fill(segment, rule, item, event, number, d)
        yield segment
        for child in rule.children:
            yield from _segments(child, item, event, d)


def _fill(segment: _Segment, rule: SegmentRule, scope: Any, event: Mapping[str, Any], number: int,
          d: Delimiters) -> None:
    for where, source in rule.fields.items():
        value = _value(source, scope, event, number, f"{rule.name}-{where}")
        if value is not None:
            segment.put(_target(where), value, d)


def _value(source: Source, scope: Any, event: Mapping[str, Any], number: int,
           target: str) -> str | tuple[str, ...] | list[Any] | None:
    if source.seq:
        return str(number)
    if source.constant is not None:
        return source.constant
    assert source.path is not None
    raw = _lookup(scope, event, source.path)
    if raw is None or raw == "" or raw == []:
        if source.default is not None:
            return source.default
        if source.required:
            raise TemplateError(f"{target}: the event has no {source.path}")
        return None
    try:
        if isinstance(raw, list) and source.convert not in ("value", "value_type"):
            return [_one(source, item, target) for item in raw]
        return _one(source, raw, target)
    except dates.DateFormatError as exc:
        raise TemplateError(f"{target}: {source.path}: {exc}") from None


def _one(source: Source, raw: Any, target: str) -> str | tuple[str, ...] | list[Any]:
    if source.convert == "date":
        return _hl7_time(dates.parse(raw).truncate(dates.Precision.DAY))
    if source.convert == "datetime":
        return _hl7_time(dates.parse(raw))
    if source.convert == "value":
        return _typed_value(raw, target)
    if source.convert == "value_type":
        return _value_type(raw)
    text = _scalar(raw, target)
    if source.table is not None:
        return source.table.get(text, source.default if source.default is not None else text)
    return text


def _scalar(raw: Any, target: str) -> str:
    if isinstance(raw, bool):
        return "Y" if raw else "N"
    if isinstance(raw, int | float):
        return _number(raw)
    if isinstance(raw, str):
        return raw
    raise TemplateError(f"{target}: a {type(raw).__name__} cannot go into one field (pick a value inside it, "
                        "or use as: value)")


def _number(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        raise TemplateError("not a finite number")
    return str(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 1e15 else str(value)


def _lookup(scope: Any, event: Mapping[str, Any], path: str) -> Any:
    if path == ".":
        return scope
    if path.startswith("@"):
        return event.get(path[1:])
    value = scope
    for key in _keys(path):
        if not isinstance(value, dict):  # JSON objects (a dict check is much cheaper than Mapping's)
            return None
        value = value.get(key)
    return value


@lru_cache(maxsize=4096)
def _target(where: str) -> Target:
    return Target.parse(where)


@lru_cache(maxsize=4096)
def _keys(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def _hl7_time(when: dates.When) -> str:
    """``When`` as HL7 DT / DTM at its precision: ``1974``, ``19740503``, ``20261124082500.4+0100``."""
    year, month, day, hour, minute, second, fraction, offset = when
    out = f"{year:04d}" + "".join(f"{part:02d}" for part in (month, day, hour) if part is not None)
    if hour is not None:
        out += f"{minute or 0:02d}{second or 0:02d}" + (f".{fraction}" if fraction else "")
        if offset is not None:
            sign = "-" if offset < 0 else "+"
            out += f"{sign}{abs(offset) // 60:02d}{abs(offset) % 60:02d}"
    return out


def _typed_value(raw: Any, target: str) -> str | tuple[str, ...] | list[Any]:
    """An OBX-5 value in the shapes result.reported gives it (schemas/result.reported/1.json)."""
    if isinstance(raw, list):
        return [_typed_value(item, target) for item in raw]
    if isinstance(raw, Mapping):
        shape = _shape(raw)
        if shape == "CWE":
            return (str(raw.get("code", "")), str(raw.get("display", "")), str(raw.get("system", "")))
        if shape == "SN":
            parts = [str(raw.get("comparator", "")), _number(raw["value"]) if "value" in raw else "",
                     str(raw.get("separator", "")), _number(raw["value2"]) if "value2" in raw else ""]
            while parts and not parts[-1]:
                parts.pop()
            return tuple(parts)
        if shape == "RP":
            return tuple(str(raw.get(k, "")) for k in ("pointer", "application", "type", "subtype"))
        if shape == "XTN":
            return str(raw.get("value", ""))
        raise TemplateError(f"{target}: this kind of observation value cannot be written back (encapsulated "
                            "data stays in the source message)")
    return _scalar(raw, target)


def _shape(value: Mapping[str, Any]) -> str:
    """The HL7 data type of a typed value object (code, structured numeric, reference pointer, telecom)."""
    if "code" in value or "display" in value:
        return "CWE"
    if "pointer" in value:
        return "RP"
    if "comparator" in value or "separator" in value or isinstance(value.get("value"), int | float):
        return "SN"
    if "source" in value or "encoding" in value or "size" in value:
        return "ED"
    return "XTN" if "value" in value or "use" in value or "system" in value else "ST"


def _value_type(observation: Any) -> str:
    """OBX-2 for an observation: its own ``value_type``, else what its value's shape says."""
    if not isinstance(observation, Mapping):
        return "ST"
    if observation.get("value_type"):
        return str(observation["value_type"])
    value = observation.get("value")
    value = value[0] if isinstance(value, list) and value else value
    if isinstance(value, bool) or value is None:
        return "ST"
    if isinstance(value, int | float):
        return "NM"
    if isinstance(value, Mapping):
        return _shape(value)
    return "TX" if "\n" in str(value) else "ST"


# -- the built-in templates -------------------------------------------------------------------------

SEX = {"male": "M", "female": "F", "other": "O", "unknown": "U"}  # inverse of config/lookups/sex.yaml
PATIENT_CLASS = {"inpatient": "I", "outpatient": "O", "emergency": "E", "preadmit": "P", "recurring": "R",
                 "obstetrics": "B", "commercial": "C", "not-applicable": "N", "unknown": "U"}


def _src(path: str, **options: Any) -> Source:
    return Source(path=path, **options)


def _const(value: str) -> Source:
    return Source(constant=value)


PID: Mapping[str, Source] = {
    "1": _const("1"),
    "3.1": _src("patient.mrn", required=True),
    "3.5": _const("MR"),
    "5.1": _src("patient.name.family"),
    "5.2": _src("patient.name.given"),
    "5.3": _src("patient.name.middle"),
    "5.4": _src("patient.name.suffix"),
    "5.5": _src("patient.name.prefix"),
    "7": _src("patient.birth_date", convert="date"),
    "8": _src("patient.sex", table=SEX),
    "11.1": _src("patient.address.line"),
    "11.3": _src("patient.address.city"),
    "11.4": _src("patient.address.state"),
    "11.5": _src("patient.address.postal_code"),
    "11.6": _src("patient.address.country"),
    "13.1": _src("patient.phone"),
}

VISIT: Mapping[str, Source] = {
    "1": _const("1"),
    "2": _src("encounter.class", table=PATIENT_CLASS, default="U"),
    "3.1": _src("encounter.location.point_of_care"),
    "3.2": _src("encounter.location.room"),
    "3.3": _src("encounter.location.bed"),
    "3.4": _src("encounter.location.facility"),
    "7.1": _src("encounter.attending_doctor"),
    "19.1": _src("encounter.visit_number"),
}

NO_VISIT: Mapping[str, Source] = {"1": _const("1"), "2": _const("N")}


def _evn(trigger: str) -> SegmentRule:
    return SegmentRule("EVN", {"1": _const(trigger), "2": _src("@time", convert="datetime")})


def _adt(trigger: str, visit: Mapping[str, Source], occurred: str | None = None) -> Hl7Template:
    structure = {"A02": "ADT_A02", "A03": "ADT_A03"}.get(trigger, "ADT_A01")
    evn = _evn(trigger)
    if occurred:  # EVN-6, the time the event occurred: what the inbound route reads first
        evn = replace(evn, fields={**evn.fields, "6": _src(occurred, convert="datetime")})
    return Hl7Template(f"ADT^{trigger}^{structure}", (evn, SegmentRule("PID", PID), SegmentRule("PV1", visit)))


_NOTE = SegmentRule("NTE", {"1": Source(seq=True), "3": _src(".")}, for_each="notes")

BUILT_IN: Mapping[str, Hl7Template] = {
    "patient.admitted": _adt("A01", {**VISIT, "44": _src("encounter.admitted_at", convert="datetime")}),
    "patient.transferred": _adt("A02", {**VISIT, **{f"6.{n}": _src(f"encounter.prior_location.{key}") for n, key in
                                                    enumerate(("point_of_care", "room", "bed", "facility"), 1)}},
                                occurred="encounter.transferred_at"),
    "patient.registered": _adt("A04", NO_VISIT),
    "patient.discharged": _adt("A03", {**VISIT, "36": _src("encounter.disposition"),
                                       "45": _src("encounter.discharged_at", convert="datetime")}),
    "patient.updated": _adt("A08", NO_VISIT),
    "result.reported": Hl7Template("ORU^R01^ORU_R01", (
        SegmentRule("PID", PID),
        SegmentRule("ORC", {"1": _const("RE"), "2.1": _src("order.id"), "3.1": _src("order.filler_id")}),
        SegmentRule("OBR", {
            "1": _const("1"), "2.1": _src("order.id"), "3.1": _src("order.filler_id"),
            "4.1": _src("order.code"), "4.2": _src("order.name"),
            "7": _src("result.observed_at", convert="datetime"), "22": _src("result.reported_at", convert="datetime"),
            "25": _src("result.status"),
        }),
        SegmentRule("NTE", {"1": Source(seq=True), "3": _src(".")}, for_each="result.notes"),
        SegmentRule("OBX", {
            "1": Source(seq=True), "2": _src(".", convert="value_type"),
            "3.1": _src("code", required=True), "3.2": _src("name"), "3.3": _src("coding_system"),
            "5": _src("value", convert="value"), "6.1": _src("unit"), "7": _src("reference_range"),
            "8": _src("abnormal_flag"), "11": _src("status", default="F"),
            "14": _src("observed_at", convert="datetime"),
        }, for_each="observations", children=(_NOTE,)),
    )),
}


def event_kind(cloud_type: str) -> str:
    """``patient.admitted.v1`` -> ``patient.admitted`` (templates are per event type, any major)."""
    head, _, tail = cloud_type.rpartition(".")
    return head if head and tail[:1] == "v" and tail[1:].isdigit() else cloud_type


# -- templates from a connector's YAML -------------------------------------------------------------


def from_yaml(block: Mapping[str, Any] | None) -> dict[str, Hl7Template]:
    """The built-in templates with a connector's ``templates:`` applied; raises ``ValueError``.

    ``templates: {<event type>: {message_type: ..., fields: {"PID-5.1": <source> | null}}}``: a field
    of a built-in template is replaced (``null`` removes it; ``PV1-19`` replaces ``PV1-19.1`` too);
    ``SEG-n`` of a segment the template lacks appends that segment. A repeating segment is addressed
    as ``OBX[*]-3.1`` (relative to the item).
    """
    templates = dict(BUILT_IN)
    for kind, spec in (block or {}).items():
        base = templates.get(str(kind))
        if base is None and not spec.get("message_type"):
            raise ValueError(f"templates.{kind}: no built-in template for this event type: set message_type")
        segments = list(base.segments) if base else []
        for where, source in (spec.get("fields") or {}).items():
            segments = _override(segments, str(where), None if source is None else Source.parse(source))
        templates[str(kind)] = Hl7Template(str(spec.get("message_type") or (base.message_type if base else "")),
                                           tuple(segments))
    return templates


def _override(segments: list[SegmentRule], where: str, source: Source | None) -> list[SegmentRule]:
    name, dash, rest = where.partition("-")
    repeated = name.endswith("[*]")
    name = name.removesuffix("[*]")
    if not dash or len(name) != 3 or not name.isalnum() or not name[0].isalpha() or not name.isupper():
        raise ValueError(f"{where!r} is not an HL7 target path (write e.g. PID-5.1, OBX[*]-3.1)")
    Target.parse(rest)  # checks the field part
    for index, rule in enumerate(segments):
        if rule.name == name and (rule.for_each is not None) == repeated:
            fields = {key: value for key, value in rule.fields.items()  # a whole field replaces its parts
                      if key != rest and not ("." not in rest and key.startswith(rest + "."))}
            if source is not None:
                fields[rest] = source
            segments[index] = replace(rule, fields=fields)
            return segments
    if repeated:
        raise ValueError(f"{where!r}: the template has no repeating {name} segment")
    if source is not None:
        segments.append(SegmentRule(name, {rest: source}))
    return segments
