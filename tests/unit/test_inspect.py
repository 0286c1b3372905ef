"""``middleware inspect``: every printed path, fed back to the route's path evaluator, reads the printed value."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.errors import ParseError
from middleware.formats import SplitInfo, get_format
from middleware.formats.hl7v2 import Delimiters, escape
from middleware.inspect import Field, detect_format, inspect_input, render_text, shown

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted(p for p in (REPO / "samples").rglob("*") if p.suffix in (".hl7", ".json"))
FHIR_INPUTS = sorted((REPO / "routes" / "tests" / "fhir-inbound" / "inputs").glob("*.json"))


def documents(raw: bytes, fmt: str) -> list[Any]:
    """The parsed messages of ``raw``, split the way inspect splits them (None: does not parse)."""
    impl = get_format(fmt)
    out: list[Any] = []
    for record in impl.split(io.BytesIO(raw), SplitInfo()):
        try:
            out.append(impl.parse(record.raw) if record.error is None else None)
        except ParseError:
            out.append(None)
    return out


def assert_round_trip(raw: bytes) -> int:
    """Every addressable printed path reads its printed value first (an HL7 null: nothing); returns the
    number of values checked."""
    fmt, messages = inspect_input(raw)
    docs = documents(raw, fmt)
    assert len(docs) == len(messages)
    checked = 0
    for message, doc in zip(messages, docs, strict=True):
        assert (doc is None) == (message.error is not None)
        paths = [f.path for f in message.fields]
        assert len(paths) == len(set(paths)), "a path printed twice"
        for item in message.fields:
            if not item.addressable:
                continue
            values = get_format(fmt).compile_path(item.path).read(doc)
            if item.value is None:
                assert values == [], item.path
            else:
                assert values, item.path
                assert values[0] == item.value and type(values[0]) is type(item.value), item.path
            checked += 1
    return checked


@pytest.mark.parametrize("sample", SAMPLES + FHIR_INPUTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_printed_path_reads_the_printed_value_in_the_shipped_samples(sample: Path) -> None:
    raw = sample.read_bytes()
    try:
        detect_format(raw)
    except ParseError:
        pytest.skip("not a message (a malformed sample)")
    _, messages = inspect_input(raw)
    checked = assert_round_trip(raw)
    assert checked > 0 or all(m.error for m in messages)


def test_hl7_paths_name_repetitions_components_subcomponents_and_segment_repeats() -> None:
    raw = (b"MSH|^~\\&|LAB|GHH|EHR|GHH|20261124143000||ORU^R01|C1|P|2.5.1\r"
           b"PID|1||100234^^^GHH&1.2.3&ISO^PI~RB0099812^^^GHH^MR||O\\T\\Brien^Ann\\.br\\Marie||\"\"\r"
           b"OBX|1|NM|2093-3^Cholesterol^LN||182|mg/dL\r"
           b"OBX|2|ST|TXT||This~Is~A~Report\r")
    _, [message] = inspect_input(raw)
    found = {f.path: f.value for f in message.fields}
    assert found["PID-3[2].1"] == "RB0099812" and found["PID-3[2].5"] == "MR"
    assert (found["PID-3[1].4.1"], found["PID-3[1].4.2"], found["PID-3[1].4.3"]) == ("GHH", "1.2.3", "ISO")
    assert found["PID-5.1"] == "O&Brien" and found["PID-5.2"] == "Ann\nMarie"  # escapes resolved
    assert found["PID-7"] is None  # the HL7 null is shown, as no value
    assert found["OBX[1]-5"] == "182" and found["OBX[2]-5[3]"] == "A" and found["OBX[1]-3.2"] == "Cholesterol"
    assert found["MSH-2"] == "^~\\&" and found["MSH-9.2"] == "R01"
    assert "PID-3" not in found and "PID-3.1" not in found  # a repeating field is always indexed
    assert list(found)[:3] == ["MSH-1", "MSH-2", "MSH-3"]  # message order
    assert_round_trip(raw)


def test_odd_delimiters_and_a_batch_give_one_block_per_message() -> None:
    one = b"MSH#*!$%#LAB#GHH#EHR#GHH#20261124##ADT*A08#C%d#P#2.3\rPID#1##A1*X!B2*Y##DOE%JR*JO\r"
    raw = (b"FHS|^~\\&|LAB\rBHS|^~\\&|LAB\r" + one.replace(b"%d", b"1") + one.replace(b"%d", b"2")
           + b"BTS|2\rFTS|1\r")
    fmt, messages = inspect_input(raw)
    assert fmt == "hl7v2" and [m.position for m in messages] == [1, 2]
    second = {f.path: f.value for f in messages[1].fields}
    assert second["MSH-10"] == "C2" and second["PID-3[2].2"] == "Y" and second["PID-5.1.2"] == "JR"
    assert assert_round_trip(raw) > 20
    text = list(render_text("b.hl7", fmt, messages))
    assert text[0] == "# message 1 of b.hl7: hl7v2 ADT^A08, 20 value(s)"
    assert "# message 2 of b.hl7: hl7v2 ADT^A08, 20 value(s)" in text


def test_fhir_paths_index_every_array_and_skip_nulls_as_the_reader_does() -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "active": False, "name": [
            {"family": "Kato", "given": ["Hana", None, "Mei"], "_given": [None, {"extension": [
                {"url": "http://example.org/x", "valueString": "y"}]}]}]}},
        {"resource": {"resourceType": "Observation", "status": "final", "valueQuantity": {"value": 7.20},
                      "note": [], "code": {"text": ""}}}]}
    raw = orjson.dumps(bundle)
    fmt, [patient, observation] = inspect_input(raw)  # a Bundle is split into its entries, as publish splits it
    found = {f.path: f.value for f in patient.fields}
    assert fmt == "fhir" and patient.message_type == "Patient" and observation.message_type == "Observation"
    assert found["Patient.name[0].given[1]"] == "Mei"  # the null is not counted
    assert found["Patient.name[0]._given[0].extension[0].valueString"] == "y"
    assert found["Patient.active"] is False
    second = {f.path: f.value for f in observation.fields}
    assert second["Observation.valueQuantity.value"] == 7.2
    assert "Observation.code.text" not in second  # empty: no value to read
    assert_round_trip(raw)


def test_a_key_no_path_can_spell_is_marked() -> None:
    raw = b'{"resourceType": "Basic", "code": {"text": "x"}, "odd-key": {"a": 1}}'
    _, [message] = inspect_input(raw)
    assert Field("Basic.`odd-key`.a", 1, addressable=False) in message.fields
    assert any(line.endswith("(no path reads this key)") for line in render_text("f", "fhir", [message]))


def test_text_shows_control_characters_as_escapes() -> None:
    assert shown("a\nb\x1b[31m\u202ec") == "a\\nb\\x1b[31m\\u202ec"
    assert shown(True) == "true" and shown(7.2) == "7.2" and shown(None).startswith('""')


def test_unknown_content_is_a_parse_error_naming_the_formats() -> None:
    with pytest.raises(ParseError, match="neither an HL7 v2 message"):
        inspect_input(b"PID|1||X\r")


def test_other_json_gets_the_json_formats_dotted_paths() -> None:
    raw = b'{"referral": {"items": [null, {"code": "X1", "n": 2}], "odd key": 1}, "tags": [["a", "b"]]}'
    fmt, [message] = inspect_input(raw)
    found = {f.path: f.value for f in message.fields}
    assert fmt == "json" and found["referral.items[1].code"] == "X1" and found["tags[0][1]"] == "b"
    assert Field("referral.`odd key`", 1, addressable=False) in message.fields
    assert_round_trip(raw)
    _, [top] = inspect_input(b'[{"a": 1}]')
    assert top.fields == [Field("[0].a", 1, addressable=False)]  # a path starts with a key


# -- properties ---------------------------------------------------------------------------------

# any text but segment breaks and the MLLP framing bytes the parser strips from the ends of a message
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\r\n\x0b\x1c"),
                max_size=6)
_SEGMENT = st.tuples(st.sampled_from(["PID", "OBX", "NTE", "ZPI"]),
                     st.lists(st.lists(st.lists(st.lists(_TEXT, min_size=1, max_size=3), min_size=1, max_size=3),
                                       min_size=1, max_size=3), max_size=6))
_DELIMITERS = st.sampled_from([Delimiters(), Delimiters("#", "*", "!", "$", "%"),
                               Delimiters("|", "^", "~", "\\", "&", "#")])  # v2.7: a truncation character


@settings(max_examples=150, deadline=None)
@given(segments=st.lists(_SEGMENT, max_size=6), d=_DELIMITERS)
def test_generated_hl7_every_leaf_value_is_printed_once_at_a_path_that_reads_it(
        segments: list[tuple[str, list[list[list[list[str]]]]]], d: Delimiters) -> None:
    lines = [f"MSH{d.field}{d.encoding_characters}{d.field}APP{d.field}{d.field}{d.field}{d.field}20261124"
             f"{d.field}{d.field}ADT{d.component}A08{d.field}1{d.field}P{d.field}2.5"]
    expected: Counter[str] = Counter(["APP", "20261124", "ADT", "A08", "1", "P", "2.5"])
    for segment_id, fields in segments:
        rendered = []
        for repetitions in fields:
            rendered.append(d.repetition.join(
                d.component.join(d.subcomponent.join(escape(s, d) for s in subs) for subs in comps)
                for comps in repetitions))
            expected.update(s for comps in repetitions for subs in comps for s in subs if s and s != '""')
        lines.append(d.field.join([segment_id, *rendered]))
    raw = "\r".join(lines).encode()
    _, [message] = inspect_input(raw)
    printed = Counter(f.value for f in message.fields if f.value is not None and f.path not in ("MSH-1", "MSH-2"))
    assert printed == expected
    assert_round_trip(raw)


_KEY = st.from_regex(r"[a-z][A-Za-z0-9_]{0,6}", fullmatch=True).filter(lambda k: k != "resourceType")
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_KEY, children, max_size=3),
    max_leaves=12)


def _leaves(node: Any) -> list[Any]:
    """The scalars a FHIRPath can reach (an array inside an array is not FHIR: no step reaches into it)."""
    if isinstance(node, dict):
        return [v for value in node.values() for v in _leaves(value)]
    if isinstance(node, list):
        return [v for item in node if not isinstance(item, list) for v in _leaves(item)]
    return [] if node is None or node == "" else [node]


@settings(max_examples=150, deadline=None)
@given(body=st.dictionaries(_KEY, _JSON, max_size=4))
def test_generated_fhir_every_scalar_is_printed_at_a_path_that_reads_it(body: dict[str, Any]) -> None:
    resource = {"resourceType": "Basic", **body}
    raw = orjson.dumps(resource)
    _, [message] = inspect_input(raw)
    addressable = [f for f in message.fields if f.addressable]
    assert sorted(map(repr, (f.value for f in addressable))) == sorted(map(repr, _leaves(resource)))
    assert_round_trip(raw)


# -- the command --------------------------------------------------------------------------------


def middleware(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "middleware", *args], cwd=REPO, input=stdin,
                          capture_output=True, timeout=60)


def test_cli_prints_paths_and_values_and_json() -> None:
    sample = "samples/adt-inbound/a01-admit.hl7"
    result = middleware("inspect", sample)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith(f"# {sample}: hl7v2 ADT^A01, ")
    assert any(line.split(" = ", 1)[0].rstrip() == "MSH-9.2" and line.endswith("= A01") for line in lines)
    assert result.stderr == b""
    result = middleware("inspect", "--json", "-", stdin=(REPO / "samples/fhir-inbound/patient-registered.json")
                        .read_bytes())
    document = json.loads(result.stdout)
    [message] = document["messages"]
    assert document["format"] == "fhir" and document["file"] == "stdin" and message["message_type"] == "Patient"
    assert {"path": "Patient.birthDate", "value": "1984-03-17"} in message["fields"]


def test_cli_route_option_and_errors() -> None:
    # the shipped batch holds a message with broken delimiters: shown as such, exit 1, the others printed
    result = middleware("inspect", "--route", "results-inbound", "samples/results-inbound/batch-lab-results.hl7")
    headers = [line for line in result.stdout.decode().splitlines() if line.startswith("# ")]
    assert result.returncode == 1 and len(headers) == 3
    assert "message 2 of" in headers[1] and "does not parse: bad delimiters" in headers[1]
    assert "hl7v2 ORU^R01" in headers[0] and "hl7v2 ORU^R01" in headers[2]
    result = middleware("inspect", "samples/adt-inbound/malformed-no-msh.hl7")
    assert result.returncode == 1 and result.stderr.decode().startswith("error: ")
    result = middleware("inspect", "--format", "fhir", "samples/adt-inbound/a01-admit.hl7")
    assert result.returncode == 1 and b"does not parse: not valid JSON" in result.stdout
    result = middleware("inspect", "--route", "nope", "samples/adt-inbound/a01-admit.hl7")
    assert result.returncode == 1 and b"no route 'nope'" in result.stderr
