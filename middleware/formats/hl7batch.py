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

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")
_CHUNK = 1 << 16
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class BatchItem:
    """One message of a batch: ``position`` counts messages from 1; ``raw`` ends segments with CR."""

    position: int
    raw: bytes


@dataclass
class BatchSummary:
    """What the envelope said, filled in while iterating."""

    batch_id: str | None = None  # BHS-11, else FHS-11
    declared: int | None = None  # BTS-1 message count, when the sender gave one
    messages: int = 0
    enveloped: bool = False  # FHS/BHS/BTS/FTS seen
    problems: list[str] = field(default_factory=list)


def _segments(stream: BinaryIO) -> Iterator[bytes]:
    """Segment lines of ``stream`` (CR, LF or CRLF), read in chunks; blank lines dropped."""
    pending = b""
    first = True
    while chunk := stream.read(_CHUNK):
        if first:
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")
            first = False
        pending += chunk
        lines = _LINE_BREAK.split(pending)
        pending = lines.pop()  # maybe incomplete (a CR of a CRLF may also be split: blank lines are dropped)
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending


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
