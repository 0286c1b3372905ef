"""The csv format: rows split from a stream read back the values written, whatever the dialect."""

from __future__ import annotations

import csv
import io

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.formats import SplitInfo, get_format
from middleware.formats.csv_format import LINE_HEADER, CsvFormat, CsvOptions

COLUMNS = ["member_id", "payer", "note"]
cells = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=12)
rows = st.lists(st.lists(cells, min_size=3, max_size=3).filter(lambda r: any(c.strip() for c in r)),
                max_size=15)


def write(table: list[list[str]], *, delimiter: str = ",", quote: str = '"', encoding: str = "utf-8",
          header: bool = True, line_end: str = "\r\n") -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter=delimiter, quotechar=quote, lineterminator=line_end,
                        # a lone "\r" in a cell is quoted by the writer only when it ends lines with \r\n
                        quoting=csv.QUOTE_MINIMAL if line_end == "\r\n" else csv.QUOTE_ALL)
    if header:
        writer.writerow(COLUMNS)
    writer.writerows(table)
    return out.getvalue().encode(encoding)


Row = tuple[int | None, dict[str, str] | None, str | None]


def split(data: bytes, **options: object) -> tuple[list[Row], SplitInfo]:
    fmt = CsvFormat(CsvOptions.of(options))
    info = SplitInfo()
    out: list[Row] = []
    for record in fmt.split(io.BytesIO(data), info):
        out.append((record.position, None if record.error else orjson.loads(record.raw), record.error))
    return out, info


@settings(max_examples=150, deadline=None)
@given(rows, st.sampled_from([",", ";", "\t", "|"]), st.sampled_from(['"', "'"]),
       st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]), st.sampled_from(["\r\n", "\n"]))
def test_rows_written_by_csv_writer_split_back_to_the_same_values(table: list[list[str]], delimiter: str,
                                                                  quote: str, encoding: str, line_end: str) -> None:
    if encoding == "latin-1":  # only what latin-1 can hold
        table = [[c.encode("latin-1", "replace").decode("latin-1") for c in row] for row in table]
    data = write(table, delimiter=delimiter, quote=quote, encoding=encoding, line_end=line_end)
    got, info = split(data, delimiter=delimiter, quote=quote, encoding=encoding.replace("-sig", ""))
    assert [g[2] for g in got] == [None] * len(table)
    assert [g[1] for g in got] == [dict(zip(COLUMNS, row, strict=True)) for row in table]
    assert [g[0] for g in got] == list(range(1, len(table) + 1))
    assert info.records == len(table) and info.problems == []


def test_embedded_newlines_quotes_and_delimiters_stay_in_their_cell() -> None:
    table = [["M1", "Acme, Inc.", 'line one\nline "two"\r\nthree'], ["M2", "Beta", ""]]
    got, _ = split(write(table))
    assert got == [(1, dict(zip(COLUMNS, table[0], strict=True)), None),
                   (2, dict(zip(COLUMNS, table[1], strict=True)), None)]


def test_a_bom_is_dropped_from_the_first_column_name() -> None:
    got, _ = split(b"\xef\xbb\xbf" + write([["M1", "Acme", "x"]]))
    assert got[0][1] == {"member_id": "M1", "payer": "Acme", "note": "x"}


def test_a_row_that_does_not_frame_dead_letters_alone_with_its_position() -> None:
    data = (b"member_id,payer,note\nM1,Acme,x\nM2,Acme\nM3,\xff\xfeAcme,x\n"
            b'M4,"Acme"junk,x\nM5,Acme,y\n')
    got, info = split(data)
    assert [(p, e is not None) for p, _, e in got] == [(1, False), (2, True), (3, True), (4, True), (5, False)]
    assert "row 2 (line 3) has 2 fields, expected 3" in str(got[1][2])
    assert "row 3 (line 4) is not valid utf-8" in str(got[2][2])
    assert "row 4 (line 5) does not frame" in str(got[3][2])
    assert got[4][1] == {"member_id": "M5", "payer": "Acme", "note": "y"}
    assert info.records == 5


def test_line_header_points_at_the_row_in_the_file() -> None:
    fmt = CsvFormat()
    records = list(fmt.split(io.BytesIO(b'a,b\n"1\n2",x\n\n3,y\n'), SplitInfo()))
    assert [r.headers[LINE_HEADER] for r in records] == [2, 5]


def test_trailer_count_checked() -> None:
    body = write([["M1", "A", ""], ["M2", "B", ""]], line_end="\n")
    got, info = split(body + b"TRAILER,2\n", trailer="TRAILER")
    assert len(got) == 2 and info.declared == 2 and info.problems == []
    got, info = split(body + b"TRAILER,3\n", trailer="TRAILER")
    assert len(got) == 2 and info.problems == ["CSV trailer declares 3 rows, the file has 2"]
    _, info = split(body, trailer="TRAILER")
    assert info.problems and "no trailer line" in info.problems[0]


def test_no_header_uses_the_configured_columns() -> None:
    got, _ = split(b"M1;Acme\n", header=False, columns=["member_id", "payer"], delimiter=";")
    assert got == [(1, {"member_id": "M1", "payer": "Acme"}, None)]


def test_a_repeated_header_name_makes_the_file_unreadable() -> None:
    got, _ = split(b"a,a\n1,2\n")
    assert got == [(None, None, "the CSV header row repeats a column name")]


def test_paths_read_columns_by_name_and_empty_cells_are_absent() -> None:
    fmt = get_format("csv", {"delimiter": ";"})
    doc = fmt.parse(orjson.dumps({"member_id": "M1", "patient.mrn": "P9", "payer": ""}))
    assert fmt.compile_path("member_id").read(doc) == ["M1"]
    assert fmt.compile_path("patient.mrn").read(doc) == ["P9"]
    assert fmt.compile_path("payer").read(doc) == []
    with pytest.raises(ValueError):
        fmt.each_scope("x")


def test_memory_does_not_hold_the_file(tmp_path: object) -> None:
    """Records come one by one: the reader is a generator over the stream (the first row before the rest)."""
    class Endless(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            chunk = (b"a,b\n" if self.sent == 0 else b"1,2\n") * (len(buffer) // 4)
            buffer[:len(chunk)] = chunk
            self.sent += len(chunk)
            return len(chunk)

    source = Endless()
    records = CsvFormat().split(io.BufferedReader(source), SplitInfo())  # type: ignore[type-var]
    for _ in range(100_000):
        next(records)
    assert source.sent < 2_000_000  # 100k rows read from ~400 kB, not an endless file loaded whole
