"""HL7 v2 (ER7 encoding): a lazy tokenizer and compiled Terser-style path expressions.

Parsing decodes the bytes once (character set from MSH-18), splits segments and indexes them by
id; a segment is split into fields only when a path first reads it, and a field into repetitions,
components and subcomponents only while it is being read. Nothing builds an object model, which
is what makes this fast enough for the hot path (see bench/hl7_parse.py).

Expression grammar (docs/routes.md): ``SEG[sel]-FIELD[sel].COMPONENT.SUBCOMPONENT`` where ``sel``
is a 1-based index ``[2]``, every occurrence ``[*]`` or a filter ``[5=MR]`` (segments: field 5,
fields: component 5; ``[3.1=X]`` reads a subcomponent / component).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO

from middleware import dates
from middleware.errors import ParseError
from middleware.formats import Record, SplitInfo, hl7v2_groups, register
from middleware.formats.hl7v2_values import TypedFieldPath

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_PATH = re.compile(
    r"(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<segsel>[^\]]*)\])?"
    r"(?:-(?P<field>\d+)(?:\[(?P<repsel>[^\]]*)\])?(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?)?"
)
_SELECTOR = re.compile(r"(?P<index>\d+)|(?P<all>\*)|(?P<key>\d+(?:\.\d+)?)=(?P<value>[^\]]*)")
# MSH-18 values (HL7 table 0211) and the Python codec for each; absent means UTF-8 (a superset of
# the standard's ASCII default, which is what senders that omit MSH-18 actually send).
CHARSETS = {
    "": "utf-8",
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc-kr",
    "ISO IR87": "iso2022-jp",
}

# The trigger a v2.1 / v2.2 message code stood for when MSH-9 carried no trigger event (and no EVN-1).
DEFAULT_TRIGGERS = {"ORU": "R01", "ORM": "O01", "ORR": "O02", "DFT": "P03"}

_FORMATTING_ESCAPES = frozenset("HN")  # highlight on/off: removed
_NULL = '""'  # the HL7 explicit null
_UNREAD = object()


@dataclass(frozen=True)
class Delimiters:
    """The message's separators, read from MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""  # v2.7: a fifth encoding character, reserved (not a separator)

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation

    @classmethod
    def from_msh(cls, field: str, encoding: str) -> Delimiters:
        """Check and build; raises :class:`ParseError` for unusable delimiters."""
        chars = field + encoding
        if len(encoding) not in (4, 5) or len(set(chars)) != len(chars) or any(
            c.isalnum() or c in "\r\n " for c in chars
        ):
            raise ParseError("bad delimiters in MSH-1/MSH-2: expected a field separator and 4 or 5 distinct "
                             "encoding characters such as |^~\\&",
                             hint="fix the sending system's MSH segment")
        return cls(field, encoding[0], encoding[1], encoding[2], encoding[3], encoding[4:])


DEFAULT_DELIMITERS = Delimiters()


def escape(value: str, delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Escape ``value`` so it can be written into a field (``|`` -> ``\\F\\`` and so on)."""
    d = delimiters
    out = value.replace(d.escape, f"{d.escape}E{d.escape}")
    for char, code in ((d.field, "F"), (d.component, "S"), (d.subcomponent, "T"), (d.repetition, "R")):
        out = out.replace(char, f"{d.escape}{code}{d.escape}")
    if d.truncation:
        out = out.replace(d.truncation, f"{d.escape}P{d.escape}")
    return out


@lru_cache(maxsize=32)
def _escape_pattern(esc: str) -> re.Pattern[str]:
    e = re.escape(esc)
    return re.compile(f"{e}([^{e}\r\n]*){e}")


class Segment:
    """One segment; fields are split on first use. ``fields[n]`` is field n (MSH included)."""

    __slots__ = ("_fields", "_fs", "id", "raw")

    def __init__(self, raw: str, field_separator: str) -> None:
        self.id = raw[:3]
        self.raw = raw
        self._fs = field_separator
        self._fields: list[str] | None = None

    @property
    def fields(self) -> list[str]:
        if self._fields is None:
            parts = self.raw.split(self._fs)
            if self.id == "MSH":  # MSH-1 is the separator itself: keep numbering uniform
                parts.insert(1, self._fs)
            self._fields = parts
        return self._fields

    def field(self, number: int) -> str:
        """The raw (escaped) text of field ``number``; "" when absent."""
        fields = self.fields
        return fields[number] if number < len(fields) else ""


class Hl7Message:
    """A parsed HL7 v2 message: segments indexed by id, values unescaped as they are read."""

    __slots__ = ("_digest_input", "_index", "_message_type", "_whole", "charset", "delimiters", "segments")

    def __init__(self, segments: list[Segment], delimiters: Delimiters, charset: str,
                 digest_input: bytes | str | None = None) -> None:
        self.segments = segments
        self.delimiters = delimiters
        self.charset = charset
        index: dict[str, list[Segment]] = {}
        for segment in segments:
            index.setdefault(segment.id, []).append(segment)
        self._index = index
        self._message_type: object = _UNREAD
        self._whole: Hl7Message | None = None  # set on group views: the message they are part of
        # the segments joined by CR (their UTF-8 bytes, or the text) when parsing already had them
        self._digest_input = digest_input

    def group(self, segments: list[Segment], own: list[Segment], scoped_ids: set[str],
              context: dict[str, Segment]) -> Hl7Message:
        """A view of one group (see :mod:`.hl7v2_groups`): ``scoped_ids`` resolve to the ones among
        ``own`` only, the ids in ``context`` to the given (nearest preceding) segment, everything else
        as in the whole message. ``segments`` (own plus nested leaf groups) serve nested ``each``."""
        view = Hl7Message.__new__(Hl7Message)
        view.segments, view.delimiters, view.charset = segments, self.delimiters, self.charset
        index = dict(self._index)
        for segment_id, segment in context.items():
            index[segment_id] = [segment]
        for segment_id in scoped_ids:
            index[segment_id] = [s for s in own if s.id == segment_id]
        view._index = index
        view._message_type = self._message_type
        view._whole = self._whole or self
        view._digest_input = None  # a view answers with the whole message's identity
        return view

    def all(self, segment_id: str) -> list[Segment]:
        """Every segment with this id, in order."""
        return self._index.get(segment_id, [])

    def get(self, expr: str) -> str | None:
        """The first value of an expression (convenience; compile paths once on hot paths)."""
        values = compile_path(expr).read(self)
        return values[0] if values else None

    @property
    def message_type(self) -> str | None:
        if self._message_type is _UNREAD:
            self._message_type = self._read_message_type()
        return self._message_type  # type: ignore[return-value]

    def _read_message_type(self) -> str | None:
        msh = self._index["MSH"][0]
        parts = self.components(msh.field(9).split(self.delimiters.repetition, 1)[0])
        code, event = [*parts, "", ""][:2]
        if not code:
            return None
        return f"{self.unescape(code)}^{self.unescape(event)}" if event else self.unescape(code)

    @property
    def implied_message_type(self) -> str | None:
        """For an MSH-9 without a trigger event (v2.1 / v2.2 send ``ORU``, ``ADT``): the type it stands for,
        ``ADT^A01`` with the trigger from EVN-1 (where those versions put it), else the code's only
        trigger in those versions (``ORU`` -> ``ORU^R01``); None when the trigger is sent or unknown."""
        code = self.message_type
        if not code or "^" in code:
            return None
        trigger = self.get("EVN-1") or DEFAULT_TRIGGERS.get(code)
        return f"{code}^{trigger}" if trigger else None

    @property
    def message_id(self) -> str | None:
        return self.get("MSH-10")

    @property
    def version(self) -> str | None:
        return self.get("MSH-12.1")

    def source_identity(self) -> tuple[str, ...]:
        """What makes this message unique among all senders' (event ids are derived from it): MSH-3
        (sending application), MSH-4 (sending facility), MSH-10 (control id) and MSH-7 (time), as sent,
        plus a SHA-256 of the segments (line breaks and framing normalised by parsing). The digest keeps
        two different messages apart even when a sender reuses a control id within one MSH-7; the same
        message sent again, re-framed or with other line breaks, keeps its identity."""
        whole = self._whole or self  # a group view answers for the whole message
        msh = whole.segments[0]
        joined = whole._digest_input
        if joined is None:
            joined = "\r".join(s.raw for s in whole.segments)
        digest = hashlib.sha256(joined.encode() if isinstance(joined, str) else joined).hexdigest()
        return msh.field(3), msh.field(4), msh.field(10), msh.field(7), f"sha256:{digest}"

    def occurred_at(self) -> str | None:
        """EVN-6 (event occurred), else EVN-2 (recorded), else MSH-7, as ISO 8601: the first that has a
        time of day, else the first valid date (a year-only EVN-6 does not hide a full EVN-2)."""
        when = self.occurred_when()
        return None if when is None else when.iso()

    def occurred_when(self) -> dates.When | None:
        """:meth:`occurred_at` as a checked value (the envelope ``time`` is built from it unformatted)."""
        fallback = None
        for path in _OCCURRED_PATHS:
            values = path.read(self)
            if values:
                try:
                    when = dates.parse_hl7(values[0])
                except dates.DateFormatError:
                    continue
                if when.hour is not None:  # Precision.DATETIME
                    return when
                fallback = fallback or when
        return fallback

    def components(self, text: str) -> list[str]:
        return text.split(self.delimiters.component)

    def unescape(self, text: str) -> str:
        """Decode escape sequences; unknown or unterminated ones are kept as sent."""
        esc = self.delimiters.escape
        if esc not in text:
            return text
        return _escape_pattern(esc).sub(self._replace_escape, text)

    def _replace_escape(self, match: re.Match[str]) -> str:
        code = match.group(1)
        d = self.delimiters
        simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": d.escape,
                  "P": d.truncation}
        if code in simple:
            return simple[code]
        if code in _FORMATTING_ESCAPES:
            return ""
        head, rest = code[:1], code[1:]
        if head == "X" and rest and len(rest) % 2 == 0:
            try:
                return bytes.fromhex(rest).decode(self.charset, "replace")
            except ValueError:
                return match.group(0)
        if head in ("C", "M", "Z"):  # character-set switches and site-defined escapes: no text
            return ""
        if head == ".":
            command, _, argument = rest.partition(" ")
            command = command[:2]
            if command == "br":
                return "\n"
            if command == "sp":
                count = int(argument) if argument.strip().isdigit() else 1
                return "\n" * max(count, 1)
            return ""  # .in .ti .sk .ce .fi .nf: layout only
        return match.group(0)


@dataclass(frozen=True)
class _Selector:
    index: int | None = None  # 1-based
    every: bool = False
    key: tuple[int, int] | None = None  # (component, subcomponent) or (field, component)
    value: str = ""

    @property
    def narrows(self) -> bool:
        return self.index is not None or self.key is not None


def _selector(text: str | None, expr: str) -> _Selector:
    if text is None:
        return _Selector(index=1)
    match = _SELECTOR.fullmatch(text)
    if not match:
        raise ValueError(f"invalid HL7 path {expr!r}: selector [{text}] must be [n], [*] or [k=VALUE]")
    if match["index"]:
        if int(match["index"]) < 1:
            raise ValueError(f"invalid HL7 path {expr!r}: indexes start at 1")
        return _Selector(index=int(match["index"]))
    if match["all"]:
        return _Selector(every=True)
    major, _, minor = match["key"].partition(".")
    if int(major) < 1 or (minor and int(minor) < 1):
        raise ValueError(f"invalid HL7 path {expr!r}: positions start at 1")
    return _Selector(key=(int(major), int(minor or 1)), value=match["value"])


def _pick(items: list[Any], selector: _Selector, matches: Any) -> list[Any]:
    if selector.every:
        return items
    if selector.index is not None:
        return items[selector.index - 1:selector.index]
    return [item for item in items if matches(item)]


@dataclass(frozen=True)
class Hl7Path:
    """A compiled expression such as ``PID-3[5=MR].1`` or ``OBX[*]-5``."""

    expr: str
    segment: str
    segment_selector: _Selector
    field: int | None
    repetition_selector: _Selector
    component: int | None
    subcomponent: int | None

    @property
    def multiple(self) -> bool:
        return self.segment_selector.every or self.repetition_selector.every

    @property
    def _simple(self) -> bool:
        """First segment, first repetition, an ordinary field: the common case, read without detours."""
        return (self.segment_selector.index == 1 and self.repetition_selector.index == 1
                and self.field is not None and not (self.segment == "MSH" and self.field <= 2))

    def __post_init__(self) -> None:
        if self._simple:
            object.__setattr__(self, "read", self._read_simple)  # per-instance fast path

    def _read_simple(self, doc: Any) -> list[Any]:
        message: Hl7Message = doc
        segments = message._index.get(self.segment)
        if not segments:
            return []
        fields = segments[0].fields
        number = self.field
        assert number is not None
        if number >= len(fields):
            return []
        raw = fields[number]
        if not raw:
            return []
        d = message.delimiters
        if d.repetition in raw:
            raw = raw.split(d.repetition, 1)[0]
        comp = self.component or 1
        if d.component in raw:
            parts = raw.split(d.component, comp)  # parts[comp - 1] is exactly component `comp`
            value = parts[comp - 1] if comp <= len(parts) else ""
        else:
            value = raw if comp == 1 else ""
        if not value:
            return []
        sub = self.subcomponent or 1
        if d.subcomponent in value:
            subs = value.split(d.subcomponent)
            value = subs[sub - 1] if sub <= len(subs) else ""
        elif sub != 1:
            return []
        if not value or value == _NULL:
            return []
        return [message.unescape(value) if d.escape in value else value]

    def select_segments(self, message: Hl7Message) -> list[Segment]:
        """The segments this expression's segment part selects."""
        segments = message._index.get(self.segment)
        if not segments:
            return []
        return _pick(segments, self.segment_selector, lambda s: self._segment_matches(message, s))

    def read(self, doc: Any) -> list[Any]:
        message: Hl7Message = doc
        segments = self.select_segments(message)
        if not segments:
            return []
        if self.field is None:
            return [s.raw for s in segments]
        if self.segment == "MSH" and self.field in (1, 2):
            return [s.field(self.field) for s in segments if s.field(self.field)]
        out: list[Any] = []
        d = message.delimiters
        rep_sel = self.repetition_selector
        for segment in segments:
            raw = segment.field(self.field)
            if not raw:
                continue
            if rep_sel.index == 1:
                reps = [raw.split(d.repetition, 1)[0]]
            else:
                reps = _pick(raw.split(d.repetition), rep_sel, lambda r: self._repetition_matches(message, r))
            for rep in reps:
                value = self._value(message, rep)
                if value and value != _NULL:
                    out.append(message.unescape(value))
        return out

    def _value(self, message: Hl7Message, repetition: str) -> str:
        d = message.delimiters
        comp = self.component or 1
        if d.component in repetition:
            parts = repetition.split(d.component)
            value = parts[comp - 1] if comp <= len(parts) else ""
        else:
            value = repetition if comp == 1 else ""
        sub = self.subcomponent or 1
        if d.subcomponent in value:
            subs = value.split(d.subcomponent)
            return subs[sub - 1] if sub <= len(subs) else ""
        return value if sub == 1 else ""

    def _repetition_matches(self, message: Hl7Message, repetition: str) -> bool:
        selector = self.repetition_selector
        assert selector.key is not None
        component, sub = selector.key
        parts = repetition.split(message.delimiters.component)
        value = parts[component - 1] if component <= len(parts) else ""
        subs = value.split(message.delimiters.subcomponent)
        value = subs[sub - 1] if sub <= len(subs) else ""
        return message.unescape(value) == selector.value

    def _segment_matches(self, message: Hl7Message, segment: Segment) -> bool:
        selector = self.segment_selector
        assert selector.key is not None
        field, component = selector.key
        first = segment.field(field).split(message.delimiters.repetition, 1)[0]
        parts = first.split(message.delimiters.component)
        value = parts[component - 1] if component <= len(parts) else ""
        return message.unescape(value) == selector.value


@lru_cache(maxsize=4096)
def compile_path(expr: str) -> Hl7Path:
    """Compile an HL7 v2 expression; raises ``ValueError`` saying what is wrong."""
    match = _PATH.fullmatch(expr.strip())
    if not match:
        raise ValueError(f"invalid HL7 path {expr!r}: expected SEG-FIELD[.COMPONENT[.SUBCOMPONENT]], "
                         "e.g. PID-3.1, PID-3[5=MR].1 or OBX[*]-5")
    numbers = [int(match[g]) if match[g] else None for g in ("field", "comp", "sub")]
    if any(n is not None and n < 1 for n in numbers):
        raise ValueError(f"invalid HL7 path {expr!r}: field, component and subcomponent numbers start at 1")
    if match["field"] is None and match["repsel"] is not None:
        raise ValueError(f"invalid HL7 path {expr!r}: a repetition selector needs a field")
    return Hl7Path(expr, match["seg"], _selector(match["segsel"], expr), numbers[0],
                   _selector(match["repsel"], expr), numbers[1], numbers[2])


_OCCURRED_PATHS = tuple(compile_path(expr) for expr in ("EVN-6", "EVN-2", "MSH-7"))


# -- parsing ----------------------------------------------------------------------------------


def _charset(raw: bytes) -> str:
    """The codec named by MSH-18, read from the undecoded bytes (MSH is ASCII by definition)."""
    end = len(raw)
    for stop in (b"\r", b"\n"):
        found = raw.find(stop)
        if found != -1:
            end = min(end, found)
    header = raw[:end]
    if len(header) < 4:
        return "utf-8"
    parts = header.split(header[3:4])
    if len(parts) < 18:
        return "utf-8"
    declared = parts[17].split(b"~", 1)[0].split(b"^", 1)[0].decode("ascii", "replace").strip().upper()
    try:
        return CHARSETS[declared]
    except KeyError:
        raise ParseError(f"unsupported character set {declared!r} in MSH-18",
                         hint=f"use one of: {', '.join(k for k in CHARSETS if k)}") from None


@lru_cache(maxsize=256)
def _segment_id_ok(candidate: str) -> bool:
    return _SEGMENT_ID.fullmatch(candidate) is not None


@lru_cache(maxsize=64)
def _delimiters(field_separator: str, encoding: str) -> Delimiters:
    return Delimiters.from_msh(field_separator, encoding)


def parse(raw: bytes) -> Hl7Message:
    """Parse one ER7-encoded message; raises :class:`ParseError` saying what is wrong."""
    data = raw.lstrip(b"\x0b\r\n\t ").rstrip(b"\x1c\r\n")  # MLLP framing, blank lines; values keep spaces
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:].lstrip(b"\r\n\t ")
    if not data:
        raise ParseError("input is empty", hint="send one HL7 v2 message starting with MSH")
    if data.startswith((b"FHS", b"BHS")):
        raise ParseError("this is an HL7 batch (FHS/BHS), not one message",
                         hint="publish batch files with `middleware publish`, which splits them")
    if not data.startswith(b"MSH"):
        raise ParseError("no MSH segment at the start of the message",
                         hint="an HL7 v2 message starts with MSH|^~\\&|")
    charset = _charset(data)
    try:
        text = data.decode(charset)
    except UnicodeDecodeError as exc:
        raise ParseError(f"bytes at offset {exc.start} are not valid {charset} (character set from MSH-18)",
                         hint="declare the sender's character set in MSH-18, e.g. 8859/1") from None
    except LookupError:
        raise ParseError(f"character set {charset!r} is not available on this system") from None
    if len(text) < 8:
        raise ParseError("truncated message: MSH has no encoding characters", hint="send a whole message")
    field_separator = text[3]
    end = text.find(field_separator, 4)
    delimiters = _delimiters(field_separator, text[4:end] if end != -1 else text[4:].split("\r", 1)[0])
    normalised = None
    if "\n" in text:
        text = normalised = text.replace("\r\n", "\r").replace("\n", "\r")
    segments: list[Segment] = []
    skipped = False
    for number, line in enumerate(text.split("\r"), start=1):
        if not line or (line[0] in " \t" and line.isspace()):
            skipped = True
            continue
        if not _segment_id_ok(line[:3]) or (len(line) > 3 and line[3] != field_separator):
            raise ParseError(f"segment {number} does not start with a segment id followed by "
                             f"{field_separator!r}",
                             hint="segments are separated by CR; check for line breaks inside field values")
        segments.append(Segment(line, field_separator))
    # what source_identity digests is the segments joined by CR, UTF-8: with no line skipped, that is the
    # text itself, and the undecoded bytes when they were UTF-8 (or ASCII) with CR line ends already
    digest_input = None if skipped else data if normalised is None and charset in ("utf-8", "ascii") else text
    message = Hl7Message(segments, delimiters, charset, digest_input)
    if len(message.all("MSH")) > 1:
        raise ParseError(f"{len(message.all('MSH'))} messages in one (MSH repeated)",
                         hint="publish batches with `middleware publish`, which splits them")
    if not message.segments[0].field(9):
        raise ParseError("truncated message: MSH has no message type (MSH-9)",
                         hint="send a whole message; MSH needs at least 12 fields")
    return message


# -- timestamps -------------------------------------------------------------------------------


def hl7_date_to_iso(text: str) -> str:
    """``19840312`` -> ``1984-03-12``, ``197405`` -> ``1974-05``: the date part at the precision sent.

    Raises :class:`middleware.dates.DateFormatError` (a ``ValueError``) for anything that is not a DT/DTM.
    """
    return dates.parse_hl7(text).truncate(dates.Precision.DAY).iso()


def hl7_timestamp_to_iso(text: str) -> str:
    """``20261124082500+0100`` -> ``2026-11-24T08:25:00+01:00``; ``1974`` stays ``1974`` (precision as sent).

    Minutes alone give ``HH:MM:00``; fraction digits and the offset are kept as sent. Raises
    :class:`middleware.dates.DateFormatError` (a ``ValueError``) for anything that is not a DTM / TS.
    """
    return dates.parse_hl7(text).iso()


@register("hl7v2")
class Hl7v2Format:
    """``format: hl7v2``: one ER7-encoded HL7 v2 message per broker message."""

    name = "hl7v2"

    def parse(self, raw: bytes) -> Hl7Message:
        return parse(raw)

    def split(self, stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
        """HL7 batch files (FHS/BHS...BTS/FTS, or messages one after another): one record per message."""
        from middleware.formats.hl7batch import split_records

        return split_records(stream, info)

    def declared_total(self, stream: BinaryIO) -> int | None:
        """BTS-1 of a single-batch file, before publishing (``x-mw-batch-total``); see hl7batch."""
        from middleware.formats.hl7batch import declared_total

        return declared_total(stream)

    def compile_path(self, expr: str) -> Hl7Path:
        return compile_path(expr)

    def check_structure(self, doc: Any) -> None:
        """``validation: strict``: hl7apy structure conformance (see :mod:`.hl7v2_strict`)."""
        from middleware.formats.hl7v2_strict import check_structure

        check_structure(doc)

    def compile_typed(self, expr: str, type_expr: str) -> TypedFieldPath:
        """``{path: OBX-5, typed_by: OBX-2}``: the whole field, typed by another field of the same segment."""
        path, kind = compile_path(expr), compile_path(type_expr)
        if path.field is None or path.component is not None or path.repetition_selector != _Selector(index=1):
            raise ValueError(f"typed_by reads a whole field: {expr!r} must be SEG-FIELD, e.g. OBX-5")
        plain = kind.segment_selector == _Selector(index=1) and kind.repetition_selector == _Selector(index=1)
        if kind.segment != path.segment or kind.field is None or kind.component is not None or not plain:
            raise ValueError(f"typed_by names a field of the same segment as the path, e.g. {path.segment}-2")
        return TypedFieldPath(f"{expr} typed by {type_expr}", path, kind.field)

    def each_scope(self, expr: str) -> None:
        path = compile_path(expr)
        if path.field is not None:
            raise ValueError(f"each: {expr!r} must name a segment (OBX, OBX[3=NM]), not a field")

    def each(self, doc: Any, expr: str) -> list[Any]:
        """``each: OBX`` / ``for_each: OBR``: one view per group anchored at the selected segments, its
        membership following the HL7 message structure (:mod:`.hl7v2_groups`): an OBX with its NTEs, an
        OBR with its ORC, OBXs and notes, a PID with its MRG. Groups nest (``each: OBX`` in an OBR group)."""
        message: Hl7Message = doc
        path = compile_path(expr if "[" in expr else f"{expr}[*]")
        return hl7v2_groups.split(message, path.select_segments(message), path.segment)
