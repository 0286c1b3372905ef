"""CSV files (rosters): one record per data row, read by column name, streamed row by row.

Splitting (``Format.split``) decodes the file through a text wrapper (``source.encoding``, a BOM
dropped) and reads it with the stdlib ``csv`` reader (``source.delimiter``, ``source.quote``), so
quoted fields may hold delimiters, quotes and newlines, and memory does not grow with the file. Each
data row becomes one record: a JSON object keyed by column name (the header row, or
``source.columns`` when ``header: false``), every cell kept as a string. A row that does not frame
(a wrong number of fields, bad quoting, bytes that are not the declared encoding) is a record with
an error: it is dead-lettered alone with its position; the rows after it go on. Blank lines are
skipped. An optional trailer line (``source.trailer: TRAILER`` for a last line ``TRAILER,<count>``)
declares the row count; a count that disagrees, or a missing trailer, is a problem on the file.

Paths are column names, exactly as the header writes them (``member_id``, ``payer``, even
``patient.mrn``); an empty cell reads as absent. Rows have no repeating groups (no ``each:``).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

from middleware.errors import ParseError
from middleware.formats import Record, SplitInfo, register

LINE_HEADER = "x-mw-csv-line"  # the file line a row starts on (1-based), for finding a dead-lettered row
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes the encoding could not decode (surrogateescape)
_FIELD_LIMIT = 1 << 20  # a cell larger than this is an unclosed quote, not data: the row is dead-lettered

SPEC: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "header": {"type": "boolean", "default": True,
                   "description": "the first line names the columns"},
        "columns": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                    "description": "column names when `header: false` (default: 1, 2, 3...)"},
        "delimiter": {"type": "string", "minLength": 1, "maxLength": 1, "default": ",",
                      "description": "field separator (one character, e.g. `;` or a tab)"},
        "quote": {"type": "string", "minLength": 1, "maxLength": 1, "default": '"',
                  "description": "quote character (a quote inside a quoted field is doubled)"},
        "encoding": {"type": "string", "minLength": 1, "default": "utf-8",
                     "description": "text encoding (Python codec name); a leading BOM is dropped"},
        "trailer": {"type": "string", "minLength": 1,
                    "description": "first field of a last line `<trailer>,<row count>` that declares the count"},
    },
}


@dataclass(frozen=True)
class CsvOptions:
    """The dialect of a route's CSV files (``source:`` keys, :data:`SPEC`)."""

    header: bool = True
    columns: tuple[str, ...] = ()
    delimiter: str = ","
    quote: str = '"'
    encoding: str = "utf-8"
    trailer: str | None = None

    @classmethod
    def of(cls, source: Mapping[str, Any]) -> CsvOptions:
        """Options from a route's ``source:`` block (unknown keys ignored)."""
        encoding = str(source.get("encoding", "utf-8"))
        return cls(header=bool(source.get("header", True)), columns=tuple(source.get("columns", ())),
                   delimiter=str(source.get("delimiter", ",")), quote=str(source.get("quote", '"')),
                   encoding=encoding, trailer=source.get("trailer"))


@dataclass
class CsvDocument:
    """One row: column name -> cell (strings)."""

    data: dict[str, str]

    @property
    def message_type(self) -> str | None:
        return None

    @property
    def message_id(self) -> str | None:
        return None

    def occurred_at(self) -> str | None:
        return None

    def source_identity(self) -> tuple[str, ...]:
        """A row has no id of its own: its content (keys sorted) identifies it."""
        content = orjson.dumps(self.data, option=orjson.OPT_SORT_KEYS)
        return ("csv", "sha256:" + hashlib.sha256(content).hexdigest())


@dataclass(frozen=True)
class CsvColumn:
    """A compiled path: one column by name; an empty cell reads as absent."""

    expr: str
    multiple: bool = False

    def read(self, doc: Any) -> list[Any]:
        data = doc.data if isinstance(doc, CsvDocument) else doc
        value = data.get(self.expr) if isinstance(data, dict) else None
        return [] if value is None or value == "" else [value]


def _encoding(name: str) -> str:
    """The codec that drops a leading BOM for ``name`` (UTF-16/32 codecs already do)."""
    return "utf-8-sig" if codecs.lookup(name).name == "utf-8" else name


class CsvFormat:
    """``format: csv``: a CSV file, one message per data row (a JSON object keyed by column name)."""

    name = "csv"

    def __init__(self, options: CsvOptions | None = None) -> None:
        self.options = options or CsvOptions()

    def configure(self, source: Mapping[str, Any]) -> CsvFormat:
        """This format with a route's ``source:`` options."""
        return CsvFormat(CsvOptions.of(source))

    def parse(self, raw: bytes) -> CsvDocument:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ParseError("not a CSV row record (a JSON object of column -> value)",
                             hint="publish the CSV file: it is split into one record per row") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ParseError("a CSV row record is a JSON object of column name -> text")
        return CsvDocument(data)

    def split(self, stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
        """One record per data row, read as it is needed (see the module docstring)."""
        opts = self.options
        try:
            codecs.lookup(opts.encoding)
        except LookupError:
            yield Record(b"", None, f"source.encoding {opts.encoding!r} is not a known text encoding")
            return
        text = io.TextIOWrapper(io.BufferedReader(_Source(stream)), encoding=_encoding(opts.encoding),
                                errors="surrogateescape", newline="")
        csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
        rows = csv.reader(text, delimiter=opts.delimiter, quotechar=opts.quote, strict=True)
        names: list[str] | None = list(opts.columns) or None
        trailer_seen = False
        position = 0
        try:
            while True:
                line = rows.line_num + 1
                try:
                    row = next(rows)
                except StopIteration:
                    break
                except csv.Error as exc:
                    position += 1
                    info.records = position
                    yield Record(b"", position, f"CSV row {position} (line {line}) does not frame: {exc}",
                                 {LINE_HEADER: line})
                    continue
                if not row or not any(cell.strip() for cell in row):
                    continue
                if opts.header and names is None:
                    problem = _header_problem(row)
                    if problem:
                        yield Record(_row_bytes(row, opts), None, problem)
                        return
                    names = [_unescape(cell.strip()) for cell in row]
                    continue
                if opts.trailer is not None and row[0].strip() == opts.trailer:
                    trailer_seen = True
                    info.declared = _count(row, info)
                    continue
                position += 1
                info.records = position
                if trailer_seen:
                    info.problems.append(f"CSV row {position} (line {line}) comes after the trailer")
                yield _record(row, names, position, line, opts)
        finally:
            text.detach()  # the caller owns the binary stream: it is not closed here
        if opts.trailer is not None and not trailer_seen:
            info.problems.append(f"no trailer line ({opts.trailer},<count>): the row count is not checked")
        elif info.declared is not None and info.declared != position:
            info.problems.append(f"CSV trailer declares {info.declared} rows, the file has {position}")

    def declared_total(self, stream: BinaryIO) -> int | None:
        """The row count a trailer line declares, read from the end of a seekable file (None: no trailer
        configured or found); lets the publisher set ``x-mw-batch-total`` before the first row."""
        trailer = self.options.trailer
        if trailer is None or not stream.seekable():
            return None
        size = stream.seek(0, io.SEEK_END)
        stream.seek(max(size - 4096, 0))
        try:
            lines = stream.read().decode(_encoding(self.options.encoding)).splitlines()
        except (UnicodeDecodeError, LookupError):
            return None
        last = next((line for line in reversed(lines) if line.strip()), "")
        cells = next(csv.reader([last], delimiter=self.options.delimiter, quotechar=self.options.quote), [])
        if len(cells) >= 2 and cells[0].strip() == trailer and cells[1].strip().isdigit():
            return int(cells[1])
        return None

    def compile_path(self, expr: str) -> CsvColumn:
        if not expr or expr != expr.strip():
            raise ValueError(f"invalid CSV column {expr!r}: write the column name as the header row does")
        return CsvColumn(expr)

    def each_scope(self, expr: str) -> None:
        raise ValueError("a CSV row has no repeating groups: each: is not available for format csv")

    def each(self, doc: Any, expr: str) -> list[Any]:
        return [doc]


register("csv", SPEC)(CsvFormat)


class _Source(io.RawIOBase):
    """Any object with ``read(size)`` as a raw stream a text wrapper can read (a counting reader...)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _record(row: list[str], names: list[str] | None, position: int, line: int, opts: CsvOptions) -> Record:
    headers = {LINE_HEADER: line}
    if any(_ESCAPED.search(cell) for cell in row):
        return Record(_row_bytes(row, opts), position,
                      f"CSV row {position} (line {line}) is not valid {opts.encoding}", headers)
    columns = names or [str(index) for index in range(1, len(row) + 1)]
    if len(row) != len(columns):
        return Record(_row_bytes(row, opts), position,
                      f"CSV row {position} (line {line}) has {len(row)} fields, expected {len(columns)}", headers)
    return Record(orjson.dumps(dict(zip(columns, row, strict=True))), position, None, headers)


def _header_problem(row: Sequence[str]) -> str | None:
    names = [cell.strip() for cell in row]
    if any(_ESCAPED.search(name) for name in names):
        return "the CSV header row is not valid in the declared encoding"
    if "" in names:
        return "the CSV header row has an empty column name"
    if len(set(names)) != len(names):
        return "the CSV header row repeats a column name"
    return None


def _count(row: Sequence[str], info: SplitInfo) -> int | None:
    try:
        return int(row[1].strip())
    except (IndexError, ValueError):
        info.problems.append("the CSV trailer line has no row count")
        return None


def _unescape(cell: str) -> str:
    return cell.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _row_bytes(row: Sequence[str], opts: CsvOptions) -> bytes:
    """The row written back in its dialect (dead letters keep the bytes as read where possible)."""
    out = io.StringIO()
    csv.writer(out, delimiter=opts.delimiter, quotechar=opts.quote, lineterminator="\n").writerow(row)
    return out.getvalue().encode(opts.encoding if opts.encoding.lower().startswith("utf-8") else "utf-8",
                                 "surrogateescape")
