"""Outbound HL7 v2 templates (pure): canonical events -> ADT^A01/A03/A04/A08 and ORU^R01, escaping,
MSH from the connector, template overrides, and round trips through the shipped inbound routes."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.delivery import ConnectorSpec, Delivery
from middleware.delivery.base import connector_problems
from middleware.delivery.hl7_template import event_kind
from middleware.delivery.mllp import MllpConnector, control_id
from middleware.errors import DeliveryError
from middleware.project import Project, load_project
from middleware.route import transform

REPO = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 11, 25, 9, 30, 15, tzinfo=dt.UTC)
EVENT_ID = "0b6f5a1e-4c52-5b7e-9d1e-3f2a4c5d6e7f"


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {})


def connector(**options: Any) -> MllpConnector:
    return MllpConnector(ConnectorSpec("bed-board-mllp", "mllp", {"host": "127.0.0.1", "port": 2575, **options}))


def event(kind: str, data: dict[str, Any], **attributes: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": EVENT_ID, "type": f"{kind}.v1", "source": "urn:middleware:route:adt-inbound",
            "time": "2026-11-24T08:29:00+01:00", "correlationid": "corr-1", "data": data, **attributes}


def delivery_of(ev: dict[str, Any]) -> Delivery:
    return Delivery(json.dumps(ev).encode(), ev["id"], ev.get("correlationid", ""), "adt-inbound", ev["type"])


def render(ev: dict[str, Any], **options: Any) -> bytes:
    return connector(**options).message(delivery_of(ev), NOW)


def parsed(raw: bytes) -> hl7.Message:
    return hl7.parse(raw.decode("utf-8"))


def field(message: hl7.Message, path: str) -> str:
    """A value read by python-hl7, unescaped: ``PID.F5.R1.C1`` (a component) or ``PID.F5`` (a whole field)."""
    if ".R" not in path:
        segment, number = path.split(".F")
        return message.unescape(str(message.segment(segment)[int(number)]))
    return message.unescape(str(message[path]))


ADMITTED = {"patient": {"mrn": "MRN-4711", "name": {"family": "Müller", "given": "Anna"}, "birth_date": "1984-03-12",
                        "sex": "female"},
            "encounter": {"visit_number": "V-9001", "class": "inpatient",
                          "location": {"point_of_care": "WARD7", "room": "0712", "bed": "B"},
                          "admitted_at": "2026-11-24T08:25:00+01:00"}}


def test_admitted_is_an_a01_that_python_hl7_reads_with_the_event_values() -> None:
    message = parsed(render(event("patient.admitted", ADMITTED)))
    assert field(message, "MSH.F9") == "ADT^A01^ADT_A01"
    assert field(message, "PID.F3.R1.C1") == "MRN-4711"
    assert field(message, "PID.F3.R1.C5") == "MR"
    assert field(message, "PID.F5.R1.C1") == "Müller"
    assert field(message, "PID.F7") == "19840312"
    assert field(message, "PID.F8") == "F"
    assert field(message, "PV1.F2") == "I"
    assert field(message, "PV1.F3.R1.C3") == "B"
    assert field(message, "PV1.F19") == "V-9001"
    assert field(message, "PV1.F44") == "20261124082500+0100"
    assert field(message, "EVN.F2") == "20261124082900+0100"  # the event's time


def test_msh_carries_the_connector_names_now_and_a_control_id_derived_from_the_event_id() -> None:
    raw = render(event("patient.admitted", ADMITTED), sending_application="MW", sending_facility="GHH",
                 receiving_application="BEDBOARD", receiving_facility="WARDS", processing_id="T", version="2.4")
    message = parsed(raw)
    assert [field(message, f"MSH.F{n}") for n in (3, 4, 5, 6)] == ["MW", "GHH", "BEDBOARD", "WARDS"]
    assert field(message, "MSH.F7") == "20261125093015+0000"
    assert field(message, "MSH.F10") == control_id(EVENT_ID) == "0B6F5A1E4C525B7E9D1E"
    assert field(message, "MSH.F11") == "T"
    assert field(message, "MSH.F12") == "2.4"
    assert field(message, "MSH.F18") == "UNICODE UTF-8"
    assert render(event("patient.admitted", ADMITTED)) == render(event("patient.admitted", ADMITTED))  # same try
    assert control_id("not-a-uuid") == control_id("not-a-uuid") != control_id("not-a-uuid-2")
    assert len(control_id("not-a-uuid")) == 20


@pytest.mark.parametrize(("kind", "message_type"), [
    ("patient.admitted", "ADT^A01^ADT_A01"), ("patient.transferred", "ADT^A02^ADT_A02"),
    ("patient.discharged", "ADT^A03^ADT_A03"),
    ("patient.registered", "ADT^A04^ADT_A01"), ("patient.updated", "ADT^A08^ADT_A01"),
])
def test_each_patient_event_has_its_adt_message_type(kind: str, message_type: str) -> None:
    message = parsed(render(event(kind, {"patient": {"mrn": "M1"}})))
    assert field(message, "MSH.F9") == message_type
    assert field(message, "EVN.F1") == message_type[4:7]
    assert field(message, "PID.F3.R1.C1") == "M1"
    assert str(message.segment("PV1")[2]) in ("N", "U")  # PV1 is required in these structures


@pytest.mark.parametrize(("sample", "route"), [
    ("adt-inbound/a01-admit.hl7", "adt-inbound"), ("adt-inbound/a02-transfer.hl7", "adt-inbound"),
    ("adt-inbound/a03-discharge.hl7", "adt-inbound"),
    ("adt-inbound/a04-register.hl7", "adt-inbound"), ("adt-inbound/a08-update.hl7", "adt-inbound"),
    ("results-inbound/oru-r01-lipid-panel.hl7", "results-inbound"),
])
def test_what_we_send_reads_back_through_the_shipped_route_as_the_same_event_data(
        project: Project, sample: str, route: str) -> None:
    events = transform(project.routes[route], (REPO / "samples" / sample).read_bytes()).events
    assert events
    for original in events:
        raw = connector().message(delivery_of(original), NOW)
        [again] = transform(project.routes[route], raw).events
        assert again["data"] == original["data"]
        assert again["type"] == original["type"]


@pytest.mark.parametrize(("sample", "route"), [
    ("adt-inbound/a01-admit.hl7", "adt-inbound"), ("adt-inbound/a02-transfer.hl7", "adt-inbound"),
    ("adt-inbound/a03-discharge.hl7", "adt-inbound"),
    ("adt-inbound/a04-register.hl7", "adt-inbound"), ("adt-inbound/a08-update.hl7", "adt-inbound"),
    ("results-inbound/oru-r01-lipid-panel.hl7", "results-inbound"),
])
def test_what_we_send_passes_hl7apys_strict_structure_validation(project: Project, sample: str, route: str) -> None:
    for original in transform(project.routes[route], (REPO / "samples" / sample).read_bytes()).events:
        raw = connector().message(delivery_of(original), NOW).decode()
        parse_message(raw, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()


RESULT = {"patient": {"mrn": "M7"},
          "order": {"id": "ORD-1", "code": "24331-1", "name": "Lipid panel"},
          "result": {"status": "F", "notes": ["not fasting"]},
          "observations": [
              {"code": "2093-3", "name": "Cholesterol", "value": 196, "unit": "mg/dL", "status": "F"},
              {"code": "X-1", "value": {"code": "POS", "display": "Positive", "system": "L"}},
              {"code": "X-2", "value": {"comparator": "<", "value": 5}, "notes": ["line one\nline two", "n2"]},
              {"code": "X-3", "value": "free | text ^ with ~ delimiters & \\ slash"},
          ]}


def test_result_is_an_oru_with_one_obx_per_observation_typed_by_its_value() -> None:
    message = parsed(render(event("result.reported", RESULT)))
    assert field(message, "MSH.F9") == "ORU^R01^ORU_R01"
    obx = message.segments("OBX")
    assert [str(s[1]) for s in obx] == ["1", "2", "3", "4"]
    assert [str(s[2]) for s in obx] == ["NM", "CWE", "SN", "ST"]
    assert str(obx[0][5]) == "196"
    assert str(obx[1][5]) == "POS^Positive^L"
    assert str(obx[2][5]) == "<^5"
    assert message.unescape(str(obx[3][5])) == "free | text ^ with ~ delimiters & \\ slash"
    assert field(message, "OBR.F4.R1.C2") == "Lipid panel"
    notes = [message.unescape(str(s[3])) for s in message.segments("NTE")]
    assert notes == ["not fasting", "line one\rline two", "n2"]  # \.br\ for the line break (CR in python-hl7)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("|^~\\&\r\n"),
               min_size=1, max_size=40).filter(lambda s: s.strip() == s and s.strip()))
def test_any_value_with_delimiters_is_escaped_and_reads_back_unchanged(project: Project, family: str) -> None:
    data = {"patient": {"mrn": "M1", "name": {"family": family, "given": "A"}}}
    raw = render(event("patient.updated", data))
    assert raw.count(b"\r") == 4  # MSH EVN PID PV1: nothing split a segment
    message = parsed(raw)
    assert field(message, "PID.F5.R1.C2") == "A"  # the components after it did not move
    [again] = transform(project.routes["adt-inbound"], raw).events
    expected = family.replace("\r\n", "\n").replace("\r", "\n")
    assert again["data"]["patient"]["name"]["family"] == expected


def test_templates_in_the_connector_change_remove_and_add_fields() -> None:
    templates = {"patient.admitted": {"fields": {"PID-5.1": "patient.name.given", "PV1-19": None,
                                                 "PV1-3.4": {"value": "NORTH"}, "ZBB-1": "encounter.location.bed",
                                                 "MSH-8": {"value": "SECRET"}}},
                 "order.placed": {"message_type": "ORM^O01^ORM_O01",
                                  "fields": {"PID-3.1": {"path": "patient.mrn", "required": True},
                                             "ORC-1": {"value": "NW"}, "ORC-2": "order.id"}}}
    message = parsed(render(event("patient.admitted", ADMITTED), templates=templates))
    assert field(message, "PID.F5.R1.C1") == "Anna"
    assert str(message.segment("PV1")[19]) == ""
    assert field(message, "PV1.F3.R1.C4") == "NORTH"
    assert field(message, "ZBB.F1") == "B"
    assert field(message, "MSH.F8") == "SECRET"
    order = parsed(render(event("order.placed", {"order": {"id": "O-9"}, "patient": {"mrn": "M2"}}),
                          templates=templates))
    assert field(order, "MSH.F9") == "ORM^O01^ORM_O01"
    assert field(order, "ORC.F2") == "O-9"


@pytest.mark.parametrize(("templates", "says"), [
    ({"patient.admitted": {"fields": {"PID5.1": "x"}}}, "not an HL7 target path"),
    ({"patient.admitted": {"fields": {"PID-0": "x"}}}, "not an HL7 field path"),
    ({"patient.admitted": {"fields": {"PID-5": {"path": "x", "as": "money"}}}}, "is not one of"),
    ({"patient.admitted": {"fields": {"NTE[*]-3": "x"}}}, "no repeating NTE"),
    ({"order.placed": {"fields": {"ORC-2": "order.id"}}}, "set message_type"),
])
def test_bad_templates_are_reported_by_validate(templates: dict[str, Any], says: str) -> None:
    [(key, message)] = connector_problems("mllp", {"host": "h", "port": 1, "templates": templates})
    assert key == ("templates",)
    assert says in message


@pytest.mark.parametrize(("ev", "says"), [
    (event("order.placed", {"order": {"id": "O"}, "patient": {"mrn": "M"}}), "no HL7 template for event type"),
    (event("patient.admitted", {"patient": {"name": {"family": "X"}}}), "PID-3.1: the event has no patient.mrn"),
    (event("patient.admitted", {"patient": {"mrn": "M", "birth_date": "soon"}}), "PID-7"),
    (event("result.reported", {"patient": {"mrn": "M"}, "observations": [{"code": "C", "value": {"size": 3}}]}),
     "cannot be written back"),
])
def test_an_event_that_cannot_be_written_is_a_non_retryable_delivery_error(ev: dict[str, Any], says: str) -> None:
    with pytest.raises(DeliveryError) as caught:
        render(ev)
    assert not caught.value.retryable
    assert says in caught.value.message


def test_a_body_that_is_not_json_is_a_non_retryable_delivery_error() -> None:
    with pytest.raises(DeliveryError, match="not JSON") as caught:
        connector().message(Delivery(b"\x00not json", EVENT_ID, "c", "r", "patient.admitted.v1"))
    assert not caught.value.retryable


def test_a_value_the_charset_cannot_hold_dead_letters_and_latin1_is_sent_as_latin1() -> None:
    ev = event("patient.updated", {"patient": {"mrn": "M", "name": {"family": "Müller"}}})
    assert "Müller".encode("latin-1") in render(ev, charset="8859/1")
    with pytest.raises(DeliveryError, match="charset ASCII"):
        render(ev, charset="ASCII")


def test_event_kind_drops_the_major_version() -> None:
    assert event_kind("patient.admitted.v1") == "patient.admitted"
    assert event_kind("patient.admitted") == "patient.admitted"
    assert event_kind("x.vip") == "x.vip"


def test_a_document_reshaped_by_a_delivery_map_is_read_as_the_data_with_the_type_from_the_delivery() -> None:
    mapped = {"patient": {"mrn": "MAPPED-1", "name": {"family": "Roe"}}}  # what an outbound map: produced
    raw = connector().message(Delivery(json.dumps(mapped).encode(), EVENT_ID, "c", "adt-inbound",
                                       "patient.updated.v1"), NOW)
    message = parsed(raw)
    assert field(message, "MSH.F9") == "ADT^A08^ADT_A01"
    assert field(message, "PID.F3.R1.C1") == "MAPPED-1"
    assert field(message, "PID.F5.R1.C1") == "Roe"
