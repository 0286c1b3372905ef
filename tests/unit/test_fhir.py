"""``format: fhir``: parsing, the FHIRPath subset, ``each``, strict validation and the fhir-inbound route."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.errors import FilterError, MappingError, ParseError
from middleware.formats import format_names, get_format
from middleware.formats.fhir import FhirDocument, check_structure, compile_path, parse
from middleware.project import Project, load_project
from middleware.route import transform

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "fhir-inbound"

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "pat-1",
    "meta": {"lastUpdated": "2026-01-02T03:04:05Z"},
    "identifier": [
        {"system": "urn:ssn", "value": "SSN-SECRET-1"},
        {"type": {"coding": [{"code": "MR"}]}, "value": "MRN-1"},
    ],
    "name": [
        {"use": "official", "family": "Testperson", "given": ["Ada", "Maria"]},
        {"use": "nickname", "given": ["Addy"]},
    ],
    "gender": "female",
    "birthDate": "1984-03-17",
    "active": True,
    "multipleBirthInteger": 2,
}


def doc(resource: dict[str, Any]) -> FhirDocument:
    return parse(orjson.dumps(resource))


def read(expr: str, resource: dict[str, Any] = PATIENT) -> list[Any]:
    return compile_path(expr).read(doc(resource))


# -- paths ------------------------------------------------------------------------------------


def test_format_is_registered() -> None:
    assert "fhir" in format_names() and get_format("fhir").name == "fhir"


def test_arrays_flatten_implicitly() -> None:
    assert read("Patient.name.given") == ["Ada", "Maria", "Addy"]
    assert read("Patient.name.family") == ["Testperson"]
    assert read("Patient.identifier.type.coding.code") == ["MR"]


def test_first_last_and_zero_based_index_apply_to_the_collection_so_far() -> None:
    assert read("Patient.name.first().given") == ["Ada", "Maria"]
    assert read("Patient.name.first().given.first()") == ["Ada"]
    assert read("Patient.name.given[1]") == ["Maria"]  # the second of all givens, as in FHIRPath
    assert read("Patient.name[1].given") == ["Addy"]
    assert read("Patient.name.given.last()") == ["Addy"]
    assert read("Patient.name[5].given") == []


def test_where_with_a_dotted_path_equality_and_starts_with() -> None:
    assert read("Patient.identifier.where(type.coding.code = 'MR').value") == ["MRN-1"]
    assert read("Patient.name.where(use='nickname').given") == ["Addy"]
    assert read("Patient.identifier.where(system.startsWith('urn:s')).value") == ["SSN-SECRET-1"]
    assert read("Patient.identifier.where(type.coding.code = 'XX').value") == []
    assert read("Patient.where(active = true).id") == ["pat-1"]
    assert read("Patient.where(active = false).id") == []
    assert read("Patient.where(multipleBirthInteger = 2).id") == ["pat-1"]


def test_replace_and_union() -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"reference": "Patient/MRN-9"}}
    assert read("Observation.subject.reference.replace('Patient/', '')", obs) == ["MRN-9"]
    assert read("Observation.status | Observation.code.text", obs) == ["final", "x"]


def test_relative_paths_and_this_read_the_current_node() -> None:
    assert read("name.family") == ["Testperson"]
    assert read("$this.id") == ["pat-1"]


def test_an_absolute_path_of_another_resource_type_reads_nothing() -> None:
    assert read("Observation.status") == []


def test_single_unless_the_path_ends_with_star() -> None:
    assert not compile_path("Patient.name.given").multiple
    assert not compile_path("Patient.name.first().given.first()").multiple
    assert compile_path("Patient.name.given[*]").multiple
    assert compile_path("Patient.name.given[*]").read(doc(PATIENT)) == ["Ada", "Maria", "Addy"]


@pytest.mark.parametrize(("expr", "message"), [
    ("", "empty"),
    ("Patient..name", "expected a name"),
    ("Patinet.name", "not a FHIR R4 resource type"),
    ("HumanName.family", "not a FHIR R4 resource type"),
    ("Patient.name.exists()", "exists() is not supported"),
    ("Patient.name[*].given", "[*] may only end a path"),
    ("Patient.name[x]", "an index is"),
    ("Patient.name.where(family)", "where() takes one test"),
    ("Patient.name.where(Patient.name.family = 'a')", "relative to each item"),
    ("Observation.subject.getReferenceKey(Banana)", "takes a resource type"),
    ("Observation.subject.resolve(1)", "takes no arguments"),
    ("Patient.name.where(family = 'a'", "unbalanced"),
    ("Patient.name.first(1)", "takes no arguments"),
    ("Patient.name + 1", "unexpected"),
    ("first()", "starts with a resource type"),
    ("Patient.name.given[*] | Patient.id", "every member of a union"),
])
def test_unsupported_syntax_is_a_value_error_saying_what(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        compile_path(expr)


# -- parsing ----------------------------------------------------------------------------------


def test_document_attributes_of_a_resource() -> None:
    patient = doc(PATIENT)
    assert (patient.message_type, patient.message_id, patient.occurred_at()) == (
        "Patient", "pat-1", "2026-01-02T03:04:05Z")


def test_resource_timing_wins_over_last_updated() -> None:
    obs = {"resourceType": "Observation", "meta": {"lastUpdated": "2026-01-02T00:00:00Z"},
           "issued": "2026-01-01T12:00:00Z", "effectiveDateTime": "2026-01-01T08:00:00+01:00"}
    assert doc(obs).occurred_at() == "2026-01-01T08:00:00+01:00"
    del obs["effectiveDateTime"]
    assert doc(obs).occurred_at() == "2026-01-01T12:00:00Z"
    assert doc({"resourceType": "Appointment", "start": "2026-02-01T10:00:00Z"}).occurred_at() is None


def test_bundle_type_id_and_entry_resources() -> None:
    bundle = {"resourceType": "Bundle", "type": "message", "timestamp": "2026-03-01T10:00:00Z",
              "entry": [{"fullUrl": "urn:uuid:1", "resource": {"resourceType": "MessageHeader"}},
                        {"resource": PATIENT},
                        {"resource": {**PATIENT, "id": "pat-2", "name": [{"family": "Other"}]}}]}
    parsed = doc(bundle)
    assert parsed.message_type == "Bundle/Patient"
    assert parsed.message_id == "urn:uuid:1"
    assert parsed.occurred_at() == "2026-03-01T10:00:00Z"
    assert compile_path("Patient.name.family").read(parsed) == ["Testperson", "Other"]
    assert compile_path("Bundle.entry.resource.id").read(parsed) == ["pat-1", "pat-2"]
    assert doc({"resourceType": "Bundle", "id": "b1", "type": "batch"}).message_type == "Bundle"
    with pytest.raises(ParseError, match="Bundle type"):
        doc({"resourceType": "Bundle", "type": "history"})  # searchset is split now; history is not


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "empty"),
    (b"  \n ", "empty"),
    (b'{"resourceType": "Patient", "name": "SECRET', "not valid JSON"),
    (b'["SECRET"]', "got an array"),
    (b'"SECRET"', "got a string"),
    (b"42", "got a number"),
    (b'{"id": "SECRET"}', "no resourceType"),
    (b'{"resourceType": 7}', "no resourceType"),
    (b'{"resourceType": "SECRETPerson"}', "not a FHIR R4 resource type"),
    (b'{"resourceType": "HumanName"}', "not a FHIR R4 resource type"),
    (b'{"resourceType": "Patient", "name": "SECRET\xff\xfe"}', "not UTF-8"),
])
def test_bad_input_is_a_typed_parse_error_without_values(raw: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message) as caught:
        parse(raw)
    assert "SECRET" not in str(caught.value) and "7" not in caught.value.message


def test_utf8_bom_is_accepted() -> None:
    assert parse(b"\xef\xbb\xbf" + orjson.dumps(PATIENT)).message_type == "Patient"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12) | st.sampled_from(["Patient", "Bundle", "Observation", "resourceType", "transaction"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["resourceType", "id", "type", "entry", "resource", "name", "given", "meta"])
        | st.text(max_size=6), inner, max_size=5),
    max_leaves=20)
_PATHS = [compile_path(e) for e in (
    "Patient.name.given", "Bundle.entry.resource.id", "Patient.name.where(use = 'x')", "id[*] | name.given[*]",
    "Patient.id.replace('a', 'b')", "Observation.code.first()")]


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json.map(lambda v: orjson.dumps(v)), st.binary(max_size=200)))
def test_arbitrary_input_parses_or_raises_parse_error_only(raw: bytes) -> None:
    try:
        parsed = parse(raw)
    except ParseError as exc:
        assert exc.stage == "parse"
        return
    assert isinstance(parsed.message_type, str)
    assert parsed.message_id is None or isinstance(parsed.message_id, str)
    parsed.occurred_at()
    for path in _PATHS:
        assert isinstance(path.read(parsed), list)


# -- each -------------------------------------------------------------------------------------


BP = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"code": "85354-9"}]},
      "component": [{"code": {"coding": [{"code": "8480-6"}]}, "valueQuantity": {"value": 128, "unit": "mmHg"}},
                    {"code": {"coding": [{"code": "8462-4"}]}, "valueQuantity": {"value": 84, "unit": "mmHg"}}]}


def test_each_yields_one_document_per_element_with_relative_and_enclosing_paths() -> None:
    fmt = get_format("fhir")
    fmt.each_scope("Observation.component")
    items = fmt.each(doc(BP), "Observation.component")
    assert [compile_path("code.coding.first().code").read(i) for i in items] == [["8480-6"], ["8462-4"]]
    assert [compile_path("valueQuantity.value").read(i) for i in items] == [[128], [84]]
    assert compile_path("Observation.status").read(items[0]) == ["final"]  # the enclosing resource
    union = fmt.each(doc(BP), "Observation | Observation.component")
    assert [compile_path("code.coding.code").read(i) for i in union] == [["85354-9"], ["8480-6"], ["8462-4"]]
    with pytest.raises(ValueError, match="not supported"):
        fmt.each_scope("Observation.component.exists()")


def test_each_over_bundle_entries_scopes_paths_to_each_resource() -> None:
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": {**PATIENT, "id": "a"}}, {"resource": {**PATIENT, "id": "b"}}]}
    items = get_format("fhir").each(doc(bundle), "Bundle.entry.resource")
    assert [compile_path("Patient.id").read(i) for i in items] == [["a"], ["b"]]


# -- strict validation ------------------------------------------------------------------------


def test_strict_validation_passes_valid_resources() -> None:
    check_structure(doc(PATIENT))
    for sample in sorted(SAMPLES.glob("*.json")):
        if not sample.name.startswith("malformed"):
            check_structure(parse(sample.read_bytes()))


def test_strict_validation_names_elements_but_never_values() -> None:
    bad = {**PATIENT, "birthDate": "SECRET-DATE", "gender": 12345, "name": [{"family": ["SECRET"]}]}
    with pytest.raises(ParseError) as caught:
        check_structure(doc(bad))
    message = str(caught.value)
    assert "does not conform to FHIR R4 Patient" in message
    assert "birthDate" in message and "gender" in message and "name[0].family" in message
    assert "SECRET" not in message and "12345" not in message


def test_strict_validation_reports_unknown_elements_by_name() -> None:
    with pytest.raises(ParseError, match=r"shoeSize \(extra_forbidden\)"):
        check_structure(doc({**PATIENT, "shoeSize": 44}))


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {})


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Project:
    root = tmp_path_factory.mktemp("strict-fhir")
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, root / folder)
    path = root / "routes" / "fhir-inbound.yaml"
    path.write_text(path.read_text().replace("\nsource:", "\nvalidation: strict\nsource:", 1))
    return load_project(root, {})


def test_strict_route_rejects_at_parse_what_the_lenient_route_maps(project: Project, strict: Project) -> None:
    raw = json.loads((SAMPLES / "patient-registered.json").read_text())
    raw["active"] = "SECRET-not-a-boolean"
    body = json.dumps(raw).encode()
    assert transform(project.routes["fhir-inbound"], body).events
    with pytest.raises(ParseError, match=r"active \(bool_parsing\)") as caught:
        transform(strict.routes["fhir-inbound"], body)
    assert "SECRET" not in str(caught.value)
    assert transform(strict.routes["fhir-inbound"], (SAMPLES / "patient-registered.json").read_bytes()).events


# -- the shipped route ------------------------------------------------------------------------


def events(project: Project, sample: str | bytes) -> list[dict[str, Any]]:
    raw = sample if isinstance(sample, bytes) else (SAMPLES / sample).read_bytes()
    return transform(project.routes["fhir-inbound"], raw).events


def test_patient_becomes_patient_registered(project: Project) -> None:
    [event] = events(project, "patient-registered.json")
    assert event["type"] == "patient.registered.v1" and event["subject"] == "Patient/MRN-5820"
    assert event["time"] == "2026-11-24T09:12:00+01:00"  # meta.lastUpdated
    assert event["data"]["patient"] == {
        "mrn": "MRN-5820",  # the identifier typed MR, not the first one
        "name": {"family": "Testperson", "given": "Ada", "middle": "Maria", "prefix": "Dr."},
        "birth_date": "1984-03-17", "sex": "female", "phone": "+49 30 5550123",
        "address": {"line": "Beispielstrasse 12", "city": "Berlin", "postal_code": "10115", "country": "DE"}}


def test_patient_without_mr_identifier_uses_the_first(project: Project) -> None:
    raw = json.loads((SAMPLES / "patient-registered.json").read_text())
    raw["identifier"] = [{"value": "X-1"}, {"value": "X-2"}]
    [event] = events(project, json.dumps(raw).encode())
    assert event["data"]["patient"]["mrn"] == "X-1"


def test_appointment_becomes_appointment_booked(project: Project) -> None:
    [event] = events(project, "appointment-booked.json")
    assert event["type"] == "appointment.booked.v1" and event["subject"] == "Appointment/APT-2207"
    assert event["time"] == "2026-11-24T10:04:12+01:00"  # Appointment.created: when it was booked
    appointment = event["data"]["appointment"]
    assert (appointment["id"], appointment["start"], appointment["end"], appointment["status"]) == (
        "APT-2207", "2026-12-02T14:30:00+01:00", "2026-12-02T15:00:00+01:00", "booked")
    assert appointment["duration"] == 30 and appointment["location"] == "Cardiology clinic room 2"
    assert appointment["providers"] == [{"id": "DOC-77"}]
    assert event["data"]["patient"] == {"mrn": "MRN-5820"}


def test_appointment_patient_from_the_reference_when_no_identifier(project: Project) -> None:
    raw = json.loads((SAMPLES / "appointment-booked.json").read_text())
    del raw["participant"][0]["actor"]["identifier"]
    [event] = events(project, json.dumps(raw).encode())
    assert event["data"]["patient"]["mrn"] == "pat-5820"


def test_observation_becomes_result_reported(project: Project) -> None:
    [event] = events(project, "observation-potassium.json")
    assert event["type"] == "result.reported.v1" and event["subject"] == "Patient/MRN-5820"
    assert event["time"] == "2026-11-24T08:55:00+01:00"  # effectiveDateTime
    assert event["data"]["order"] == {"id": "ORD-3301"}
    assert event["data"]["observations"] == [{
        "code": "2823-3", "name": "Potassium", "coding_system": "http://loinc.org", "value": "5.9",
        "unit": "mmol/L", "reference_range": "3.5-5.1 mmol/L", "abnormal_flag": "H", "status": "final",
        "observed_at": "2026-11-24T08:55:00+01:00", "notes": ["Sample slightly haemolysed"]}]


def test_observation_components_become_items_with_the_observation_status(project: Project) -> None:
    [event] = events(project, "observation-blood-pressure.json")
    assert event["data"]["patient"]["mrn"] == "MRN-5820"  # from subject.reference
    assert [(o["code"], o.get("value"), o.get("unit"), o["status"]) for o in event["data"]["observations"]] == [
        ("85354-9", None, None, "final"), ("8480-6", "128", "mmHg", "final"), ("8462-4", "84", "mmHg", "final")]


def test_observation_coded_and_string_values(project: Project) -> None:
    raw = json.loads((SAMPLES / "observation-potassium.json").read_text())
    del raw["valueQuantity"]
    raw["valueCodeableConcept"] = {"coding": [{"code": "260385009"}], "text": "Negative"}
    [event] = events(project, json.dumps(raw).encode())
    assert event["data"]["observations"][0]["value"] == "260385009"
    del raw["valueCodeableConcept"]
    raw["valueString"] = "see report"
    [event] = events(project, json.dumps(raw).encode())
    assert event["data"]["observations"][0]["value"] == "see report"


def test_service_request_becomes_order_placed(project: Project) -> None:
    [event] = events(project, "servicerequest-order.json")
    assert event["type"] == "order.placed.v1" and event["subject"] == "Order/ORD-3301"
    order = event["data"]["order"]
    assert (order["id"], order["filler_id"], order["code"], order["priority"], order["ordered_at"]) == (
        "ORD-3301", "LAB-3301", "24326-1", "urgent", "2026-11-24T08:40:00+01:00")
    assert event["data"]["patient"] == {"mrn": "MRN-5820"}


def test_service_request_without_identifier_uses_its_id(project: Project) -> None:
    raw = json.loads((SAMPLES / "servicerequest-order.json").read_text())
    del raw["identifier"]
    [event] = events(project, json.dumps(raw).encode())
    assert event["data"]["order"]["id"] == "sr-3301"


def test_malformed_sample_fails_at_parse(project: Project) -> None:
    with pytest.raises(ParseError, match="no resourceType") as caught:
        events(project, "malformed-no-resourcetype.json")
    assert caught.value.route == "fhir-inbound" and "broken-1" not in str(caught.value)


def test_other_resource_types_are_filtered_and_bundles_dead_lettered(project: Project) -> None:
    route = project.routes["fhir-inbound"]
    assert transform(route, b'{"resourceType": "Encounter", "id": "e1"}').filtered
    with pytest.raises(FilterError, match="FHIR Bundle of type batch"):  # never dropped silently (issue 8)
        transform(route, b'{"resourceType": "Bundle", "type": "batch"}')


def test_missing_mrn_is_a_mapping_error(project: Project) -> None:
    raw = json.loads((SAMPLES / "servicerequest-order.json").read_text())
    del raw["subject"]
    with pytest.raises(MappingError, match=r"patient\.mrn: required value missing"):
        events(project, json.dumps(raw).encode())


# -- references and text (issue 8, point 7) ----------------------------------------------------

MR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}
OBS_BUNDLE: dict[str, Any] = {
    "resourceType": "Bundle", "id": "b-1", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:0c3a9a41-7f55-4b8e-9d0e-5d0f3c1b2a01",
         "resource": {"resourceType": "Patient", "id": "p-1",
                      "identifier": [{"value": "SSN-1"}, {"type": MR, "value": "MRN-URN"}]}},
        {"fullUrl": "https://ehr.example.org/fhir/Patient/77662",
         "resource": {"resourceType": "Patient", "id": "77662", "identifier": [{"value": "MRN-ABS"}]}},
        {"fullUrl": "urn:uuid:0c3a9a41-7f55-4b8e-9d0e-5d0f3c1b2a03",
         "resource": {"resourceType": "Observation", "id": "o-1", "status": "final",
                      "subject": {"reference": "urn:uuid:0c3a9a41-7f55-4b8e-9d0e-5d0f3c1b2a01"}}},
        {"resource": {"resourceType": "Observation", "id": "o-2", "status": "final",
                      "subject": {"reference": "https://ehr.example.org/fhir/Patient/77662/_history/3"}}},
        {"resource": {"resourceType": "Observation", "id": "o-3", "status": "final",
                      "subject": {"reference": "Patient/77662"}}},
        {"resource": {"resourceType": "Observation", "id": "o-4", "status": "final",
                      "subject": {"reference": "https://other.example.org/fhir/Patient/77662"}}},
    ]}


def entry_reads(expr: str) -> list[list[Any]]:
    """``expr`` read in each Observation entry of OBS_BUNDLE (as ``each: Bundle.entry.resource`` does)."""
    fmt = get_format("fhir")
    items = fmt.each(doc(OBS_BUNDLE), "Bundle.entry.resource.where(resourceType = 'Observation')")
    return [compile_path(expr).read(item) for item in items]


def test_resolve_finds_bundle_entries_by_urn_absolute_url_and_relative_reference() -> None:
    assert entry_reads("Observation.subject.resolve().id") == [["p-1"], ["77662"], ["77662"], []]
    # an absolute URL of another server is another resource: not resolved by type and id
    assert entry_reads("Observation.subject.resolve().identifier.where(type.coding.code = 'MR').value") == [
        ["MRN-URN"], [], [], []]


def test_resolve_finds_contained_resources_and_nothing_outside_the_message() -> None:
    obs = {"resourceType": "Observation", "status": "final", "subject": {"reference": "#p1"},
           "performer": [{"reference": "#"}, {"reference": "Practitioner/9"}],
           "contained": [{"resourceType": "Device", "id": "d1"},
                         {"resourceType": "Patient", "id": "p1", "identifier": [{"type": MR, "value": "MRN-C"}]}]}
    assert read("Observation.subject.resolve().identifier.value", obs) == ["MRN-C"]
    assert read("Observation.performer.resolve().status", obs) == ["final"]  # "#": the container itself
    assert read("Observation.performer[1].resolve()", obs) == []  # not in the message
    # inside each: (a component) the contained resource is found in the enclosing resource
    obs["component"] = [{"code": {"text": "x"}, "valueString": "#p1"}]
    [item] = get_format("fhir").each(doc(obs), "Observation.component")
    assert compile_path("valueString.resolve().id").read(item) == ["p1"]


@pytest.mark.parametrize(("reference", "expr", "expected"), [
    ("Patient/77662", "getReferenceKey(Patient)", ["77662"]),
    ("Patient/77662/_history/2", "getReferenceKey(Patient)", ["77662"]),
    ("https://ehr.example.org/fhir/R4/Patient/A-9.1/_history/2", "getReferenceKey(Patient)", ["A-9.1"]),
    ("http://x.example/Patient/77662", "getReferenceKey('Patient')", ["77662"]),
    ("Group/77662", "getReferenceKey(Patient)", []),
    ("Group/77662", "getReferenceKey()", ["77662"]),
    ("#p1", "getReferenceKey()", []),  # a contained id is local to its container
    ("urn:uuid:1b9e3c52-0000-4000-8000-000000000001", "getReferenceKey()", []),  # no Bundle to look in
    ("Banana/1", "getReferenceKey()", []),  # not a resource type
    ("https://ehr.example.org/fhir/Patient/", "getReferenceKey(Patient)", []),
])
def test_get_reference_key_reads_the_id_of_literal_references(reference: str, expr: str,
                                                              expected: list[str]) -> None:
    obs = {"resourceType": "Observation", "subject": {"reference": reference}}
    assert read(f"Observation.subject.{expr}", obs) == expected
    assert read(f"Observation.subject.reference.{expr}", obs) == expected  # on the string as well


def test_get_reference_key_of_a_urn_in_a_bundle_is_the_entry_resource_id() -> None:
    assert entry_reads("Observation.subject.getReferenceKey(Patient)") == [["p-1"], ["77662"], ["77662"], ["77662"]]


def test_where_tests_a_path_with_functions_and_exists() -> None:
    appt = {"resourceType": "Appointment", "participant": [
        {"actor": {"reference": "https://ehr.example.org/fhir/Practitioner/DOC-1", "display": "Dr A"}},
        {"actor": {"reference": "Patient/P-1", "display": "Pat"}},
        {"actor": {"display": "no reference"}}]}
    assert read("Appointment.participant.actor.where(getReferenceKey(Patient).exists()).display", appt) == ["Pat"]
    assert read("Appointment.participant.actor.where(reference.exists()).display", appt) == ["Dr A", "Pat"]
    assert read("Appointment.participant.actor.where(getReferenceKey() = 'DOC-1').display", appt) == ["Dr A"]
    assert read("Appointment.participant.where(actor.where(display = 'Pat').exists()).actor.reference",
                appt) == ["Patient/P-1"]


def observation(**fields: Any) -> bytes:
    base: dict[str, Any] = {"resourceType": "Observation", "id": "o-9", "status": "final",
                            "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]},
                            "subject": {"reference": "Patient/77662"}}
    base.update(fields)
    return orjson.dumps(base)


@pytest.mark.parametrize(("subject", "extra", "mrn"), [
    ({"reference": "https://ehr.example.org/fhir/Patient/77662"}, {}, "77662"),
    ({"reference": "https://ehr.example.org/fhir/Patient/77662/_history/4"}, {}, "77662"),
    ({"reference": "Patient/77662"}, {}, "77662"),
    ({"reference": "Group/G1"}, {}, None),  # not a patient: no MRN, a clean mapping error
    ({"reference": "Patient/77662", "identifier": {"type": MR, "value": "MRN-REF"}}, {}, "MRN-REF"),
    ({"reference": "#p1"}, {"contained": [{"resourceType": "Patient", "id": "p1", "identifier": [
        {"system": "urn:oid:2.16.840.1.113883.4.1", "value": "SSN-1"}, {"type": MR, "value": "MRN-C"}]}]}, "MRN-C"),
    ({"reference": "#p1"}, {"contained": [{"resourceType": "Patient", "id": "p1",
                                           "identifier": [{"value": "FIRST-1"}]}]}, "FIRST-1"),
    ({"reference": "#p1"}, {"contained": [{"resourceType": "Patient", "id": "p1"}]}, None),  # "p1" is no MRN
])
def test_observation_patient_mrn_prefers_mr_identifiers_then_the_reference_id(
        project: Project, subject: dict[str, Any], extra: dict[str, Any], mrn: str | None) -> None:
    raw = observation(subject=subject, **extra)
    if mrn is None:
        with pytest.raises(MappingError, match=r"patient\.mrn: required value missing"):
            events(project, raw)
    else:
        [event] = events(project, raw)
        assert event["data"]["patient"]["mrn"] == mrn and event["subject"] == f"Patient/{mrn}"


def test_service_request_and_appointment_resolve_absolute_and_contained_references(project: Project) -> None:
    sr = {"resourceType": "ServiceRequest", "id": "sr-1", "status": "active", "intent": "order",
          "code": {"text": "Echocardiogram"}, "subject": {"reference": "http://ehr.example.org/Patient/P-44"},
          "requester": {"reference": "#dr"},
          "contained": [{"resourceType": "Practitioner", "id": "dr", "identifier": [{"value": "NPI-1"}]}]}
    [event] = events(project, orjson.dumps(sr))
    assert event["data"]["patient"] == {"mrn": "P-44"}
    assert event["data"]["order"] == {"id": "sr-1", "code": "Echocardiogram", "name": "Echocardiogram",
                                      "status": "active", "ordering_provider": "NPI-1"}
    appt = {"resourceType": "Appointment", "id": "a-1", "status": "booked", "participant": [
        {"actor": {"reference": "https://ehr.example.org/fhir/Practitioner/DOC-9"}, "status": "accepted"},
        {"actor": {"reference": "#pat"}, "status": "accepted"},
        {"actor": {"reference": "https://ehr.example.org/fhir/Location/L-2", "display": "Room 2"},
         "status": "accepted"}],
        "contained": [{"resourceType": "Patient", "id": "pat", "identifier": [{"type": MR, "value": "MRN-A"}]}]}
    [event] = events(project, orjson.dumps(appt))
    assert event["data"] == {"appointment": {"id": "a-1", "status": "booked", "location": "Room 2",
                                             "providers": [{"id": "DOC-9"}]}, "patient": {"mrn": "MRN-A"}}


def test_code_text_is_the_fallback_when_there_is_no_coding(project: Project) -> None:
    [event] = events(project, observation(code={"text": "Body weight"}, valueQuantity={"value": 72.5, "unit": "kg"}))
    assert event["data"]["observations"] == [{"code": "Body weight", "name": "Body weight", "value": "72.5",
                                              "unit": "kg", "status": "final"}]
    # a coding without a code does not hide the next coding's code, system and display
    codings = [{"display": "K"}, {"system": "http://loinc.org", "code": "6298-4", "display": "Potassium"}]
    [event] = events(project, observation(code={"coding": codings}))
    item = event["data"]["observations"][0]
    assert (item["code"], item["coding_system"], item["name"]) == ("6298-4", "http://loinc.org", "Potassium")


def test_name_text_is_kept_when_there_is_no_family_or_given(project: Project) -> None:
    raw = {"resourceType": "Patient", "id": "p-t", "identifier": [{"value": "MRN-T"}],
           "name": [{"use": "usual", "text": "Baby Girl Okafor"}]}
    [event] = events(project, orjson.dumps(raw))
    assert event["data"]["patient"] == {"mrn": "MRN-T", "name": {"text": "Baby Girl Okafor"}}


def test_abnormal_flag_prefers_the_v3_observation_interpretation_coding(project: Project) -> None:
    v3 = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
    interpretation = [{"coding": [{"system": "http://acme.example/flags", "code": "HIGH"},
                                  {"system": v3, "code": "H", "display": "High"}], "text": "above range"}]
    [event] = events(project, observation(interpretation=interpretation))
    assert event["data"]["observations"][0]["abnormal_flag"] == "H"
    interpretation[0]["coding"] = [{"system": "http://acme.example/flags", "code": "HIGH"}]
    [event] = events(project, observation(interpretation=interpretation))
    assert event["data"]["observations"][0]["abnormal_flag"] == "HIGH"
    del interpretation[0]["coding"]
    [event] = events(project, observation(interpretation=interpretation))
    assert event["data"]["observations"][0]["abnormal_flag"] == "above range"


def test_corpus_bundles_references_resolve_and_every_entry_maps_alone(project: Project, corpus: Path) -> None:
    """The FHIR-Converter bundles (../shared/corpus): every Observation's subject resolves to its Patient
    entry (urn:uuid), and each entry sent alone (as the HTTP ingest will split them) gives its event or
    is filtered, never an error."""
    route, fhir = project.routes["fhir-inbound"], get_format("fhir")
    resolved = produced = 0
    for path in sorted(corpus.glob("fhir/fhir-converter-r4/*.json")):
        raw = path.read_bytes()
        try:
            bundle = parse(raw)
        except ParseError:
            continue  # (one file is a Bundle of another type: refused at parse, tested by the corpus sweep)
        for item in fhir.each(bundle, "Bundle.entry.resource.where(resourceType = 'Observation')"):
            assert compile_path("Observation.subject.resolve().resourceType").read(item) == ["Patient"], path.name
            resolved += 1
        for resource in bundle.root.get("entry", []):
            outcome = transform(route, orjson.dumps(resource["resource"]))
            produced += len(outcome.events)
    assert resolved > 100 and produced > 200
