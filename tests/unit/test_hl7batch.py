"""HL7 batch files: split message by message, streamed, envelope checked."""

from __future__ import annotations

import io

import pytest

from middleware.errors import ParseError
from middleware.formats import hl7batch
from middleware.formats.hl7batch import BatchSummary, iter_batch
from middleware.formats.hl7v2 import parse


def message(n: int) -> bytes:
    return (f"MSH|^~\\&|LIS|GHH|EHR|GHH|2026||ORU^R01|M{n}|P|2.5\r"
            f"PID|1||P{n}\rOBX|1|NM|X||{n}\r").encode()


def split(data: bytes, summary: BatchSummary | None = None) -> list[tuple[int, bytes]]:
    return [(item.position, item.raw) for item in iter_batch(io.BytesIO(data), summary)]


def test_enveloped_batch_yields_each_message_and_checks_the_count() -> None:
    envelope = b"FHS|^~\\&|LIS|||||||FILE-1\rBHS|^~\\&|LIS||||||||BATCH-7\r"  # BATCH-7 is BHS-11
    data = envelope + message(1) + message(2) + b"BTS|2\rFTS|1\r"
    summary = BatchSummary()
    items = split(data, summary)
    assert items == [(1, message(1)), (2, message(2))]
    assert summary.batch_id == "BATCH-7" and summary.declared == 2 and summary.enveloped
    assert summary.problems == []
    assert [parse(raw).message_id for _, raw in items] == ["M1", "M2"]


def test_count_mismatch_is_reported() -> None:
    summary = BatchSummary()
    split(b"BHS|^~\\&|LIS\r" + message(1) + b"BTS|3\r", summary)
    assert summary.problems == ["BTS-1 declares 3 message(s), the batch holds 1"]


@pytest.mark.parametrize("separator", [b"\r", b"\n", b"\r\n"])
def test_bare_concatenated_messages_any_line_breaks_and_bom(separator: bytes) -> None:
    data = b"\xef\xbb\xbf" + (message(1) + b"\r" + message(2) + message(3)).replace(b"\r", separator)
    assert split(data) == [(1, message(1)), (2, message(2)), (3, message(3))]


def test_chunk_boundaries_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"FHS|^~\\&\r\n" + (message(1) + message(2)).replace(b"\r", b"\r\n") + b"FTS|1\r\n"
    for size in (1, 2, 3, 7, 64):
        monkeypatch.setattr(hl7batch, "_CHUNK", size)
        assert split(data) == [(1, message(1)), (2, message(2))], size


def test_lines_before_the_first_msh_are_an_item_of_their_own() -> None:
    items = split(b"garbage line\r" + message(1))
    assert items == [(1, b"garbage line\r"), (2, message(1))]
    with pytest.raises(ParseError):
        parse(items[0][1])


def test_streams_without_reading_the_whole_file() -> None:
    class CountingStream(io.BytesIO):
        reads = 0

        def read(self, size: int | None = -1) -> bytes:
            CountingStream.reads += 1
            return super().read(size)

    stream = CountingStream(b"".join(message(n) for n in range(20_000)))  # ~1.2 MB
    first = next(iter_batch(stream))
    assert first.position == 1 and first.raw == message(0)
    assert CountingStream.reads <= 2 and stream.tell() <= 2 * hl7batch._CHUNK


def test_a_batch_given_as_one_message_is_a_typed_error() -> None:
    with pytest.raises(ParseError, match="HL7 batch"):
        parse(b"FHS|^~\\&\r" + message(1))
    with pytest.raises(ParseError, match="2 messages in one"):
        parse(message(1) + message(2))


class _CountingSplitter:
    """Stands in for the line-break regex and counts the bytes it is asked to search."""

    def __init__(self) -> None:
        self.searched = 0

    def split(self, data: bytes) -> list[bytes]:
        self.searched += len(data)
        return list(hl7batch.re.split(rb"\r\n|\r|\n", data))


@pytest.mark.parametrize("chunk", [64, 1000, 1 << 16])
def test_splitting_searches_each_byte_once_even_in_a_huge_segment(monkeypatch: pytest.MonkeyPatch,
                                                                   chunk: int) -> None:
    """Linear work: a 2 MB OBX-5 (a base64 PDF) is split across thousands of reads without the
    pending bytes being searched again on every read."""
    pdf = b"QUJD" * 500_000
    big = (b"MSH|^~\\&|LIS|GHH|EHR|GHH|2026||ORU^R01|BIG|P|2.5\rPID|1||P1\r"
           b"OBX|1|ED|PDF||^application^pdf^Base64^" + pdf + b"\r")
    data = b"\xef\xbb\xbf" + message(1).replace(b"\r", b"\r\n") + big + message(3)
    counter = _CountingSplitter()
    monkeypatch.setattr(hl7batch, "_LINE_BREAK", counter)
    monkeypatch.setattr(hl7batch, "_CHUNK", chunk)
    assert split(data) == [(1, message(1)), (2, big), (3, message(3))]
    assert counter.searched <= len(data)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5])
def test_a_byte_order_mark_cut_by_small_reads_is_still_removed(monkeypatch: pytest.MonkeyPatch,
                                                               chunk: int) -> None:
    monkeypatch.setattr(hl7batch, "_CHUNK", chunk)
    assert split(b"\xef\xbb\xbf" + message(1) + message(2)) == [(1, message(1)), (2, message(2))]
