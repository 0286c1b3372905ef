"""``x-mw-batch-total`` is set only when a file declares its record count before its records: a CSV
trailer, an HL7 file of one batch (BTS-1); never for several HL7 batches, X12 (its trailers count
segments, transaction sets and groups, not members) or NDJSON (no count at all)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from middleware.formats import get_format
from middleware.formats.hl7batch import _CHUNK as CHUNK
from middleware.formats.hl7batch import declared_total
from tests.x12_files import stream_834


def adt(n: int) -> bytes:
    return f"MSH|^~\\&|EHR|GHH|ADT|GHH|20260101||ADT^A01|M{n}|P|2.5\rPID|1||{n}^^^GHH^MR\r".encode()


def test_bts_1_of_a_single_batch_is_its_declared_total() -> None:
    body = b"FHS|^~\\&|EHR\rBHS|^~\\&|EHR\r" + b"".join(adt(n) for n in range(5)) + b"BTS|5\rFTS|1\r"
    assert declared_total(io.BytesIO(body)) == 5
    assert declared_total(io.BytesIO(b"\xef\xbb\xbf" + body.replace(b"\r", b"\r\n"))) == 5  # BOM, CRLF


def test_a_disagreeing_bts_1_is_still_the_declared_total_the_split_reports_the_mismatch() -> None:
    assert declared_total(io.BytesIO(b"BHS|^~\\&|EHR\r" + adt(1) + b"BTS|7\r")) == 7


@pytest.mark.parametrize("body", [
    b"BHS|^~\\&|A\r" + adt(1) + b"BTS|1\rBHS|^~\\&|B\r" + adt(2) + adt(3) + b"BTS|2\rFTS|2\r",  # two batches
    adt(1) + adt(2),  # messages one after another: nothing declared
    b"BHS|^~\\&|EHR\r" + adt(1),  # no BTS
    b"BHS|^~\\&|EHR\r" + adt(1) + b"BTS|many\r",  # not a number
], ids=["two batches", "no envelope", "no BTS", "BTS-1 not a number"])
def test_no_total_when_the_file_does_not_declare_one_for_all_its_messages(body: bytes) -> None:
    assert declared_total(io.BytesIO(body)) is None


def test_a_second_batch_split_across_read_chunks_is_still_counted() -> None:
    first = b"BHS|^~\\&|A\r" + adt(1) + b"BTS|1\r"
    second = b"BHS|^~\\&|B\r" + adt(2) + b"BTS|1\r"
    for at in range(CHUNK - 4, CHUNK + 2):  # the CR before the second BHS at each offset around a chunk edge
        padding = b"NTE|" + b"x" * (at - len(first) - 4) + b"\r"
        body = first + padding + second
        assert body.index(b"\rBHS|^~\\&|B") == at
        assert declared_total(io.BytesIO(body)) is None, at


def test_the_hl7v2_format_offers_it_and_x12_and_ndjson_do_not(tmp_path: Path) -> None:
    assert get_format("hl7v2").declared_total(io.BytesIO(b"BHS|^~\\&|E\r" + adt(1) + b"BTS|1\r")) == 1
    x12 = b"".join(stream_834(3))
    assert b"SE*" in x12  # its trailers are there, and count segments, not members
    assert getattr(get_format("x12"), "declared_total", None) is None
    assert getattr(get_format("ndjson"), "declared_total", None) is None
