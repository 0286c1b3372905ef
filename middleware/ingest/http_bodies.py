"""HTTP request bodies -> the records to publish, checked against the route's format (pure, no I/O).

Which media types a route takes depends on its ``source.format`` (:func:`accepted_types`). A body
becomes records here: HL7 v2 bodies through the format's own splitter (a batch file gives one
record per message), a JSON body as one document (or as many as the format's splitter makes of it),
NDJSON one document per non-empty line, CSV one JSON object per row keyed by the header row (for
``json`` routes; a dotted header such as ``patient.mrn`` makes nested objects). Every record is
parsed once with the route's format, so a record that is not a message is dead-lettered with its
reason instead of being published; :class:`Body` also tells a body that cannot even be read as
its media type (400) from one that reads but is not a message of the route's format (422).
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from middleware.errors import ParseError
from middleware.formats import Format, Record, SplitInfo
from middleware.formats.ndjson import split_lines

ER7_TYPES = ("x-application/hl7-v2+er7", "application/hl7-v2")
FHIR_JSON = "application/fhir+json"
JSON = "application/json"
NDJSON = "application/x-ndjson"
CSV = "text/csv"

_ACCEPTED: dict[str, tuple[str, ...]] = {
    "hl7v2": ER7_TYPES,
    "fhir": (FHIR_JSON, JSON, NDJSON),
    "json": (JSON, NDJSON, CSV),
    "csv": (CSV,),
    "ndjson": (NDJSON,),
}


def accepted_types(format_name: str) -> tuple[str, ...]:
    """The media types a route of ``format_name`` accepts (the first is its own)."""
    return _ACCEPTED.get(format_name, (JSON,))


def media_type(content_type: str | None) -> str:
    """``application/JSON; charset=utf-8`` -> ``application/json`` (empty when there is none)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


@dataclass
class Body:
    """The records of one request body and what checking them found."""

    records: list[Record] = field(default_factory=list)
    info: SplitInfo = field(default_factory=SplitInfo)
    unreadable: int = 0  # records that are not even valid JSON / CSV / an HL7 frame (400 when all are)

    @property
    def failed(self) -> int:
        return sum(1 for record in self.records if record.error is not None)


def read_body(raw: bytes, kind: str, fmt: Format) -> Body:
    """Split ``raw`` (of media type ``kind``, one of :func:`accepted_types`) into checked records."""
    body = Body()
    if kind == NDJSON:
        candidates = split_lines(io.BytesIO(raw), body.info)
    elif kind == CSV:
        candidates = _csv(raw, body) if fmt.name != "csv" else fmt.split(io.BytesIO(raw), body.info)
    else:
        if kind in (JSON, FHIR_JSON) and not _json_ok(raw):
            body.unreadable = 1
            body.records = [Record(raw, error="not valid JSON: the body cannot be decoded as a JSON document")]
            return body
        candidates = fmt.split(io.BytesIO(raw), body.info)
    for record in candidates:
        if record.error is not None:
            body.unreadable += 1
        else:
            try:
                fmt.parse(record.raw)
            except ParseError as exc:
                record = Record(record.raw, record.position, str(exc), record.headers)
        body.records.append(record)
    if not body.records and body.info.feed is None:  # a feed's handshake or heartbeat holds no record
        body.unreadable = 1
        body.records = [Record(raw, error="the body holds no message")]
    return body


def _json_ok(raw: bytes) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


def _csv(raw: bytes, body: Body) -> Iterator[Record]:
    """One JSON object per data row, keyed by the header row (values are strings, empty ones left out)."""
    try:
        text = raw.decode("utf-8-sig") if raw.startswith(codecs.BOM_UTF8) else raw.decode("utf-8")
    except UnicodeDecodeError:
        yield Record(raw, error="CSV body is not UTF-8")
        return
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if not header or not any(name.strip() for name in header):
        yield Record(raw, error="CSV body has no header row")
        return
    names = [name.strip() for name in header]
    clash = _clash(names)
    if clash:
        yield Record(raw, error=clash)
        return
    position = 0
    for row in rows:
        if not any(cell.strip() for cell in row):
            continue
        position += 1
        body.info.records = position
        if len(row) != len(names):
            yield Record(_row_bytes(row), position, f"CSV row {position} has {len(row)} fields, "
                                                    f"the header has {len(names)}")
            continue
        yield Record(orjson.dumps(_nest((n, v) for n, v in zip(names, row, strict=True) if v != "")), position)


def _clash(names: list[str]) -> str | None:
    """Why the header cannot name JSON keys (empty, repeated, or ``a`` beside ``a.b``), or None."""
    seen = set(names)
    for name in names:
        if not name or "" in name.split("."):
            return f"CSV header has an empty column name ({name!r})"
        parts = name.split(".")
        for end in range(1, len(parts)):
            if ".".join(parts[:end]) in seen:
                return f"CSV header names both {'.'.join(parts[:end])!r} and {name!r}"
    if len(seen) != len(names):
        return "CSV header repeats a column name"
    return None


def _nest(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``[("patient.mrn", "M1")]`` -> ``{"patient": {"mrn": "M1"}}``."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        *path, last = name.split(".")
        target = out
        for key in path:
            target = target.setdefault(key, {})
        target[last] = value
    return out


def _row_bytes(row: list[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(row)
    return out.getvalue().encode()
