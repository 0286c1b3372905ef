"""Per-delivery ``when:`` and outbound ``map:`` (middleware.delivery.outbound): compiled from route YAML
with file:line problems, applied by the delivery worker (skipped events acked and counted, a failing map
dead-lettered)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from middleware.delivery.outbound import Outbound, compile_map, compile_when
from middleware.errors import MappingError
from middleware.formats.json_format import JsonDocument
from middleware.mapping import SpecError
from middleware.project import check_project
from tests.project_copy import copy_project

ADMITTED: dict[str, Any] = {
    "specversion": "1.0", "id": "e-1", "type": "patient.admitted.v1", "source": "urn:middleware:route:adt-inbound",
    "subject": "Patient/MRN-1", "correlationid": "c-1",
    "data": {"patient": {"mrn": "MRN-1", "name": {"family": "Doe", "given": "Jane"}, "birth_date": "1974-05-03"},
             "encounter": {"visit_number": "V1", "class": "inpatient", "location": {"bed": "B"}}},
}


def doc(event: dict[str, Any]) -> JsonDocument:
    return JsonDocument(event)


@pytest.mark.parametrize(("types", "matches"), [
    ("patient.admitted", True), ("patient.admitted.v1", True), ("patient.admitted.v2", False),
    (["patient.discharged", "patient.admitted"], True), ("patient.*", True), ("order.placed", False),
    ("patient", False),
])
def test_when_type_matches_every_major_a_major_a_list_or_a_family(types: Any, matches: bool) -> None:
    assert compile_when({"type": types}).matches(doc(ADMITTED)) is matches


def test_when_data_conditions_use_the_filter_condition_keys_over_the_event() -> None:
    inpatient = compile_when({"type": "patient.admitted", "equals": {"data.encounter.class": ["inpatient", "x"]}})
    outpatient = compile_when({"equals": {"data.encounter.class": "outpatient"}})
    with_bed = compile_when({"exists": "data.encounter.location.bed", "missing": "data.merged_mrn"})
    without_bed = compile_when({"missing": "data.encounter.location.bed"})
    assert inpatient.matches(doc(ADMITTED)) and with_bed.matches(doc(ADMITTED))
    assert not outpatient.matches(doc(ADMITTED)) and not without_bed.matches(doc(ADMITTED))


def test_when_takes_the_route_conditions_expr_over_the_event() -> None:
    inpatient = compile_when({"type": "patient.*", "expr": "path('data.encounter.class') == 'inpatient'"})
    assert inpatient.matches(doc(ADMITTED))
    assert not inpatient.matches(doc({**ADMITTED, "data": {"encounter": {"class": "outpatient"}}}))


@pytest.mark.parametrize(("spec", "key", "words"), [
    ({"message_type": "ADT^A01"}, "message_type", "use type:"),
    ({"typ": "patient.admitted"}, "typ", "unknown condition 'typ'"),
    ({"type": []}, "type", "event type or a list"),
    ({"equals": {"data..x": "1"}}, "equals", "invalid JSON path"),
    ({}, None, "a mapping with type"),
])
def test_bad_when_names_its_key(spec: Any, key: str | None, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        compile_when(spec)
    assert caught.value.key == key and words in str(caught.value)


def test_outbound_map_builds_the_outgoing_document_from_event_paths() -> None:
    mapping = compile_map({"mrn": "data.patient.mrn", "name": {"template": "{data.patient.name.given} "
                                                                           "{data.patient.name.family}"},
                           "kind": {"value": "admission"}, "event.id": "id", "born": {"path": "data.patient.birth_date",
                                                                                      "as": "date"},
                           "room": {"path": "data.encounter.location.room", "default": "none"}})
    assert mapping.apply(ADMITTED) == {"mrn": "MRN-1", "name": "Jane Doe", "kind": "admission",
                                       "event": {"id": "e-1"}, "born": "1974-05-03", "room": "none"}


def test_indexed_targets_build_lists_in_index_order() -> None:
    mapping = compile_map({"identifier[1].value": "id", "identifier[0].system": {"value": "urn:mrn"},
                           "identifier[0].value": "data.patient.mrn", "name[0].given[0]": "data.patient.name.given",
                           "name[0].given[2]": "data.patient.name.middle",
                           "name[0].family": "data.patient.name.family"})
    assert mapping.apply(ADMITTED) == {"identifier": [{"system": "urn:mrn", "value": "MRN-1"}, {"value": "e-1"}],
                                       "name": [{"given": ["Jane"], "family": "Doe"}]}


def test_bad_map_names_its_target() -> None:
    with pytest.raises(SpecError) as caught:
        compile_map({"mrn": {"path": "data.patient.mrn", "as": "number"}})
    assert caught.value.key == "mrn" and "unknown type 'number'" in str(caught.value)


def test_prepare_skips_maps_or_passes_the_event_through() -> None:
    body = orjson.dumps(ADMITTED)
    assert Outbound(when=compile_when({"type": "order.placed"})).prepare(body) is None
    assert Outbound(when=compile_when({"type": "patient.admitted"})).prepare(body) == (body, "")
    mapped = Outbound(map=compile_map({"mrn": "data.patient.mrn"})).prepare(body)
    assert mapped == (b'{"mrn":"MRN-1"}', "application/json")


def test_prepare_raises_a_mapping_error_for_a_required_value_or_a_body_that_is_no_event() -> None:
    outbound = Outbound(map=compile_map({"visit": {"path": "data.encounter.discharged_at", "required": True}}))
    with pytest.raises(MappingError, match="visit: required value missing"):
        outbound.prepare(orjson.dumps(ADMITTED))
    with pytest.raises(MappingError, match="not a JSON CloudEvent"):
        outbound.prepare(b"MSH|^~\\&|")


# -- route YAML --------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path)


def set_deliver(project: Path, deliver: str) -> Path:
    route = project / "routes" / "adt-inbound.yaml"
    text = route.read_text()
    start = text.index("\ndeliver:")
    route.write_text(text[:start] + "\ndeliver:\n" + deliver)
    return route


def test_route_yaml_when_and_map_compile_onto_the_delivery_rule(project: Path) -> None:
    set_deliver(project, "  - to: bed-board\n    when: {type: patient.admitted}\n"
                         "    map: {mrn: data.patient.mrn, bed: data.encounter.location.bed}\n"
                         "  - to: event-archive\n")
    loaded, problems = check_project(project, {})
    assert problems == [] and loaded is not None
    bed_board, archive = loaded.routes["adt-inbound"].deliver
    assert archive.outbound is None
    assert bed_board.outbound is not None and bed_board.outbound.when is not None
    assert bed_board.outbound.prepare(orjson.dumps(ADMITTED)) == (b'{"mrn":"MRN-1","bed":"B"}', "application/json")


def deliver_line(route: Path, needle: str) -> int:
    lines = route.read_text().splitlines()
    start = lines.index("deliver:")
    return next(n for n, line in enumerate(lines[start:], start + 1) if needle in line)


def test_route_yaml_bad_when_and_map_are_reported_at_their_lines(project: Path) -> None:
    route = set_deliver(project, "  - to: bed-board\n    when:\n      message_type: ADT^A01\n"
                                 "    map:\n      mrn: {path: data.patient.mrn, lookup: nope}\n")
    _, problems = check_project(project, {})
    assert [str(p) for p in problems] == [
        f"routes/adt-inbound.yaml:{deliver_line(route, 'message_type')}: when: a delivery sees events, not messages: "
        "use type: (an event type such as patient.admitted)",
        f"routes/adt-inbound.yaml:{deliver_line(route, 'mrn:')}: map: mrn: no lookup table 'nope' in config/lookups/ "
        "(known: patient_class, sex)"]


def test_route_yaml_when_of_the_wrong_shape_is_a_schema_problem(project: Path) -> None:
    route = set_deliver(project, "  - to: event-archive\n    when: []\n")
    _, problems = check_project(project, {})
    assert [str(p) for p in problems] == [
        f"routes/adt-inbound.yaml:{deliver_line(route, 'when')}: deliver.0.when: expected object, got list"]
