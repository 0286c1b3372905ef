"""The shipped adt-inbound route: HL7 v2 ADT -> canonical patient events (pure pipeline, no broker)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from middleware.envelope import EVENT_ID_NAMESPACE
from middleware.errors import MappingError, ParseError, PipelineError, SchemaValidationError
from middleware.project import Project, load_project
from middleware.route import MessageContext, transform

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "adt-inbound"


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {})


def run(project: Project, raw: bytes, **context: str) -> list[dict]:
    return transform(project.routes["adt-inbound"], raw, MessageContext(**context)).events


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def test_a01_becomes_patient_admitted_with_catalogue_fields(project: Project) -> None:
    [event] = run(project, sample("a01-admit.hl7"), correlation_id="corr-1")
    assert event["specversion"] == "1.0"
    assert event["type"] == "patient.admitted.v1"
    assert event["source"] == "urn:middleware:route:adt-inbound"
    assert event["dataschema"] == "urn:middleware:schema:patient.admitted:1"
    assert event["datacontenttype"] == "application/json"
    assert event["subject"] == "Patient/MRN-4711"
    assert event["correlationid"] == "corr-1"
    # EVN-6 absent -> EVN-2 (recorded), offset kept
    assert event["time"] == "2026-11-24T08:29:00+01:00"
    # id: UUIDv5 of route, source identity (MSH-3, MSH-4, MSH-10, MSH-7 as sent + a digest), event type, index
    segments = sample("a01-admit.hl7").decode().replace("\r\n", "\r").replace("\n", "\r").strip("\r").split("\r")
    digest = hashlib.sha256("\r".join(s for s in segments if s).encode()).hexdigest()
    identity = ["EPIC", "GHH", "DEMO-A01-0001", "20261124083000+0100", f"sha256:{digest}"]
    name = json.dumps(["adt-inbound", identity, "patient.admitted.v1", 0], separators=(",", ":"), ensure_ascii=False)
    assert event["id"] == str(uuid.uuid5(EVENT_ID_NAMESPACE, name))
    data = event["data"]
    # PID-3 repetition with identifier type MR wins over the first repetition (PI)
    assert data["patient"]["mrn"] == "MRN-4711"
    assert data["patient"]["name"] == {"family": "Müller", "given": "Anna", "middle": "Maria", "prefix": "Dr."}
    assert data["patient"]["birth_date"] == "1984-03-12"
    assert data["patient"]["sex"] == "female"
    assert data["patient"]["address"]["line"] == "Hauptstra&e 5"  # \T\ decoded to the subcomponent separator
    assert data["encounter"] == {
        "visit_number": "V-9001",
        "class": "inpatient",
        "location": {"point_of_care": "WARD7", "room": "0712", "bed": "B", "facility": "GHH"},
        "attending_doctor": "4711",
        "admitted_at": "2026-11-24T08:25:00+01:00",
    }


def test_a03_becomes_patient_discharged(project: Project) -> None:
    [event] = run(project, sample("a03-discharge.hl7"))
    assert event["type"] == "patient.discharged.v1"
    assert event["data"]["encounter"]["discharged_at"] == "2026-11-24T16:50:00+01:00"
    assert event["data"]["encounter"]["disposition"] == "01"
    assert event["data"]["encounter"]["visit_number"] == "V-9001"
    # no AMQP correlation id: MSH-10 is the correlation id
    assert event["correlationid"] == "DEMO-A03-0001"


def test_a04_a08_a40(project: Project) -> None:
    [registered] = run(project, sample("a04-register.hl7"))
    assert registered["type"] == "patient.registered.v1"
    assert registered["data"]["patient"]["name"] == {"family": "O^Brien", "given": "Liam"}  # \S\ decoded
    assert registered["data"]["patient"]["sex"] == "male"
    assert registered["time"] == "2026-11-24T09:15:00Z"  # naive timestamp read in the configured UTC
    [updated] = run(project, sample("a08-update.hl7"))
    assert updated["type"] == "patient.updated.v1"
    assert updated["data"]["patient"]["name"]["middle"] == "James"
    [merged] = run(project, sample("a40-merge.hl7"))
    assert merged["type"] == "patient.merged.v1"
    assert merged["data"] == {"patient": {"mrn": "MRN-4711", "name": {"family": "Müller", "given": "Anna"}},
                              "merged_mrn": "MRN-4799"}


def test_same_input_gives_same_event_id_and_other_route_input_another(project: Project) -> None:
    first = run(project, sample("a01-admit.hl7"), correlation_id="a")[0]
    again = run(project, sample("a01-admit.hl7"), correlation_id="b")[0]
    other = run(project, sample("a03-discharge.hl7"))[0]
    assert first["id"] == again["id"]
    assert first["id"] != other["id"]


def test_correlation_id_precedence(project: Project) -> None:
    raw = sample("a01-admit.hl7")
    assert run(project, raw, correlation_id="amqp", header_correlation_id="hdr")[0]["correlationid"] == "amqp"
    assert run(project, raw, header_correlation_id="hdr")[0]["correlationid"] == "DEMO-A01-0001"
    no_msh10 = raw.replace(b"|DEMO-A01-0001|", b"||")
    assert run(project, no_msh10, header_correlation_id="hdr")[0]["correlationid"] == "hdr"
    generated = run(project, no_msh10)[0]["correlationid"]
    assert uuid.UUID(generated).version == 4


@pytest.mark.parametrize("separator", [b"\r", b"\n", b"\r\n"])
def test_segment_separators_and_bom(project: Project, separator: bytes) -> None:
    raw = sample("a01-admit.hl7").replace(b"\r", separator)
    assert run(project, raw)[0]["data"]["patient"]["mrn"] == "MRN-4711"
    assert run(project, b"\xef\xbb\xbf" + raw)[0]["data"]["patient"]["mrn"] == "MRN-4711"


def test_latin1_charset_from_msh18(project: Project) -> None:
    raw = sample("a01-admit.hl7").replace(b"UNICODE UTF-8", b"8859/1").decode("utf-8").encode("latin-1")
    assert run(project, raw)[0]["data"]["patient"]["name"]["family"] == "Müller"


def test_sex_codes_and_patient_classes(project: Project) -> None:
    raw = sample("a01-admit.hl7")
    for code, sex in {"F": "female", "M": "male", "O": "other", "U": "unknown", "A": "other", "N": "unknown"}.items():
        assert run(project, raw.replace(b"|19840312|F|", f"|19840312|{code}|".encode()))[0]["data"]["patient"][
            "sex"] == sex
    classes = {"I": "inpatient", "O": "outpatient", "E": "emergency", "P": "preadmit", "R": "recurring",
               "B": "obstetrics"}
    for code, klass in classes.items():
        changed = raw.replace(b"PV1|1|I|", f"PV1|1|{code}|".encode())
        assert run(project, changed)[0]["data"]["encounter"]["class"] == klass


def test_unknown_patient_class_is_a_mapping_error_naming_the_table(project: Project) -> None:
    with pytest.raises(MappingError) as raised:
        run(project, sample("a01-admit.hl7").replace(b"PV1|1|I|", b"PV1|1|Z|"), correlation_id="c-9")
    assert raised.value.stage == "map"
    assert raised.value.route == "adt-inbound"
    assert raised.value.correlation_id == "c-9"
    assert "patient_class" in str(raised.value) and "encounter.class" in str(raised.value)


def test_missing_birth_date_still_admits(project: Project) -> None:
    """Only identifiers are required (catalogue v1): an admission without a birth date is an event."""
    [event] = run(project, sample("a01-admit.hl7").replace(b"|19840312|", b"||"))
    assert "birth_date" not in event["data"]["patient"]


def test_missing_required_field_is_a_validation_error(project: Project) -> None:
    route = project.routes["adt-inbound"]
    rule = route.events[0]  # patient.admitted v1, here with a schema that also requires a birth date
    schema = json.loads(rule.schema.path.read_text())
    schema["properties"]["patient"]["required"].append("birth_date")
    strict = dataclasses.replace(rule.schema, validator=Draft202012Validator(schema), fast=None)
    route = dataclasses.replace(route, events=(dataclasses.replace(rule, schema=strict), *route.events[1:]))
    with pytest.raises(SchemaValidationError) as raised:
        transform(route, sample("a01-admit.hl7").replace(b"|19840312|", b"||"))
    assert raised.value.stage == "validate"
    assert "birth_date" in str(raised.value)
    assert "Müller" not in str(raised.value)  # never echo values (PHI) in errors


def test_malformed_message_is_a_parse_error(project: Project) -> None:
    with pytest.raises(ParseError) as raised:
        run(project, sample("malformed-no-msh.hl7"))
    assert raised.value.stage == "parse"
    assert raised.value.route == "adt-inbound"


def test_other_message_types_are_filtered(project: Project) -> None:
    outcome = transform(project.routes["adt-inbound"], sample("a01-admit.hl7").replace(b"ADT^A01^ADT_A01",
                                                                                        b"ADT^A05^ADT_A05"))
    assert outcome.filtered and outcome.events == []


ADT_GLOB = "hl7v2/fhir-converter/ADT*.hl7"


def test_corpus_has_the_adt_messages(corpus: Path) -> None:
    assert len(list(corpus.glob(ADT_GLOB))) > 40


@pytest.mark.corpus(ADT_GLOB)
def test_corpus_adt_gives_its_event_or_a_typed_error(project: Project, corpus_file: Path) -> None:
    route = project.routes["adt-inbound"]
    expected = {"ADT^A01": "patient.admitted.v1", "ADT^A02": "patient.transferred.v1",
                "ADT^A03": "patient.discharged.v1", "ADT^A04": "patient.registered.v1",
                "ADT^A08": "patient.updated.v1", "ADT^A11": "patient.admission_cancelled.v1",
                "ADT^A13": "patient.discharge_cancelled.v1", "ADT^A40": "patient.merged.v1"}
    try:
        outcome = transform(route, corpus_file.read_bytes())
    except PipelineError as exc:
        assert exc.stage in {"parse", "map", "validate"}
        assert exc.route == "adt-inbound"
        return
    if outcome.message_type in expected:
        assert outcome.events and {e["type"] for e in outcome.events} == {expected[outcome.message_type]}
        assert all(e["data"]["patient"]["mrn"] for e in outcome.events)  # A40: one event per PID/MRG pair
    else:
        assert outcome.filtered
