"""ASC X12 5010 files (834 enrolment, 270/271 eligibility), streamed member by member.

Splitting (``Format.split``) reads the file in chunks and yields one record per member: an 834 member
loop 2000 (each ``INS`` starts one), a 270/271 subscriber or dependent ``HL`` loop (``HL-3`` 22 or 23);
any other transaction set is one record per ``ST``..``SE``. Delimiters come from each ``ISA``: the
element separator at position 4, the repetition separator ISA-11 (5010), the component separator
ISA-16 and the segment terminator right after it; CR/LF after a terminator is ignored.

A record is a small X12 document that reads on its own: the ``ISA``, ``GS`` and ``ST`` segments, the
transaction's header segments (834: ``BGN``, ``N1`` sponsor/payer...; 271: ``BHT`` and the information
source/receiver ``HL`` loops, plus the subscriber loop for a dependent), then the member's own segments;
the trailers (``SE``/``GE``/``IEA``) describe the whole file and are not repeated. The envelope control
numbers travel as headers ``x-mw-x12-isa13``, ``x-mw-x12-gs06``, ``x-mw-x12-st02`` (and
``x-mw-x12-st01``, the transaction set). ``SE-1`` segment counts, ``SE-2``/``GE-2``/``IEA-2`` control
numbers and ``GE-1``/``IEA-1`` counts are checked; a mismatch is a problem on the file
(:class:`~middleware.formats.SplitInfo`), never a reason to drop records. Segments that cannot be
placed (data before an ``ISA``, a segment outside ``ST``..``SE``) are a record that cannot be framed:
it is dead-lettered alone with its position.

Paths (see docs/routes.md, "X12 expressions"): ``INS-1``, ``NM1[IL]-9`` (the first ``NM1`` whose
first element is ``IL``), ``DTP[348]-3``, ``REF[0F]-2``, components ``HD-3.1``; ``SEG[*]-n`` reads
every matching segment; envelope values read the same way (``ISA-6``, ``GS-2``, ``ST-1``).
Elements are numbered as in the implementation guides (``NM1-9`` is NM109); values are trimmed
(ISA pads its fields with spaces).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from middleware.errors import ParseError
from middleware.formats import Record, SplitInfo, register

_CHUNK = 1 << 16
_ISA_LENGTH = 106  # ISA is fixed length: 105 characters and the segment terminator
_BOM = b"\xef\xbb\xbf"
_SPACE = b"\r\n\t "
_MAX_SEGMENT = 1 << 20  # no X12 segment comes near this: a file without terminators is not read whole
_PATH = re.compile(r"([A-Z][A-Z0-9]{1,2})(?:\[([^\]\s]+)\])?(?:-(\d+)(?:\.(\d+))?)?")
_TAG = re.compile(rb"[A-Z][A-Z0-9]{1,2}")
HEADER_PREFIX = "x-mw-x12-"


@dataclass(frozen=True)
class Delimiters:
    """The separators an ``ISA`` declares."""

    element: bytes
    repetition: bytes | None  # ISA-11 in 5010; None when it is a letter (4010's "U")
    component: bytes
    segment: bytes

    @classmethod
    def from_isa(cls, isa: bytes) -> Delimiters:
        """Read them from the first 106 bytes of an interchange; raises ParseError if it is no ISA."""
        if len(isa) < _ISA_LENGTH or not isa.startswith(b"ISA"):
            raise ParseError("an X12 interchange starts with a 106-character ISA segment",
                             hint="check that the file is X12 and not cut off")
        element, repetition, component, segment = isa[3:4], isa[82:83], isa[104:105], isa[105:106]
        if isa[6:7] != element and isa.count(element, 0, 105) != 16:
            raise ParseError("the ISA segment does not have 16 elements of fixed width",
                             hint="ISA fields are padded to their full width")
        if segment.isalnum() or component.isalnum() or len({element, component, segment}) < 3:
            raise ParseError("the ISA segment declares unusable delimiters",
                             hint="element separator at position 4, ISA-16 component separator, then the "
                                  "segment terminator")
        usable = not repetition.isalnum() and repetition not in (element, component, segment)
        return cls(element, repetition if usable else None, component, segment)


# -- streaming ------------------------------------------------------------------------------------


class _Segments:
    """Segments of a stream, read chunk by chunk; delimiters are read again at every ``ISA``."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.delimiters: Delimiters | None = None
        self.error: str | None = None  # set when the rest of the stream cannot be read as X12

    def _fill(self, buffer: bytes, size: int) -> bytes:
        while len(buffer) < size:
            more = self.stream.read(_CHUNK)
            if not more:
                break
            buffer += more
        return buffer

    def _stop(self, buffer: bytes, why: str) -> bytes:
        self.error = why
        return buffer[:200]  # what the dead letter shows; the rest of the stream is not read

    def __iter__(self) -> Iterator[bytes]:
        buffer = self._fill(b"", len(_BOM)).removeprefix(_BOM)
        while True:
            buffer = self._fill(buffer.lstrip(_SPACE), _ISA_LENGTH).lstrip(_SPACE)
            buffer = self._fill(buffer, _ISA_LENGTH)
            if not buffer:
                return
            if buffer.startswith(b"ISA"):
                try:
                    self.delimiters = Delimiters.from_isa(buffer[:_ISA_LENGTH])
                except ParseError as exc:
                    yield self._stop(buffer, exc.message)
                    return
            elif self.delimiters is None:
                yield self._stop(buffer, "the file does not start with an ISA segment")
                return
            terminator, element = self.delimiters.segment, self.delimiters.element
            pieces: list[bytes] = []  # the segment being read, chunk by chunk
            size = 0
            rest: bytes | None = None  # what follows an IEA (maybe another interchange)
            while rest is None:
                parts = buffer.split(terminator)
                if len(parts) > 1:
                    parts[0] = b"".join((*pieces, parts[0]))
                    pieces, size = [], 0
                    for index, part in enumerate(parts[:-1]):
                        segment = part.strip(_SPACE)
                        if segment:
                            yield segment
                        if segment[:3] == b"IEA" and segment[3:4] in (b"", element):
                            rest = terminator.join(parts[index + 1:])
                            break
                    if rest is not None:
                        break
                pieces.append(parts[-1])
                size += len(parts[-1])
                if size > _MAX_SEGMENT:
                    yield self._stop(b"".join(pieces), f"a segment longer than {_MAX_SEGMENT} bytes "
                                                       "(no segment terminator?)")
                    return
                buffer = self.stream.read(_CHUNK)
                if not buffer:
                    tail = b"".join(pieces).strip(_SPACE)
                    if tail:
                        yield tail
                    return
            buffer = rest


def _element(segment: bytes, element: bytes, number: int) -> str:
    parts = segment.split(element)
    return parts[number].decode("latin-1").strip() if number < len(parts) else ""


@dataclass
class _Transaction:
    """The state of one ``ST``..``SE`` while its segments are read."""

    st: bytes
    header: list[bytes] = field(default_factory=list)  # before the first member
    levels: dict[str, tuple[str, list[bytes]]] = field(default_factory=dict)  # 27x HL code -> (id, loop)
    member: list[bytes] | None = None
    member_context: list[bytes] = field(default_factory=list)  # 27x: the ancestors of the member loop
    broken: str | None = None  # why the member being read cannot be framed
    count: int = 1  # segments so far, ST included


class _Splitter:
    """Turns the segment stream into records (see the module docstring)."""

    def __init__(self, stream: BinaryIO, info: SplitInfo) -> None:
        self.segments = _Segments(stream)
        self.info = info
        self.isa: bytes | None = None
        self.gs: bytes | None = None
        self.tx: _Transaction | None = None
        self.groups = 0
        self.transactions = 0  # in the current group
        self.position = 0

    @property
    def d(self) -> Delimiters:
        assert self.segments.delimiters is not None
        return self.segments.delimiters

    def _el(self, segment: bytes, number: int) -> str:
        return _element(segment, self.d.element, number)

    def _problem(self, text: str) -> None:
        self.info.problems.append(text)

    def _record(self, body: Sequence[bytes]) -> Record:
        self.position += 1
        self.info.records = self.position
        tx = self.tx
        assert tx is not None and self.isa is not None and self.gs is not None
        joined = self.d.segment + b"\n"
        raw = joined.join([self.isa, self.gs, tx.st, *tx.header, *body]) + joined
        return Record(raw, self.position, headers=self._headers())

    def _headers(self) -> dict[str, str | int]:
        """The control numbers of the envelope being read (those known so far)."""
        headers: dict[str, str | int] = {}
        for key, segment, number in (("isa13", self.isa, 13), ("gs06", self.gs, 6),
                                     ("st01", self.tx and self.tx.st, 1), ("st02", self.tx and self.tx.st, 2)):
            if segment:
                headers[HEADER_PREFIX + key] = self._el(segment, number)
        return headers

    def _broken(self, segments: Sequence[bytes], why: str) -> Record:
        self.position += 1
        self.info.records = self.position
        headers = self._headers() if self.segments.delimiters is not None else {}
        return Record(b"\n".join(segments), self.position, error=why, headers=headers)

    def _flush_member(self) -> Iterator[Record]:
        tx = self.tx
        if tx is not None and tx.member:
            if tx.broken is None:
                yield self._record([*tx.member_context, *tx.member])
            else:
                yield self._broken(tx.member, tx.broken)
        if tx is not None:
            tx.member, tx.broken = None, None

    def __iter__(self) -> Iterator[Record]:
        stray: list[bytes] = []  # segments that belong nowhere, dead-lettered as one record
        for segment in self.segments:
            if self.segments.error is not None:
                yield self._broken([segment[:200]], self.segments.error)
                continue
            tag = segment.split(self.d.element, 1)[0]
            if tag != b"ISA" and self.tx is None and tag not in (b"GS", b"GE", b"IEA", b"ST"):
                stray.append(segment)
                continue
            if stray:
                yield self._broken(stray, f"{len(stray)} segment(s) outside a transaction set (ST..SE)")
                stray = []
            yield from self._segment(tag, segment)
        if stray:
            yield self._broken(stray, f"{len(stray)} segment(s) outside a transaction set (ST..SE)")
        if self.tx is not None:
            yield from self._flush_member()
            self._problem(f"transaction set ST-2 {self._el(self.tx.st, 2)}: no SE trailer")
        if self.gs is not None:
            self._problem(f"functional group GS-6 {self._el(self.gs, 6)}: no GE trailer")
        if self.isa is not None:
            self._problem(f"interchange ISA-13 {self._el(self.isa, 13)}: no IEA trailer")

    def _segment(self, tag: bytes, segment: bytes) -> Iterator[Record]:
        if tag == b"ISA":
            if self.isa is not None:
                self._problem(f"interchange ISA-13 {self._el(self.isa, 13)}: no IEA trailer")
            self.isa, self.gs, self.tx, self.groups = segment, None, None, 0
            self.info.batch_id = self.info.batch_id or self._el(segment, 13)
        elif tag == b"GS":
            self.gs, self.transactions = segment, 0
            self.groups += 1
        elif tag == b"ST":
            if self.tx is not None:
                yield from self._flush_member()
                self._problem(f"transaction set ST-2 {self._el(self.tx.st, 2)}: no SE trailer")
            if self.gs is None or self.isa is None:
                self.tx = None
                yield self._broken([segment], "an ST segment outside a GS functional group")
                return
            self.tx = _Transaction(segment)
            self.transactions += 1
        elif tag == b"SE":
            tx = self.tx
            if tx is None:
                return
            yield from self._flush_member()
            tx.count += 1
            declared, control = self._el(segment, 1), self._el(segment, 2)
            if declared != str(tx.count):
                self._problem(f"transaction set ST-2 {self._el(tx.st, 2)}: SE-1 declares {declared or 'no'} "
                              f"segment(s), it holds {tx.count}")
            if control != self._el(tx.st, 2):
                self._problem(f"transaction set ST-2 {self._el(tx.st, 2)}: SE-2 is {control!r}")
            self.tx = None
        elif tag == b"GE":
            if self.gs is not None:
                declared, control = self._el(segment, 1), self._el(segment, 2)
                if declared != str(self.transactions):
                    self._problem(f"functional group GS-6 {self._el(self.gs, 6)}: GE-1 declares {declared or 'no'} "
                                  f"transaction set(s), it holds {self.transactions}")
                if control != self._el(self.gs, 6):
                    self._problem(f"functional group GS-6 {self._el(self.gs, 6)}: GE-2 is {control!r}")
            self.gs = None
        elif tag == b"IEA":
            if self.isa is not None:
                declared, control = self._el(segment, 1), self._el(segment, 2)
                if declared != str(self.groups):
                    self._problem(f"interchange ISA-13 {self._el(self.isa, 13)}: IEA-1 declares {declared or 'no'} "
                                  f"functional group(s), it holds {self.groups}")
                if control != self._el(self.isa, 13):
                    self._problem(f"interchange ISA-13 {self._el(self.isa, 13)}: IEA-2 is {control!r}")
            self.isa = None
        else:
            yield from self._body(tag, segment)

    def _body(self, tag: bytes, segment: bytes) -> Iterator[Record]:
        tx = self.tx
        assert tx is not None
        tx.count += 1
        kind = self._el(tx.st, 1)
        if not _TAG.fullmatch(tag):
            why = f"segment {tx.count} of transaction set ST-2 {self._el(tx.st, 2)} has no valid segment id"
            if tx.member is not None:
                tx.broken = tx.broken or why
                tx.member.append(segment)
            else:
                self._problem(why)
            return
        if kind == "834":
            if tag == b"INS":
                yield from self._flush_member()
                tx.member = [segment]
            elif tx.member is not None:
                tx.member.append(segment)
            else:
                tx.header.append(segment)
        elif kind in ("270", "271"):
            if tag == b"HL":
                yield from self._flush_member()
                hl_id, parent, code = self._el(segment, 1), self._el(segment, 2), self._el(segment, 3)
                if code in ("22", "23"):
                    tx.member = [segment]
                    tx.member_context = [s for level in ("20", "21") for s in tx.levels.get(level, ("", []))[1]]
                    if code == "23" and "22" in tx.levels and tx.levels["22"][0] == parent:
                        tx.member_context += [s for s in tx.levels["22"][1]  # who the subscriber is, not
                                              if s.split(self.d.element, 1)[0] in (b"HL", b"NM1")]  # their data
                    if code == "22":
                        tx.levels["22"] = (hl_id, tx.member)  # the same list: a dependent gets all of it
                else:
                    tx.member = None
                    tx.levels = {k: v for k, v in tx.levels.items() if k < code}
                    tx.levels[code] = (hl_id, [segment])
            elif tx.member is not None:
                tx.member.append(segment)
            elif tx.levels:
                tx.levels[max(tx.levels)][1].append(segment)
            else:
                tx.header.append(segment)
        else:  # another transaction set: one record for all of it
            if tx.member is None:
                tx.member = []
            tx.member.append(segment)


def split_records(stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
    """The records of an X12 file for publishing (``Format.split`` of ``x12``); see the module docstring."""
    return iter(_Splitter(stream, info))


# -- documents and paths --------------------------------------------------------------------------


@dataclass
class X12Document:
    """One record: its segments split into elements (strings), in order, envelope included."""

    segments: list[list[str]]
    delimiters: Delimiters
    by_tag: dict[str, list[list[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for segment in self.segments:
            self.by_tag.setdefault(segment[0], []).append(segment)

    def first(self, tag: str) -> list[str] | None:
        found = self.by_tag.get(tag)
        return found[0] if found else None

    def value(self, tag: str, number: int) -> str:
        segment = self.first(tag)
        return segment[number] if segment is not None and number < len(segment) else ""

    @property
    def message_type(self) -> str | None:
        """The transaction set (``ST-1``): ``834``, ``270``, ``271``..."""
        return self.value("ST", 1) or None

    @property
    def message_id(self) -> str | None:
        """``ISA-13/GS-6/ST-2``: the control numbers of the transaction set the record came from."""
        parts = (self.value("ISA", 13), self.value("GS", 6), self.value("ST", 2))
        return "/".join(parts) if any(parts) else None

    def source_identity(self) -> tuple[str, ...]:
        """Sender (``ISA-6``), control numbers and a digest of the record's segments (several members of
        one transaction set share its control numbers, so the digest tells them apart)."""
        content = "\n".join("\x1f".join(s) for s in self.segments if s[0] not in ("ISA", "GS"))
        return (self.value("ISA", 5), self.value("ISA", 6), self.value("ISA", 13), self.value("GS", 6),
                self.value("ST", 2), "sha256:" + hashlib.sha256(content.encode()).hexdigest())

    def occurred_at(self) -> str | None:
        """When the transaction was created: 834 ``BGN-3``/``BGN-4``, 27x ``BHT-4``/``BHT-5``, else
        ``GS-4``/``GS-5`` (no offset: read in ``engine.timezone``)."""
        for tag, day, time in (("BGN", 3, 4), ("BHT", 4, 5), ("GS", 4, 5)):
            date = self.value(tag, day)
            if len(date) == 8 and date.isdigit():
                clock = self.value(tag, time)
                iso = f"{date[:4]}-{date[4:6]}-{date[6:]}"
                if len(clock) >= 4 and clock[:4].isdigit():
                    iso += f"T{clock[:2]}:{clock[2:4]}"
                    if len(clock) >= 6 and clock[4:6].isdigit():
                        iso += f":{clock[4:6]}"
                return iso
        return None


@dataclass(frozen=True)
class X12Path:
    """A compiled X12 path (``NM1[IL]-9``, ``HD-3.1``, ``REF[*]-2``)."""

    expr: str
    tag: str
    qualifier: str | None  # the first element's value a segment must have; None: any
    element: int | None  # None: the segment itself (for each:)
    component: int | None
    multiple: bool

    def segments(self, doc: X12Document) -> list[list[str]]:
        found = doc.by_tag.get(self.tag, [])
        if self.qualifier is not None:
            found = [s for s in found if len(s) > 1 and s[1] == self.qualifier]
        return found

    def read(self, doc: Any) -> list[Any]:
        if not isinstance(doc, X12Document) or self.element is None:
            return []
        values: list[Any] = []
        repetition, component = doc.delimiters.repetition, doc.delimiters.component
        for segment in self.segments(doc):
            if self.element >= len(segment):
                continue
            value = segment[self.element]
            if repetition is not None and self.tag != "ISA":
                value = value.split(repetition.decode("latin-1"), 1)[0]
            if self.component is not None:
                parts = value.split(component.decode("latin-1"))
                value = parts[self.component - 1] if self.component <= len(parts) else ""
            value = value.strip()
            if value:
                values.append(value)
        return values


@register("x12")
class X12Format:
    """``format: x12``: ASC X12 5010 files (834, 270/271; other transaction sets one record each)."""

    name = "x12"

    def parse(self, raw: bytes) -> X12Document:
        start = raw.removeprefix(_BOM).lstrip(b"\r\n\t ")
        if not start:
            raise ParseError("input is empty", hint="send an X12 interchange (ISA...)")
        if not start.startswith(b"ISA"):
            raise ParseError("an X12 record starts with an ISA segment", hint="check that the input is X12")
        delimiters = Delimiters.from_isa(start[:_ISA_LENGTH])
        text = start.decode("latin-1")
        element = delimiters.element.decode("latin-1")
        segments = [piece.strip("\r\n").split(element)
                    for piece in text.split(delimiters.segment.decode("latin-1")) if piece.strip("\r\n\t ")]
        for segment in segments:
            segment[:] = [segment[0].strip(), *(v.strip() for v in segment[1:])]
        tags = [s[0] for s in segments]
        for tag in ("GS", "ST"):
            if tag not in tags:
                raise ParseError(f"no {tag} segment: an X12 record holds ISA, GS and ST",
                                 hint="publish X12 files whole: publish splits them into records")
        members = tags.count("INS") if "INS" in tags else _hl_members(segments)
        if members > 1:
            raise ParseError(f"the input holds {members} members; a record holds one",
                             hint="publish splits a file into one record per member")
        return X12Document(segments, delimiters)

    def split(self, stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
        return split_records(stream, info)

    def compile_path(self, expr: str) -> X12Path:
        match = _PATH.fullmatch(expr.strip())
        if not match or match.group(3) is None:
            raise ValueError(f"invalid X12 path {expr!r} (use SEG-n, SEG[QUALIFIER]-n, SEG-n.c or SEG[*]-n, "
                             "e.g. NM1[IL]-9, DTP[348]-3, HD-3.1)")
        return self._compile(expr, match)

    @staticmethod
    def _compile(expr: str, match: re.Match[str]) -> X12Path:
        qualifier = match.group(2)
        element = int(match.group(3)) if match.group(3) else None
        component = int(match.group(4)) if match.group(4) else None
        if (element is not None and element < 1) or (component is not None and component < 1):
            raise ValueError(f"invalid X12 path {expr!r}: elements and components count from 1")
        return X12Path(expr, match.group(1), None if qualifier in (None, "*") else qualifier, element, component,
                       qualifier == "*")

    def each_scope(self, expr: str) -> None:
        match = _PATH.fullmatch(expr.strip())
        if not match or match.group(3) is not None:
            raise ValueError(f"invalid X12 each: {expr!r} (use SEG[*] or SEG[QUALIFIER], e.g. EB[*])")

    def each(self, doc: Any, expr: str) -> list[Any]:
        """``each: EB[*]``: one document per selected segment (with the envelope), paths read on it."""
        self.each_scope(expr)
        match = _PATH.fullmatch(expr.strip())
        assert match is not None and isinstance(doc, X12Document)
        path = self._compile(expr, match)
        envelope = [s for s in doc.segments if s[0] in ("ISA", "GS", "ST")]
        return [X12Document([*envelope, segment], doc.delimiters) for segment in path.segments(doc)]


def _hl_members(segments: list[list[str]]) -> int:
    """Subscriber/dependent HL loops that are not an ancestor of the last one."""
    loops = [s for s in segments if s[0] == "HL" and len(s) > 3]
    if not loops:
        return 0
    parents = {s[1]: s[2] for s in loops}
    chain, current = set(), loops[-1][1]
    while current and current not in chain:
        chain.add(current)
        current = parents.get(current, "")
    return 1 + sum(1 for s in loops if s[3] in ("22", "23") and s[1] not in chain)
