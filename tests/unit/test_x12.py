"""The x12 format: files split member by member (834) or subscriber / dependent (271), streamed, envelope
checked; paths read records in the HL7-like notation (NM1[IL]-9, DTP[348]-3)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.errors import ParseError
from middleware.formats import Record, SplitInfo, get_format
from middleware.formats.x12 import X12Document
from tests.x12_files import Delims, file_271, file_834, stream_834

X12 = get_format("x12")
REPO = Path(__file__).resolve().parents[2]


class Chunked(io.RawIOBase):
    """A stream that answers every read with the next of ``sizes`` bytes (cycled), as a socket or pipe may."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes, self.at, self.turn = data, sizes or [1], 0, 0

    def read(self, size: int = -1) -> bytes:
        take = self.sizes[self.turn % len(self.sizes)] if size != -1 else len(self.data)
        self.turn += 1
        piece = self.data[self.at:self.at + take]
        self.at += len(piece)
        return piece


def split(data: bytes, info: SplitInfo | None = None) -> list[Record]:
    return list(X12.split(io.BytesIO(data), info if info is not None else SplitInfo()))


def read(doc: X12Document, expr: str) -> list[str]:
    return X12.compile_path(expr).read(doc)


def test_834_gives_one_record_per_member_loop_with_the_envelope_in_headers() -> None:
    info = SplitInfo()
    records = split(file_834(5), info)
    assert [r.position for r in records] == [1, 2, 3, 4, 5] and all(r.error is None for r in records)
    assert info.problems == [] and info.records == 5 and info.batch_id == "000000101"
    assert dict(records[0].headers) == {"x-mw-x12-isa13": "000000101", "x-mw-x12-gs06": "101",
                                        "x-mw-x12-st01": "834", "x-mw-x12-st02": "0001"}
    docs = [X12.parse(r.raw) for r in records]
    assert [read(d, "NM1[IL]-9") for d in docs] == [[f"{'D' if n % 3 == 2 else 'M'}{n:07d}"] for n in range(1, 6)]
    second = docs[1]  # a dependent: INS-1 N, relationship 19, the subscriber's id in REF*0F
    assert read(second, "INS-1") == ["N"] and read(second, "INS-2") == ["19"]
    assert read(second, "REF[0F]-2") == ["M0000001"] and read(second, "REF[1L]-2") == ["GRP-55012"]
    assert read(second, "DTP[348]-3") == ["20261201"] and read(second, "DTP[356]-3") == ["20261201"]
    assert read(second, "N1[IN]-2") == ["LAKESIDE HEALTH PLAN"]  # the header segments travel with each member
    assert read(second, "ISA-6") == ["NORTHWIND"] and read(second, "GS-2") == ["NORTHWIND"]
    assert read(second, "ST-1") == ["834"] and second.message_type == "834"
    assert second.message_id == "000000101/101/0001" and second.occurred_at() == "2026-11-24T09:30"
    assert len({d.source_identity() for d in docs}) == 5  # one transaction set, five different event ids


def test_271_gives_one_record_per_subscriber_and_per_dependent() -> None:
    records = split(file_271(3, dependents={2: 2}))
    docs = [X12.parse(r.raw) for r in records]
    assert len(records) == 5 and [r.position for r in records] == [1, 2, 3, 4, 5]
    levels = [[s[3] for s in d.segments if s[0] == "HL"] for d in docs]
    assert levels == [["20", "21", "22"], ["20", "21", "22"], ["20", "21", "22", "23"], ["20", "21", "22", "23"],
                      ["20", "21", "22"]]
    dependent = docs[2]
    assert read(dependent, "NM1[IL]-9") == ["M0000002"]  # its subscriber's id
    assert read(dependent, "NM1[03]-4") == ["DALLAS"] and read(dependent, "INS-2") == ["19"]
    assert read(dependent, "REF[EJ]-2") == ["MRN-30020"]  # only its own REF, not the subscriber's MRN
    assert read(dependent, "DMG-2") == ["20100601"]  # its own demographics, not the subscriber's
    assert read(dependent, "NM1[PR]-3") == ["LAKESIDE HEALTH PLAN"]  # the information source loop
    assert read(docs[1], "REF[EJ]-2") == ["MRN-20002"] and read(docs[1], "NM1[03]-3") == []
    assert read(docs[4], "EB-1") == ["1", "C"] and read(docs[4], "EB[C]-6") == ["23"]


@pytest.mark.parametrize("delims", [Delims(), Delims("|", "!", "^", "\n", ""),
                                    Delims("\x1d", "\x1f", "\x1e", "\x1c", ""),  # control characters
                                    Delims("*", "^", ">", "~", "\r\n"), Delims("+", "U", "<", "'", "\r\n")])
def test_delimiters_are_read_from_the_isa(delims: Delims) -> None:
    records = split(file_834(4, d=delims))
    assert len(records) == 4 and all(r.error is None for r in records)
    doc = X12.parse(records[3].raw)
    assert read(doc, "NM1[IL]-9") == ["M0000004"] and read(doc, "HD-4") == ["HMO SILVER"]
    assert doc.delimiters.repetition is (None if delims.repetition == "U" else delims.repetition.encode())


def test_components_and_repetitions() -> None:
    data = file_834(1).replace(b"HD*021**HLT*PPO GOLD*FAM~", b"HD*021**HLT:X:Y^DEN*PPO GOLD*FAM~")
    doc = X12.parse(split(data)[0].raw)
    assert read(doc, "HD-3") == ["HLT:X:Y"] and read(doc, "HD-3.1") == ["HLT"] and read(doc, "HD-3.3") == ["Y"]
    assert read(doc, "HD-3.4") == []
    assert read(doc, "REF[*]-2") == ["GRP-55012", "M0000001", "GRP-55012"]
    assert X12.compile_path("REF[*]-2").multiple and not X12.compile_path("REF[0F]-2").multiple


@pytest.mark.parametrize("expr", ["NM1[IL]", "nm1-3", "NM1[IL]-0", "HD-3.0", "NM1[IL]-x", "-3", ""])
def test_bad_paths_are_refused_with_the_notation(expr: str) -> None:
    with pytest.raises(ValueError, match="X12 path"):
        X12.compile_path(expr)


def test_each_gives_one_document_per_segment() -> None:
    doc = X12.parse(split(file_271(1))[0].raw)
    items = X12.each(doc, "EB[*]")
    assert [read(item, "EB-1") for item in items] == [["1"], ["C"]]
    assert [read(item, "ISA-13") for item in items] == [["000000201"]] * 2


def test_se_ge_iea_counts_and_control_numbers_are_checked_and_reported() -> None:
    info = SplitInfo()
    assert len(split(file_834(3, se_count=7, ge_count=2, iea_count=3), info)) == 3  # records still go on
    assert info.problems == ["transaction set ST-2 0001: SE-1 declares 7 segment(s), it holds 37",
                             "functional group GS-6 101: GE-1 declares 2 transaction set(s), it holds 1",
                             "interchange ISA-13 000000101: IEA-1 declares 3 functional group(s), it holds 1"]
    info = SplitInfo()
    split(file_834(2).replace(b"SE*27*0001", b"SE*27*0002").replace(b"IEA*1*000000101", b"IEA*1*000000999"), info)
    assert info.problems == ["transaction set ST-2 0001: SE-2 is '0002'", "interchange ISA-13 000000101: IEA-2 is "
                             "'000000999'"]
    info = SplitInfo()
    assert len(split(file_834(2).split(b"SE*")[0], info)) == 2  # cut off before the trailers
    assert info.problems == ["transaction set ST-2 0001: no SE trailer", "functional group GS-6 101: no GE trailer",
                             "interchange ISA-13 000000101: no IEA trailer"]


def test_a_member_that_does_not_frame_dead_letters_alone_with_its_position() -> None:
    info = SplitInfo()
    records = split(file_834(5, garbled={3}), info)
    assert [(r.position, r.error is None) for r in records] == [(1, True), (2, True), (3, False), (4, True), (5, True)]
    assert records[2].error == "segment 31 of transaction set ST-2 0001 has no valid segment id"
    assert records[2].headers == records[1].headers  # its dead letter names its transaction set too
    assert b"ELSWORTH" not in records[2].raw and b"ZZ*M0000003" in records[2].raw  # its own segments only
    assert X12.parse(records[3].raw).first("NM1") == ["NM1", "IL", "1", "ELSWORTH", "EMERY", "", "", "", "ZZ",
                                                       "M0000004"]
    assert info.problems == []  # the SE count still matches: the garbled segment is counted


def test_envelope_errors() -> None:
    records = split(b"HELLO*WORLD~")
    assert len(records) == 1 and records[0].error == "the file does not start with an ISA segment"
    short = split(file_834(1)[:80])
    assert len(short) == 1 and short[0].error is not None and "106-character ISA" in short[0].error
    bad = file_834(1).replace(b"*:~", b"*~~", 1)  # component separator = segment terminator
    assert "unusable delimiters" in (split(bad)[0].error or "")
    stray = split(file_834(1).replace(b"ST*834*0001*005010X220A1~", b""))
    assert stray[0].error == "16 segment(s) outside a transaction set (ST..SE)"
    outside = file_834(1).replace(b"GS*BE*", b"XX*BE*", 1)
    assert split(outside)[1].error == "an ST segment outside a GS functional group"
    assert split(b"") == []


def test_two_interchanges_with_different_delimiters_in_one_file() -> None:
    data = file_834(2) + b"\r\n" + file_834(3, d=Delims("|", "!", "^", "\n", ""))
    info = SplitInfo()
    records = split(data, info)
    assert len(records) == 5 and all(r.error is None for r in records) and info.problems == []
    assert [read(X12.parse(r.raw), "NM1[IL]-9") for r in records][-1] == ["M0000003"]


def test_parse_refuses_what_is_not_one_record() -> None:
    with pytest.raises(ParseError, match="holds 3 members"):
        X12.parse(file_834(3))
    with pytest.raises(ParseError, match="holds 2 members"):
        X12.parse(file_271(2))
    with pytest.raises(ParseError, match="starts with an ISA"):
        X12.parse(b"GS*HB~")
    with pytest.raises(ParseError, match="no ST segment"):
        X12.parse(file_834(1).split(b"ST*")[0])
    X12.parse(file_271(1, dependents={1: 1}).split(b"HL*4*")[0])  # a subscriber alone is one record


_SIZES = st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(sizes=_SIZES, crlf=st.booleans(), members=st.integers(min_value=0, max_value=6))
def test_any_chunking_gives_the_same_records(sizes: list[int], crlf: bool, members: int) -> None:
    d = Delims(newline="\r\n") if crlf else Delims(newline="")
    data = b"\xef\xbb\xbf" + file_834(members, d=d, garbled={2}) + file_271(2, dependents={1: 1}, d=d)
    expected_info, info = SplitInfo(), SplitInfo()
    expected = split(data, expected_info)
    assert list(X12.split(Chunked(data, sizes), info)) == expected  # type: ignore[arg-type]
    assert info == expected_info and len(expected) == members + 3


def test_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    """Splitting a 40,000-member (9 MB) 834 in a fresh process stays within a few MB of importing alone."""
    path = tmp_path / "big.x12"
    with path.open("wb") as file:
        for piece in stream_834(40_000):
            file.write(piece)
    script = ("import resource,sys\nfrom middleware.formats import SplitInfo, get_format\n"
              "f=get_format('x12'); base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "n=sum(1 for r in f.split(open(sys.argv[1],'rb'), SplitInfo()) if r.error is None)\n"
              "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.split()
    assert int(out[0]) == 40_000
    assert int(out[1]) < 8 * 1024, f"peak RSS grew {out[1]} KiB while splitting a 9 MB file"
