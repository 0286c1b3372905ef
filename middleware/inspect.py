"""A message field by field, each value beside the path a route's ``map`` uses to read it.

HL7 v2 paths follow the tokenizer's grammar (:mod:`middleware.formats.hl7v2`): ``PID-3[2].1``,
``OBX[2]-5.1``, ``PID-3.4.2``; a repetition index appears when the field repeats, a segment index when
the segment does, a component when the field has several, a subcomponent when the component has
several. FHIR paths are the FHIRPath subset (:mod:`middleware.formats.fhir`): ``Patient.name[0].family``,
``Bundle.entry[1].resource.subject.reference``, every array indexed; other JSON (``format: json``) the
dotted paths of :mod:`middleware.formats.json_format` (``referral.items[0].code``). X12 records (one per
834 member, 270/271 subscriber or dependent, as ``publish`` splits them) print the element paths of
:mod:`middleware.formats.x12`: ``NM1[IL]-9``, ``DTP[348]-3``, ``HD-3.1``. Each printed path, compiled and
read on the same message, gives the printed value first (tests/unit/test_inspect.py checks it).

Values are decoded (HL7 escapes resolved, JSON numbers as parsed). This module only returns them: the
CLI prints them on the operator's terminal; nothing here logs a value.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from middleware.errors import ParseError
from middleware.formats import SplitInfo, get_format
from middleware.formats.fhir import FhirDocument
from middleware.formats.hl7v2 import Hl7Message
from middleware.formats.json_format import JsonDocument
from middleware.formats.x12 import X12Document

FORMATS = ("hl7v2", "fhir", "json", "x12")
_HL7_NULL = '""'
_FHIR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # an element name a FHIRPath step can spell
_JSON_KEY = re.compile(r"[A-Za-z_$][\w$-]*")  # a key a JSON path step can spell


@dataclass(frozen=True)
class Field:
    """One value and its path. ``value`` None: the HL7 explicit null ``""`` (a map reads no value there).
    ``addressable`` False: a JSON key no path can spell (not a FHIR element name), shown for completeness."""

    path: str
    value: Any
    addressable: bool = True
    note: str | None = None  # why ``addressable`` is False, when it is not the default reason


@dataclass
class Message:
    """One message of the input (a batch gives several): its fields, or why it does not parse."""

    position: int | None  # 1-based place in a batch; None for a lone message
    message_type: str | None = None
    fields: list[Field] = field(default_factory=list)
    error: str | None = None


def detect_format(raw: bytes) -> str:
    """``hl7v2`` (MSH, FHS or BHS first), ``x12`` (ISA first), ``fhir`` (a JSON object with a resourceType)
    or ``json`` (other JSON); raises :class:`ParseError` for anything else."""
    head = raw[:4096].lstrip(b"\xef\xbb\xbf\x0b\r\n\t ")
    if head.startswith((b"MSH", b"FHS", b"BHS")):
        return "hl7v2"
    if head.startswith(b"ISA"):
        return "x12"
    if head.startswith((b"{", b"[")):
        try:
            data = orjson.loads(raw.lstrip(b"\xef\xbb\xbf"))
        except orjson.JSONDecodeError:
            return "json"  # the json format says what is wrong with it
        return "fhir" if isinstance(data, dict) and isinstance(data.get("resourceType"), str) else "json"
    raise ParseError("neither an HL7 v2 message (MSH, FHS or BHS first), X12 (ISA first) nor JSON",
                     hint=f"give --format ({', '.join(FORMATS)})")


def inspect_input(raw: bytes, fmt: str | None = None) -> tuple[str, list[Message]]:
    """(format, one :class:`Message` per message of ``raw``): HL7 batches are split like ``publish`` does."""
    name = fmt or detect_format(raw)
    if name not in FORMATS:
        raise ValueError(f"inspect reads {' and '.join(FORMATS)}, not {name}")
    fmt_impl = get_format(name)
    messages: list[Message] = []
    for record in fmt_impl.split(io.BytesIO(raw), SplitInfo()):
        message = Message(record.position)
        messages.append(message)
        if record.error is not None:
            message.error = record.error
            continue
        try:
            doc = fmt_impl.parse(record.raw)
        except ParseError as exc:
            message.error = str(exc)
            continue
        message.message_type = doc.message_type
        message.fields = list(hl7_fields(doc) if name == "hl7v2" else fhir_fields(doc) if name == "fhir"
                              else x12_fields(doc) if name == "x12" else json_fields(doc))
    return name, messages


# -- HL7 v2 -----------------------------------------------------------------------------------


def hl7_fields(message: Hl7Message) -> Iterator[Field]:
    """Every non-empty field, repetition, component and subcomponent, in message order."""
    d = message.delimiters
    totals = {segment_id: len(message.all(segment_id)) for segment_id in {s.id for s in message.segments}}
    seen: dict[str, int] = {}
    for segment in message.segments:
        seen[segment.id] = seen.get(segment.id, 0) + 1
        label = f"{segment.id}[{seen[segment.id]}]" if totals[segment.id] > 1 else segment.id
        for number in range(1, len(segment.fields)):
            raw = segment.field(number)
            if not raw:
                continue
            if segment.id == "MSH" and number <= 2:  # the separators themselves, read as sent
                yield Field(f"{label}-{number}", raw)
                continue
            repetitions = raw.split(d.repetition)
            for rep_no, repetition in enumerate(repetitions, start=1):
                rep = f"[{rep_no}]" if len(repetitions) > 1 else ""
                components = repetition.split(d.component)
                for comp_no, component in enumerate(components, start=1):
                    subcomponents = component.split(d.subcomponent)
                    for sub_no, value in enumerate(subcomponents, start=1):
                        if not value:
                            continue
                        path = f"{label}-{number}{rep}"
                        if len(subcomponents) > 1:
                            path += f".{comp_no}.{sub_no}"
                        elif len(components) > 1:
                            path += f".{comp_no}"
                        yield Field(path, None if value == _HL7_NULL else message.unescape(value))


# -- X12 --------------------------------------------------------------------------------------


def x12_fields(doc: X12Document) -> Iterator[Field]:
    """Every non-empty element (and component) of an X12 record, in segment order. A segment is named by
    its first element as qualifier (``NM1[IL]-9``, ``DTP[348]-3``) when its tag repeats or is a qualified
    one (NM1, N1, REF, DTP...) and that qualifier picks it, else by its tag alone (``BGN-2``, ``HD-3``) when
    it is the first of its tag. A later
    segment that no such name picks (a second ``REF[0F]``) is shown with ``#<n>`` and marked: ``REF[*]-2``
    reads them all as a list."""
    repetition = doc.delimiters.repetition.decode("latin-1") if doc.delimiters.repetition else None
    component = doc.delimiters.component.decode("latin-1")
    totals: dict[str, int] = {}
    for segment in doc.segments:
        totals[segment[0]] = totals.get(segment[0], 0) + 1
    seen_tags: set[str] = set()
    seen_qualified: dict[tuple[str, str], int] = {}
    for segment in doc.segments:
        tag = segment[0]
        qualifier = segment[1] if len(segment) > 1 else ""
        first_of_tag = tag not in seen_tags
        seen_tags.add(tag)
        nth = seen_qualified[(tag, qualifier)] = seen_qualified.get((tag, qualifier), 0) + 1
        note = None
        if totals[tag] == 1 and tag not in _X12_QUALIFIED:
            label = tag
        elif qualifier and nth == 1 and _X12_QUALIFIER.fullmatch(qualifier) and component not in qualifier:
            label = f"{tag}[{qualifier}]"
        elif first_of_tag:
            label = tag
        else:
            label = f"{tag}[{qualifier}]#{nth}" if qualifier else f"{tag}#{nth}"
            note = f"an earlier {tag} reads first: {tag}[*]-n reads every {tag} as a list"
        for number in range(1, len(segment)):
            value = segment[number]
            if tag == "ISA":  # fixed-width envelope: ISA-11 and ISA-16 are the separators themselves
                parts = [(f"{label}-{number}", value.strip())]
            else:
                if repetition is not None and repetition in value:
                    value = value.split(repetition, 1)[0]  # a path reads the first repetition
                pieces = value.split(component)
                parts = ([(f"{label}-{number}", value.strip())] if len(pieces) == 1 else
                         [(f"{label}-{number}.{c}", piece.strip()) for c, piece in enumerate(pieces, start=1)])
            for path, text in parts:
                if text:
                    yield Field(path, text, note is None, note)


_X12_QUALIFIER = re.compile(r"[^\]\s*]+")  # what X12 path brackets can hold as a qualifier
# segments whose first element is a qualifier (entity, reference, date, amount...): named by it even when
# alone, so a map written from one record keeps reading the right one when another record has several
_X12_QUALIFIED = frozenset({"NM1", "N1", "REF", "DTP", "DTM", "PER", "AMT", "QTY", "EB", "HI", "LUI"})


# -- FHIR -------------------------------------------------------------------------------------


def fhir_fields(doc: FhirDocument) -> Iterator[Field]:
    """Every scalar of the resource (or Bundle), every array indexed (0-based, nulls skipped as the
    FHIRPath reader skips them), starting at the resource type."""
    root = doc.root
    yield from _json_fields(root, str(root.get("resourceType")), True)


def _json_fields(node: Any, path: str, addressable: bool) -> Iterator[Field]:
    if isinstance(node, dict):
        for key, value in node.items():
            spelled = _FHIR_NAME.fullmatch(key) is not None
            yield from _json_fields(value, f"{path}.{key}" if spelled else f"{path}.`{key}`", addressable and spelled)
    elif isinstance(node, list):
        index = 0
        for item in node:
            if item is None:
                continue  # (a FHIR primitive array paired with its _element extensions)
            # an array inside an array is not FHIR: shown, but no FHIRPath step reaches into it
            yield from _json_fields(item, f"{path}[{index}]", addressable and not isinstance(item, list))
            index += 1
    elif node is not None and node != "":
        yield Field(path, node, addressable)


# -- other JSON -------------------------------------------------------------------------------


def json_fields(doc: JsonDocument) -> Iterator[Field]:
    """Every scalar of a JSON document at its dotted path (``items[0].code``; 0-based, nulls counted)."""
    yield from _plain_fields(doc.data, "", True)


def _plain_fields(node: Any, path: str, addressable: bool) -> Iterator[Field]:
    if isinstance(node, dict):
        for key, value in node.items():
            spelled = _JSON_KEY.fullmatch(key) is not None
            step = key if spelled else f"`{key}`"
            yield from _plain_fields(value, f"{path}.{step}" if path else step, addressable and spelled)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _plain_fields(item, f"{path}[{index}]", addressable and bool(path))  # a path starts with a key
    elif node is not None and node != "":
        yield Field(path, node, addressable)


# -- text rendering ---------------------------------------------------------------------------

_SHOWN = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# control characters (C0, DEL, C1) and bidirectional overrides: a value must not drive the terminal
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(value: Any) -> str:
    """A value for one terminal line: strings as decoded, with line breaks and control characters
    written as escapes (``\\n``, ``\\x1b``); JSON numbers and booleans as JSON writes them."""
    if value is None:
        return '""  (HL7 null: a map reads no value)'
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str):
        return str(value)
    return _UNPRINTABLE.sub(_escaped, value)


def _escaped(match: re.Match[str]) -> str:
    char = match.group(0)
    if char in _SHOWN:
        return _SHOWN[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def render_text(source: str, fmt: str, messages: list[Message]) -> Iterator[str]:
    """The lines ``middleware inspect`` prints: a header per message, then ``path = value``."""
    for number, message in enumerate(messages):
        if number:
            yield ""
        where = f"message {message.position} of {source}" if message.position is not None else source
        if message.error is not None:
            yield f"# {where}: does not parse: {message.error}"
            continue
        yield f"# {where}: {fmt} {message.message_type or '(no message type)'}, {len(message.fields)} value(s)"
        width = min(max((len(f.path) for f in message.fields), default=0), 40)
        for item in message.fields:
            note = "" if item.addressable else f"  ({item.note or 'no path reads this key'})"
            yield f"{item.path:<{width}} = {shown(item.value)}{note}"


def as_json(source: str, fmt: str, messages: list[Message]) -> dict[str, Any]:
    """The ``--json`` document: exact values (HL7 null as null)."""
    return {"file": source, "format": fmt, "messages": [
        {"position": m.position, "message_type": m.message_type, "error": m.error,
         "fields": [{"path": f.path, "value": f.value, **({} if f.addressable else {"addressable": False})}
                    for f in m.fields]}
        for m in messages]}
