"""OBX-5 typed by OBX-2 (``{path: OBX-5, typed_by: OBX-2}``), each data type, through the results route."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from middleware.formats import get_format
from middleware.formats.hl7v2 import parse
from middleware.formats.hl7v2_values import number, typed_value
from middleware.mapping import SpecError, compile_field
from middleware.project import Project, load_project
from middleware.route import transform

REPO = Path(__file__).resolve().parents[2]
HEAD = ("MSH|^~\\&|LIS|SOUTHLAB|EHR|SOUTHLAB|20260304120000||ORU^R01|T-{n}|P|2.5.1\r"
        "PID|1||SL-7^^^SOUTHLAB^MR||Kowalski^Jan\rOBR|1|SO-1||11502-2^Lab report^LN\r")


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {})


def value_of(project: Project, obx: str) -> Any:
    raw = (HEAD.format(n=abs(hash(obx)) % 10_000) + obx).encode()
    [event] = transform(project.routes["results-inbound"], raw).events
    [observation] = event["data"]["observations"]
    return observation.get("value")


@pytest.mark.parametrize(("obx", "expected"), [
    ("OBX|1|NM|2345-7^Glucose^LN||5.1|mmol/L", 5.1),
    ("OBX|1|NM|2345-7^Glucose^LN||196", 196),
    ("OBX|1|NM|2345-7^Glucose^LN||-0.25", -0.25),
    ("OBX|1|NM|2345-7^Glucose^LN||<0.5", "<0.5"),  # not a number: kept as sent, never a crash
    ("OBX|1|SN|777-3^Platelets^LN||^182", {"value": 182}),
    ("OBX|1|SN|5905-5^Monocytes^LN||<^5", {"comparator": "<", "value": 5}),
    ("OBX|1|SN|5196-1^Titer^LN||1^:^2", {"value": 1, "separator": ":", "value2": 2}),
    ("OBX|1|SN|2160-0^Creatinine^LN||>=^1.5", {"comparator": ">=", "value": 1.5}),
    ("OBX|1|SN|X^Range^L||2^-^4", {"value": 2, "separator": "-", "value2": 4}),
    ("OBX|1|CWE|600-7^Culture^LN||27268008^Salmonella^SCT", {"code": "27268008", "display": "Salmonella",
                                                             "system": "SCT"}),
    ("OBX|1|CE|883-9^ABO^LN||^^^A^Group A^L", {"code": "A", "display": "Group A", "system": "L"}),
    ("OBX|1|CNE|X^Y^L||N^Negative^HL70078", {"code": "N", "display": "Negative", "system": "HL70078"}),
    ("OBX|1|CWE|X^Y^L||^^^^^^^^Free text only", {"display": "Free text only"}),
    ("OBX|1|ST|X^Comment^L||Hemolysed \\T\\ lipemic", "Hemolysed & lipemic"),
    ("OBX|1|TX|11502-2^Report^LN||This~Is~A~Report", "This\nIs\nA\nReport"),
    ("OBX|1|FT|11502-2^Report^LN||Line one\\.br\\Line two", "Line one\nLine two"),
    ("OBX|1|DT|X^Date^L||2026", "2026"),
    ("OBX|1|DT|X^Date^L||202603", "2026-03"),
    ("OBX|1|DT|X^Date^L||20260304", "2026-03-04"),
    ("OBX|1|DTM|X^When^L||202603041230+0100", "2026-03-04T12:30:00+01:00"),
    ("OBX|1|TS|X^When^L||20260304123015^S", "2026-03-04T12:30:15"),
    ("OBX|1|ED|18748-4^Imaging report^LN||EHR^AP^PDF^Base64^JVBERi0xLjQK", {
        "source": "EHR", "type": "AP", "subtype": "PDF", "encoding": "Base64", "size": 9}),
    ("OBX|1|ED|X^Y^L||^IM^JPEG^Hex^FFD8FFE0", {"type": "IM", "subtype": "JPEG", "encoding": "Hex", "size": 4}),
    ("OBX|1|RP|X^Image^L||https://pacs.example.org/s/1^PACS^IM^JPEG",
     {"pointer": "https://pacs.example.org/s/1", "application": "PACS", "type": "IM", "subtype": "JPEG"}),
    ("OBX|1|XTN|X^Callback^L||^WPN^PH^^1^555^0100123^77", {"system": "phone", "value": "+1 555 0100123 ext. 77",
                                                           "use": "work"}),
    ("OBX|1|XTN|X^Callback^L||^NET^Internet^lab@example.org", {"system": "email", "value": "lab@example.org"}),
    ("OBX|1|XTN|X^Mobile^L||(555)0100-999^PRN^CP", {"system": "phone", "value": "(555)0100-999", "use": "mobile"}),
    ("OBX|1|CWE|X^Organisms^L||A^Alpha^L~B^Beta^L", [{"code": "A", "display": "Alpha", "system": "L"},
                                                     {"code": "B", "display": "Beta", "system": "L"}]),
    ("OBX|1|CX|X^Id^L||ID-77^^^AUTH", "ID-77"),  # other types: component 1, as an untyped path reads it
    ("OBX|1||X^Untyped^L||plain", "plain"),
])
def test_obx5_follows_obx2(project: Project, obx: str, expected: Any) -> None:
    assert value_of(project, obx) == expected


def test_empty_and_null_values_are_left_out(project: Project) -> None:
    assert value_of(project, 'OBX|1|NM|2345-7^Glucose^LN||""') is None
    assert value_of(project, "OBX|1|TX|11502-2^Report^LN||") is None


def test_numbers() -> None:
    assert (number("7"), number(" 7.25 "), number(".5"), number("+3")) == (7, 7.25, 0.5, 3)
    assert number("7,25") is None and number("1e3") is None and number("") is None


def test_typed_value_uses_the_messages_own_delimiters() -> None:
    message = parse(b"MSH#!$\\&#LIS#X#EHR#X#20260304##ORU!R01#1#P#2.5.1\rOBX#1#SN#X##<!5")
    raw = message.segments[1].field(5)
    assert typed_value(message, raw, "SN") == {"comparator": "<", "value": 5}
    assert typed_value(message, "a$b", "TX") == "a\nb"


def test_typed_by_is_checked_when_the_route_is_loaded() -> None:
    hl7, fhir = get_format("hl7v2"), get_format("fhir")
    assert compile_field("v", {"path": "OBX-5", "typed_by": "OBX-2"}, hl7, {}).typed
    for spec, message in [({"path": "OBX-5.1", "typed_by": "OBX-2"}, "reads a whole field"),
                          ({"path": "OBX-5", "typed_by": "OBR-2"}, "same segment"),
                          ({"path": "OBX-5", "typed_by": "OBX-2", "as": "int"}, "typed_by takes only"),
                          ({"path": "Observation.value", "typed_by": "x"}, "not available for format fhir")]:
        with pytest.raises(SpecError, match=message):
            compile_field("v", spec, fhir if "Observation" in spec["path"] else hl7, {})


_SCHEMA = json.loads((REPO / "schemas" / "result.reported" / "1.json").read_text())
_VALUE = Draft202012Validator({"$defs": _SCHEMA["$defs"],
                               **_SCHEMA["properties"]["observations"]["items"]["properties"]["value"]})
_MESSAGE = parse(b"MSH|^~\\&|A|B|C|D|20260101||ORU^R01|1|P|2.5.1")
_TYPES = ["NM", "SN", "CE", "CWE", "CNE", "CF", "ST", "TX", "FT", "DT", "DTM", "TS", "ED", "RP", "XTN", "CX", "",
          "ZZ"]


@settings(max_examples=400, deadline=None)
@given(datatype=st.sampled_from(_TYPES),
       raw=st.text(alphabet=st.sampled_from(list("^~&\\|0123456789.:<>=+-/ AZaz\"")), max_size=40))
def test_every_typed_value_fits_the_schema_union(datatype: str, raw: str) -> None:
    """Whatever a sender puts in OBX-5, the typed value is valid for result.reported v1 (or absent)."""
    field = raw.replace("|", "")
    value = typed_value(_MESSAGE, field, datatype)
    if value is not None:
        _VALUE.validate(value)
