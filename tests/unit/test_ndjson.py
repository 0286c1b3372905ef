"""NDJSON (FHIR Bulk Data): one record per line through the one splitter (format, fhir, HTTP bodies)."""

from __future__ import annotations

import io

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.formats import Record, SplitInfo, get_format
from middleware.formats.ndjson import looks_like_ndjson, split_lines
from middleware.ingest.http_bodies import NDJSON, read_body


class Trickle:
    """A stream that gives at most ``size`` bytes per read, whatever was asked (lines cut anywhere)."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size = data, size

    def read(self, _: int = -1) -> bytes:
        out, self.data = self.data[:self.size], self.data[self.size:]
        return out


def records(raw: bytes) -> tuple[list[Record], SplitInfo]:
    info = SplitInfo()
    return list(split_lines(io.BytesIO(raw), info)), info


def test_blank_lines_are_skipped_and_a_bad_line_dead_letters_alone_with_its_position() -> None:
    raw = b'{"a": 1}\r\n\r\n  \n[1, 2]\n{"a": \n"text"\n'
    found, info = records(raw)
    assert found == [Record(b'{"a": 1}', 1), Record(b"[1, 2]", 2),
                     Record(b'{"a": ', 3, "NDJSON record 3 (line 5) is not valid JSON"), Record(b'"text"', 4)]
    assert info.records == 4


def test_a_bom_and_a_last_line_without_newline_are_read() -> None:
    found, _ = records(b'\xef\xbb\xbf{"a": 1}\n{"b": 2}')
    assert [r.raw for r in found] == [b'{"a": 1}', b'{"b": 2}'] and all(r.error is None for r in found)


def test_an_empty_file_has_no_record() -> None:
    assert records(b"\n \n")[0] == []


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.integers(-(2**53), 2**53), st.text(max_size=30),
                                 st.dictionaries(st.text(max_size=5), st.integers(0, 99), max_size=3)), max_size=30),
       blanks=st.lists(st.booleans(), max_size=30), chunk=st.integers(min_value=1, max_value=40))
def test_any_chunking_gives_one_record_per_value_in_order(values: list[object], blanks: list[bool],
                                                         chunk: int) -> None:
    lines: list[bytes] = []
    for index, value in enumerate(values):
        lines.append(orjson.dumps(value))
        if index < len(blanks) and blanks[index]:
            lines.append(b"   ")
    found = list(split_lines(Trickle(b"\n".join(lines), chunk), SplitInfo()))  # type: ignore[arg-type]
    assert [orjson.loads(r.raw) for r in found] == values
    assert [r.position for r in found] == list(range(1, len(values) + 1))


def test_the_ndjson_format_is_registered_and_reads_records_like_json() -> None:
    fmt = get_format("ndjson")
    found = list(fmt.split(io.BytesIO(b'{"patient": {"mrn": "M1"}}\n{"patient": {"mrn": "M2"}}\n'), SplitInfo()))
    assert [fmt.compile_path("patient.mrn").read(fmt.parse(r.raw)) for r in found] == [["M1"], ["M2"]]


@pytest.mark.parametrize(("head", "expected"), [
    (b'{"resourceType": "Patient"}\n{"resourceType": "Patient"}\n', True),
    (b'\xef\xbb\xbf\n{"a": 1}\n{"a": 2}', True),
    (b'{"resourceType": "Patient"}\n', False),  # one minified resource
    (b'{\n  "resourceType": "Patient"\n}\n', False),  # pretty-printed
    (b'[1]\n[2]\n', False),  # not objects: not FHIR NDJSON
])
def test_ndjson_is_recognised_by_content(head: bytes, expected: bool) -> None:
    assert looks_like_ndjson(head) is expected


def test_http_ndjson_bodies_split_through_the_same_module() -> None:
    body = read_body(b'{"resourceType": "Patient", "id": "1"}\n\nnot json\n', NDJSON, get_format("fhir"))
    assert [(r.position, r.error) for r in body.records] == [
        (1, None), (2, "NDJSON record 2 (line 3) is not valid JSON")]
    assert body.unreadable == 1
