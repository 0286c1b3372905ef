"""HL7 v2 batch files, streamed message by message.

A batch file is ``FHS BHS MSH... MSH... BTS FTS`` (file and batch envelopes, HL7 v2 chapter 2) or
simply messages one after another. :func:`iter_batch` reads any size of file in chunks and yields
one :class:`BatchItem` per message, with its 1-based position, so a malformed message can be
dead-lettered alone, naming its file and position, while the rest go through. Envelope segments
are not messages; the BTS-1 / FTS-1 counts are checked and a mismatch is reported on the summary.
Lines before the first MSH that are not envelope segments are yielded as an item of their own:
they fail to parse downstream and are dead-lettered with their position instead of vanishing.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from middleware.formats import Record, SplitInfo

_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")
_CHUNK = 1 << 16
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class BatchItem:
    """One message of a batch: ``position`` counts messages from 1; ``raw`` ends segments with CR."""

    position: int
    raw: bytes

    @property
    def framed(self) -> bool:
        """False for lines that are not a message (no MSH segment first): they cannot be published as one."""
        return self.raw.startswith(b"MSH")


@dataclass
class BatchSummary:
    """What the envelope said, filled in while iterating."""

    batch_id: str | None = None  # BHS-11, else FHS-11
    declared: int | None = None  # BTS-1 message count, when the sender gave one
    messages: int = 0
    enveloped: bool = False  # FHS/BHS/BTS/FTS seen
    problems: list[str] = field(default_factory=list)


def _segments(stream: BinaryIO) -> Iterator[bytes]:
    """Segment lines of ``stream`` (CR, LF or CRLF), read in chunks; blank lines dropped.

    Linear in the input: only each new chunk is searched for line breaks, and the pieces of a
    line longer than a chunk (a base64 PDF in OBX-5) are joined once, when the line ends.
    """
    pieces: list[bytes] = []  # the line being read, chunk by chunk
    chunk = _read_past_bom(stream) or stream.read(_CHUNK)
    while chunk:
        lines = _LINE_BREAK.split(chunk)
        if len(lines) > 1:
            pieces.append(lines[0])
            line = b"".join(pieces)
            if line.strip():
                yield line
            yield from (line for line in lines[1:-1] if line.strip())
            pieces = []
        pieces.append(lines[-1])  # maybe incomplete (a CRLF split between chunks makes a blank line: dropped)
        chunk = stream.read(_CHUNK)
    line = b"".join(pieces)
    if line.strip():
        yield line


def _read_past_bom(stream: BinaryIO) -> bytes:
    """The first chunk of ``stream`` without a UTF-8 byte order mark, however small the reads."""
    chunk = stream.read(_CHUNK)
    while chunk and len(chunk) < len(_BOM) and _BOM.startswith(chunk):
        more = stream.read(_CHUNK)
        if not more:
            break
        chunk += more
    return chunk.removeprefix(_BOM)


def _field(segment: bytes, number: int) -> str:
    if len(segment) < 4:
        return ""
    parts = segment.split(segment[3:4])
    return parts[number].decode("latin-1").strip() if number < len(parts) else ""


def iter_batch(stream: BinaryIO, summary: BatchSummary | None = None) -> Iterator[BatchItem]:
    """Yield each message of ``stream`` (a batch file or a single message) as it is read."""
    summary = summary if summary is not None else BatchSummary()
    current: list[bytes] = []

    def flush() -> Iterator[BatchItem]:
        if current:
            summary.messages += 1
            yield BatchItem(summary.messages, b"\r".join(current) + b"\r")
            current.clear()

    for segment in _segments(stream):
        head = segment[:3]
        if head in _ENVELOPE:
            yield from flush()
            summary.enveloped = True
            if head in (b"FHS", b"BHS"):
                summary.batch_id = _field(segment, 10) or summary.batch_id  # FHS-11/BHS-11 (MSH-style count)
            elif head == b"BTS":
                count = _field(segment, 1)
                summary.declared = int(count) if count.isdigit() else summary.declared
            continue
        if head == b"MSH":
            yield from flush()
        current.append(segment)
    yield from flush()
    if summary.declared is not None and summary.declared != summary.messages:
        summary.problems.append(f"BTS-1 declares {summary.declared} message(s), the batch holds {summary.messages}")


def split_records(stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
    """The records of an HL7 v2 input for publishing (``Format.split`` of ``hl7v2``).

    A single message that is not enveloped is one record, byte for byte (read again from the
    start, so ``stream`` must be seekable), whatever it holds: the route worker says why it does
    not parse. A batch gives one record per message, numbered from 1; lines before the first MSH
    are a record that cannot be framed (dead-lettered at publishing, naming its position).
    """
    summary = BatchSummary()
    items = iter_batch(stream, summary)
    first, second = next(items, None), next(items, None)
    if second is None and not summary.enveloped:
        stream.seek(0)
        info.records = 1
        yield Record(stream.read())
        return
    for item in (first, second, *items):
        if item is None:
            continue
        info.batch_id = info.batch_id or summary.batch_id
        info.records = item.position
        error = None if item.framed else "lines before the first MSH segment of a batch are not an HL7 message"
        yield Record(item.raw, item.position, error)
    info.batch_id, info.declared = summary.batch_id, summary.declared
    info.problems.extend(summary.problems)


_BATCH_START = re.compile(rb"[\r\n]BHS")
_TAIL = 4096


def declared_total(stream: BinaryIO) -> int | None:
    """The message count a single-batch file declares (BTS-1), read before its first message is published
    (``x-mw-batch-total``): the BHS segments are counted over the file (one pass, in chunks) and BTS-1 is
    read from its end. None when the stream cannot seek, the file holds no batch or several (BTS-1 then
    counts only the last one), or BTS-1 is not a number. The count is what the sender declares; a file
    whose count disagrees is reported after splitting, like a CSV trailer."""
    if not stream.seekable():
        return None
    batches, carry = 0, b"\n"  # the file's start is a segment's start
    chunk = _read_past_bom(stream)
    while chunk:
        batches += len(_BATCH_START.findall(carry + chunk))
        carry = chunk[-3:]  # a match split between chunks is found with the next one; none fits in 3 bytes
        if batches > 1:
            return None
        chunk = stream.read(_CHUNK)
    if batches != 1:
        return None
    size = stream.seek(0, io.SEEK_END)
    stream.seek(max(size - _TAIL, 0))
    for segment in reversed(_LINE_BREAK.split(stream.read())):
        if segment.startswith(b"BTS"):
            count = _field(segment, 1)
            return int(count) if count.isdigit() else None
    return None
