"""The mapping language, conditions, conversions and the CloudEvents envelope."""

from __future__ import annotations

import uuid
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from middleware.envelope import build_event, event_id, resolve_correlation_id, rfc3339
from middleware.errors import MappingError
from middleware.formats import get_format
from middleware.mapping import LookupTable, SpecError, apply_rules, compile_condition, compile_field

JSON = get_format("json")
HL7 = get_format("hl7v2")
SEX = LookupTable("sex", {"F": "female", "M": "male"}, "unknown")
CLASS = LookupTable("patient_class", {"I": "inpatient"})


def doc(data: dict) -> object:
    import orjson

    return JSON.parse(orjson.dumps(data))


def field(target: str, spec: object, fmt: object = JSON) -> object:
    return compile_field(target, spec, fmt, {"sex": SEX, "patient_class": CLASS})  # type: ignore[arg-type]


def test_string_path_and_nested_targets() -> None:
    rules = (field("patient.mrn", "p.id"), field("patient.name.family", "p.name[0].family"))
    assert apply_rules(rules, doc({"p": {"id": "1", "name": [{"family": "X"}]}})) == {
        "patient": {"mrn": "1", "name": {"family": "X"}}}


def test_absent_values_are_left_out_and_defaults_apply() -> None:
    rules = (field("a", "missing"), field("b", {"path": "missing", "default": "d"}))
    assert apply_rules(rules, doc({})) == {"b": "d"}


def test_path_list_takes_the_first_with_a_value() -> None:
    rule = field("x", {"path": ["a", "b", "c"]})
    assert apply_rules((rule,), doc({"b": "2", "c": "3"})) == {"x": "2"}


def test_required_missing_names_target_and_source() -> None:
    with pytest.raises(MappingError, match=r"patient.mrn: required value missing \(p.id is empty\)"):
        apply_rules((field("patient.mrn", {"path": "p.id", "required": True}),), doc({}))


def test_constants_templates_and_lists() -> None:
    rules = (
        field("kind", {"value": "adt"}),
        field("label", {"template": "{n.family}, {n.given}"}),
        field("codes", "items[*].code"),
    )
    out = apply_rules(rules, doc({"n": {"family": "Doe", "given": "J"}, "items": [{"code": "a"}, {"code": "b"}]}))
    assert out == {"kind": "adt", "label": "Doe, J", "codes": ["a", "b"]}


@pytest.mark.parametrize(("kind", "value", "expected"), [
    ("date", "19840312", "1984-03-12"),
    ("date", "198403121200+0100", "1984-03-12"),
    ("date", "1984-03-12", "1984-03-12"),
    ("datetime", "20261124082500+0100", "2026-11-24T08:25:00+01:00"),
    ("datetime", "20261124082500", "2026-11-24T08:25:00"),
    ("datetime", "2026-11-24T08:25:00Z", "2026-11-24T08:25:00Z"),
    ("int", " 42", 42),
    ("decimal", "7.25", 7.25),
    ("decimal", "7", 7),
    ("bool", "Y", True),
    ("bool", "false", False),
])
def test_conversions(kind: str, value: str, expected: object) -> None:
    assert apply_rules((field("v", {"path": "v", "as": kind}),), doc({"v": value})) == {"v": expected}


@pytest.mark.parametrize(("kind", "value"), [("date", "19841312"), ("date", "19840312XYZ"), ("int", "4x"),
                                              ("decimal", "NaN"), ("bool", "maybe"), ("datetime", "2026-13-01")])
def test_bad_conversions_are_mapping_errors(kind: str, value: str) -> None:
    with pytest.raises(MappingError, match=f"v: v is not a valid {kind}"):
        apply_rules((field("v", {"path": "v", "as": kind}),), doc({"v": value}))


def test_lookup_with_and_without_default() -> None:
    assert apply_rules((field("s", {"path": "s", "lookup": "sex"}),), doc({"s": "Q"})) == {"s": "unknown"}
    with pytest.raises(MappingError, match="not in lookup table 'patient_class'"):
        apply_rules((field("c", {"path": "c", "lookup": "patient_class"}),), doc({"c": "Q"}))


@pytest.mark.parametrize("spec", [
    {"path": "a", "value": 1},
    {"as": "date"},
    {"path": "a", "as": "when"},
    {"path": "a", "lookup": "nope"},
    {"path": "a", "colour": "red"},
    {"path": []},
    42,
])
def test_invalid_field_specs_are_rejected(spec: object) -> None:
    with pytest.raises(SpecError):
        field("t", spec)


def test_invalid_source_expression_is_rejected_with_the_format_reason() -> None:
    with pytest.raises(SpecError, match="PID3"):
        field("t", "PID3.1", HL7)


def test_conditions() -> None:
    adt = HL7.parse(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|X1|P|2.5\rPID|1||42^^^H^MR||Doe^J||19800101|F\r")
    assert compile_condition({"message_type": ["ADT^A01", "ADT^A04"]}, HL7).matches(adt)
    assert not compile_condition({"message_type": "ADT^A03"}, HL7).matches(adt)
    assert compile_condition({"equals": {"PID-8": ["F", "M"]}, "exists": ["PID-3.1"]}, HL7).matches(adt)
    assert not compile_condition({"missing": "PID-3.1"}, HL7).matches(adt)
    assert compile_condition({"missing": ["PV1-2"]}, HL7).matches(adt)
    with pytest.raises(SpecError, match="unknown condition 'type'"):
        compile_condition({"type": "x"}, HL7)


def test_event_id_is_uuid5_of_route_identity_type_and_index() -> None:
    first = event_id("r", ("m1",), "t.v1", 0)
    assert uuid.UUID(first).version == 5
    assert first == event_id("r", ("m1",), "t.v1", 0)
    assert len({first, event_id("r", ("m1",), "t.v1", 1), event_id("r", ("m2",), "t.v1", 0),
                event_id("s", ("m1",), "t.v1", 0), event_id("r", ("m1",), "u.v1", 0)}) == 5


@given(st.text(min_size=1), st.lists(st.text()), st.integers(min_value=0, max_value=50))
def test_event_id_is_deterministic(route: str, identity: list[str], index: int) -> None:
    assert event_id(route, identity, "t.v1", index) == event_id(route, tuple(identity), "t.v1", index)


def test_correlation_id_rules() -> None:
    assert resolve_correlation_id("amqp", "msh10", "hdr") == "amqp"
    assert resolve_correlation_id(None, "msh10", "hdr") == "msh10"
    assert resolve_correlation_id(None, None, "hdr") == "hdr"
    assert uuid.UUID(resolve_correlation_id(None, None, None)).version == 4


def test_rfc3339_times() -> None:
    utc, paris = ZoneInfo("UTC"), ZoneInfo("Europe/Paris")
    assert rfc3339("2026-11-24T08:25:00+01:00", utc) == "2026-11-24T08:25:00+01:00"
    assert rfc3339("2026-11-24T08:25:00", utc) == "2026-11-24T08:25:00Z"
    assert rfc3339("2026-07-01T08:25:00", paris) == "2026-07-01T08:25:00+02:00"
    assert rfc3339("2026-11-24", utc) == "2026-11-24T00:00:00Z"
    assert rfc3339("2026-11", utc) is None
    assert rfc3339(None, utc) is None


def test_build_event_shape() -> None:
    event = build_event(route="r", event_type="patient.updated", major=1, index=0, source_identity=("m",),
                        data={"patient": {}}, subject=None, time="2026-01-01T00:00:00Z", correlation_id="c")
    assert set(event) == {"specversion", "id", "type", "source", "time", "datacontenttype", "dataschema",
                          "correlationid", "data"}
    assert event["type"] == "patient.updated.v1"
    assert event["dataschema"] == "urn:middleware:schema:patient.updated:1"


def test_each_maps_a_list_of_objects_from_json_items() -> None:
    rule = field("lines", {"each": "items", "map": {"code": "code", "qty": {"path": "n", "as": "int"}}})
    data = apply_rules((rule,), doc({"items": [{"code": "a", "n": "2"}, {"code": "b"}, {}]}))
    assert data == {"lines": [{"code": "a", "qty": 2}, {"code": "b"}]}  # items with no values are left out
    assert apply_rules((rule,), doc({"items": []})) == {}


def test_each_over_hl7_segments_reads_each_segment_and_its_followers() -> None:
    raw = (b"MSH|^~\\&|A|B|C|D|2026||ORU^R01|1|P|2.5\rPID|1||42\rOBR|1||X|P1\rOBX|1|NM|A||1\rNTE|1||n1\r"
           b"OBX|2|NM|B||2\rOBR|2||Y|P2\rOBX|1|NM|C||3\r")
    rule = field("obs", {"each": "OBX", "map": {"code": "OBX-3", "order": "OBR-4", "mrn": "PID-3",
                                                "notes": "NTE[*]-3"}}, HL7)
    assert apply_rules((rule,), HL7.parse(raw)) == {"obs": [
        {"code": "A", "order": "P1", "mrn": "42", "notes": ["n1"]},
        {"code": "B", "order": "P1", "mrn": "42"},
        {"code": "C", "order": "P2", "mrn": "42"},  # parent segments resolve to the nearest one before the item
    ]}
    by_order = field("orders", {"each": "OBR", "map": {"id": "OBR-4", "codes": "OBX[*]-3"}}, HL7)
    assert apply_rules((by_order,), HL7.parse(raw)) == {"orders": [{"id": "P1", "codes": ["A", "B"]},
                                                                  {"id": "P2", "codes": ["C"]}]}
    nested = field("orders", {"each": "OBR", "map": {"id": "OBR-4", "results": {"each": "OBX", "map": {
        "code": "OBX-3", "notes": "NTE[*]-3"}}}}, HL7)
    assert apply_rules((nested,), HL7.parse(raw)) == {"orders": [
        {"id": "P1", "results": [{"code": "A", "notes": ["n1"]}, {"code": "B"}]},
        {"id": "P2", "results": [{"code": "C"}]}]}


@pytest.mark.parametrize(("spec", "message"), [
    ({"each": "OBX-5", "map": {"v": "OBX-5"}}, "must name a segment"),
    ({"each": "OBX"}, "each needs a map"),
    ({"each": "OBX", "map": {}}, "each needs a map"),
    ({"each": 3, "map": {"v": "OBX-5"}}, "each needs a repeating element"),
    ({"each": "OBX", "map": {"v": "OBX-5"}, "as": "int"}, "each takes only map and required"),
    ({"each": "OBX", "map": {"v": "OBX5"}}, "invalid HL7 path"),
])
def test_each_spec_errors(spec: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        field("obs", spec, HL7)
