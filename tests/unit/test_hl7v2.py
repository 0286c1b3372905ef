"""The HL7 v2 tokenizer: delimiters, paths, escapes, character sets, typed errors, the shared corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.errors import ParseError
from middleware.formats.hl7v2 import (
    Delimiters,
    compile_path,
    escape,
    hl7_date_to_iso,
    hl7_timestamp_to_iso,
    parse,
)

ORU = (
    b"MSH|^~\\&|LAB|GHH|EHR|GHH|20261124083000+0100||ORU^R01^ORU_R01|LAB-1|P|2.5.1\r"
    b"PID|1||P-1^^^GHH^PI~MRN-9^^^GHH^MR~X-3^^^OTHER^MR||Doe^Jane^Q||19800101|F\r"
    b"OBR|1||ORD-1|24331-1^Lipid panel^LN\r"
    b"OBX|1|NM|2093-3^Cholesterol^LN||196|mg/dL^milligram per deciliter^UCUM||N|||F\r"
    b"OBX|2|NM|2571-8^Triglyceride^LN||\"\"|mg/dL||N|||F\r"
    b"OBX|3|TX|8251-1^Note^LN||see \\F\\ below\\.br\\line two \\X4D\\\\E\\ end|||||F\r"
    b"NTE|1||a&b&c^second component\r"
)


def values(raw: bytes, expr: str) -> list[str]:
    return compile_path(expr).read(parse(raw))


@pytest.mark.parametrize(("expr", "expected"), [
    ("MSH-1", ["|"]),
    ("MSH-2", ["^~\\&"]),
    ("MSH-9", ["ORU"]),
    ("MSH-9.2", ["R01"]),
    ("MSH-10", ["LAB-1"]),
    ("PID-3", ["P-1"]),  # no component given: component 1 of the first repetition
    ("PID-3[2].1", ["MRN-9"]),
    ("PID-3[5=MR].1", ["MRN-9", "X-3"]),  # a filter yields every match; a field rule takes the first
    ("PID-3[4=OTHER].1", ["X-3"]),
    ("PID-3[*].1", ["P-1", "MRN-9", "X-3"]),
    ("PID-3[9].1", []),
    ("PID-5.2", ["Jane"]),
    ("PID-5.9", []),
    ("OBX[*]-5", ["196", "see | below\nline two M\\ end"]),  # HL7 null "" counts as no value
    ("OBX[2]-3.1", ["2571-8"]),
    ("OBX[3=2571-8]-2", ["NM"]),
    ("OBX-6.2", ["milligram per deciliter"]),
    ("NTE-3.1.2", ["b"]),
    ("NTE-3.1", ["a"]),
    ("NTE-3.2.2", []),
    ("ZZZ-1", []),
    ("PV1-2", []),
])
def test_paths(expr: str, expected: list[str]) -> None:
    assert values(ORU, expr) == expected


def test_message_attributes() -> None:
    message = parse(ORU)
    assert message.message_type == "ORU^R01"
    assert message.message_id == "LAB-1"
    assert message.version == "2.5.1"
    assert message.occurred_at() == "2026-11-24T08:30:00+01:00"
    assert [s.id for s in message.segments] == ["MSH", "PID", "OBR", "OBX", "OBX", "OBX", "NTE"]


def test_segments_are_split_only_when_read() -> None:
    message = parse(ORU)
    compile_path("PID-5.1").read(message)
    split = [s._fields is not None for s in message.segments]
    assert split == [True, True, False, False, False, False, False]  # MSH is split to check it


@pytest.mark.parametrize("expr", ["PID", "PID-0x", "pid-3", "PID-3.", "PID-0", "PID-3[0]", "PID-3[a]", "PID[2",
                                  "OBX[*]-5.0", "PID-3[5=MR", "PID[*]"])
def test_invalid_paths_say_what_is_wrong(expr: str) -> None:
    if expr in ("PID", "PID[*]"):  # a bare segment is valid: it reads whether the segment exists
        assert compile_path(expr).read(parse(ORU))
        return
    with pytest.raises(ValueError, match="invalid HL7 path"):
        compile_path(expr)


def test_other_delimiters_and_v27_truncation_character() -> None:
    raw = b"MSH#$*@!%#A#B#C#D#2026##ADT$A01#ID-7#P#2.7\rPID#1##42$$$H$MR*43$$$H$PI##Doe$Ann@x!y\r"
    message = parse(raw)
    assert message.delimiters == Delimiters("#", "$", "*", "@", "!", "%")
    assert message.message_type == "ADT^A01"
    assert compile_path("PID-3[5=PI].1").read(message) == ["43"]
    assert compile_path("PID-5.2").read(message) == ["Ann@x"]  # @ is the escape character here
    assert compile_path("PID-5.2.2").read(message) == ["y"]


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "input is empty"),
    (b"\xef\xbb\xbf \r\n", "input is empty"),
    (b"PID|1||42\r", "no MSH segment"),
    (b"MSH|^~\\&|A|B|C|D|2026", "no message type"),
    (b"MSH|^~|A\r", "bad delimiters"),
    (b"MSH|^^\\&|A|B|C|D|2026||ADT^A01|1|P|2.5\r", "bad delimiters"),
    (b"MSHa^~\\&a\r", "bad delimiters"),
    (b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5\rPID|1||M\xfcller\r", "not valid utf-8"),
    (b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5||||||ASCII\rPID|\xe9\r", "not valid ascii"),
    (b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5||||||KLINGON\r", "unsupported character set"),
    (b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5\rthis line was wrapped\r", "segment 2"),
])
def test_typed_errors(raw: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message) as raised:
        parse(raw)
    assert raised.value.stage == "parse"
    assert "Müller" not in str(raised.value)


def test_charsets_separators_bom_and_mllp_framing() -> None:
    latin = "MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5||||||8859/1\rPID|1||1||Müller\r".encode("latin-1")
    assert values(latin, "PID-5") == ["Müller"]
    utf8 = latin.decode("latin-1").replace("8859/1", "UNICODE UTF-8").encode()
    for raw in (utf8, utf8.replace(b"\r", b"\n"), utf8.replace(b"\r", b"\r\n"), b"\xef\xbb\xbf" + utf8,
                b"\x0b" + utf8 + b"\x1c\r"):
        assert values(raw, "PID-5") == ["Müller"]


def test_escape_sequences() -> None:
    raw = (b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5\r"
           b"NTE|1||\\H\\bold\\N\\ \\.sp 2\\x\\.in+4\\y \\X48656C6C6F\\ \\Zsite\\ \\C2842\\ \\Q\\ \\X4\\ tail\\\r")
    assert values(raw, "NTE-3") == ["bold \n\nxy Hello   \\Q\\ \\X4\\ tail\\"]


def test_timestamps() -> None:
    assert hl7_timestamp_to_iso("20261124082500+0100") == "2026-11-24T08:25:00+01:00"
    assert hl7_timestamp_to_iso("202611240825") == "2026-11-24T08:25:00"
    assert hl7_timestamp_to_iso("20261124082501.1234-0530") == "2026-11-24T08:25:01.1234-05:30"
    assert hl7_timestamp_to_iso("20261124") == "2026-11-24"
    assert hl7_date_to_iso("198403121200+0100") == "1984-03-12"
    assert (hl7_timestamp_to_iso("2026"), hl7_timestamp_to_iso("202605")) == ("2026", "2026-05")  # precision kept
    for bad in ("19840312XYZ", "202613", "20261131", "20261124256000", "2026112408+2500", "abc"):
        with pytest.raises(ValueError):
            hl7_timestamp_to_iso(bad)


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("|^~\\&"),
                max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.lists(_text, min_size=1, max_size=3), min_size=1, max_size=3), min_size=1,
                max_size=6))
def test_round_trip_of_escaped_values(fields: list[list[list[str]]]) -> None:
    """Build PID from random values (every component escaped) -> parse -> read the same values back."""
    encoded = "|".join("~".join("^".join(escape(c) for c in rep) for rep in field) for field in fields)
    raw = f"MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5\rPID|{encoded}\r".encode()
    message = parse(raw)
    for f, field in enumerate(fields, start=1):
        for r, rep in enumerate(field, start=1):
            for c, component in enumerate(rep, start=1):
                got = compile_path(f"PID-{f}[{r}].{c}").read(message)
                expected = [] if component in ("", '""') else [component]
                assert got == expected, (f, r, c)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_parse_error(raw: bytes) -> None:
    for data in (raw, b"MSH|^~\\&|" + raw):
        try:
            message = parse(data)
        except ParseError:
            continue
        for expr in ("MSH-9.1", "PID-3[*].1", "OBX[*]-5", "PID-3[5=MR].1"):
            compile_path(expr).read(message)
        _ = message.message_type, message.message_id, message.occurred_at()


def test_corpus_is_there(corpus: Path) -> None:
    assert len(list(corpus.glob("hl7v2/**/*.hl7"))) >= 130


@pytest.mark.corpus("hl7v2/**/*.hl7")
def test_every_corpus_file_parses_or_fails_typed(corpus_file: Path) -> None:
    try:
        message = parse(corpus_file.read_bytes())
    except ParseError:
        return
    assert message.message_type and message.segments[0].id == "MSH"
    for segment in message.segments:
        for number in range(1, len(segment.fields)):
            compile_path(f"{segment.id}[*]-{number}[*].1").read(message)
