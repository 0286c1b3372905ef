"""The shipped routes beyond ADT admissions: transfers, cancellations, orders, results, scheduling."""

from __future__ import annotations

from pathlib import Path

import pytest

from middleware.errors import MappingError, PipelineError
from middleware.project import Project, load_project
from middleware.route import transform

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {})


def events(project: Project, route: str, sample: str | bytes) -> list[dict]:
    raw = sample if isinstance(sample, bytes) else (SAMPLES / route / sample).read_bytes()
    return transform(project.routes[route], raw).events


def test_a02_is_a_transfer_with_new_and_prior_location(project: Project) -> None:
    [event] = events(project, "adt-inbound", "a02-transfer.hl7")
    assert event["type"] == "patient.transferred.v1"
    encounter = event["data"]["encounter"]
    assert encounter["location"] == {"point_of_care": "ICU1", "room": "0003", "bed": "A", "facility": "GHH"}
    assert encounter["prior_location"] == {"point_of_care": "WARD7", "room": "0712", "bed": "B", "facility": "GHH"}
    assert encounter["transferred_at"] == "2026-11-24T12:00:00+01:00"  # EVN-6 (occurred) wins over EVN-2


def test_a11_and_a13_are_cancellations_of_their_own(project: Project) -> None:
    [cancel_admit] = events(project, "adt-inbound", "a11-cancel-admit.hl7")
    [cancel_discharge] = events(project, "adt-inbound", "a13-cancel-discharge.hl7")
    assert cancel_admit["type"] == "patient.admission_cancelled.v1"
    assert cancel_discharge["type"] == "patient.discharge_cancelled.v1"
    assert cancel_admit["data"]["encounter"]["visit_number"] == "V-9001"
    assert cancel_discharge["data"]["cancelled_at"] == "2026-11-24T17:15:00+01:00"
    assert cancel_admit["id"] != cancel_discharge["id"]


def test_orm_and_oml_become_order_placed(project: Project) -> None:
    [orm] = events(project, "orders-inbound", "orm-o01-lipid-panel.hl7")
    assert orm["type"] == "order.placed.v1" and orm["subject"] == "Order/ORD-1001"
    order = orm["data"]["order"]
    assert (order["id"], order["code"], order["ordered_at"]) == ("ORD-1001", "24331-1", "2026-11-24T08:55:00+01:00")
    assert [t["code"] for t in order["tests"]] == ["24331-1", "4548-4"]  # one item per OBR
    assert orm["data"]["patient"]["mrn"] == "MRN-4711"
    [oml] = events(project, "orders-inbound", "oml-o21-blood-culture.hl7")
    assert oml["data"]["order"]["priority"] == "S"  # TQ1-9 (v2.5) before OBR-5


def test_order_cancel_is_filtered_not_dead_lettered(project: Project) -> None:
    outcome = transform(project.routes["orders-inbound"], (SAMPLES / "orders-inbound" / "orm-o01-cancel.hl7")
                        .read_bytes())
    assert outcome.filtered and outcome.message_type == "ORM^O01"


def test_oru_gives_one_observation_per_obx_with_its_own_notes(project: Project) -> None:
    [event] = events(project, "results-inbound", "oru-r01-lipid-panel.hl7")
    assert event["type"] == "result.reported.v1"
    observations = event["data"]["observations"]
    assert [(o["code"], o["value"], o.get("unit"), o["status"]) for o in observations] == [
        ("2093-3", 196, "mg/dL", "F"), ("2571-8", 162, "mg/dL", "F"), ("2085-9", 48, "mg/dL", "P")]
    assert [o.get("notes") for o in observations] == [
        None, ["Patient was not fasting\nrepeat fasting if clinically indicated"], None]
    assert event["data"]["order"] == {"id": "ORD-1001", "filler_id": "LAB-77", "code": "24331-1",
                                      "name": "Lipid panel"}


def test_oru_without_obx_still_reports_its_order(project: Project) -> None:
    """OBX is optional in ORU_R01 (a status update of the order): only identifiers are required."""
    raw = b"\r".join(line for line in (SAMPLES / "results-inbound" / "oru-r01-lipid-panel.hl7").read_bytes()
                     .split(b"\r") if not line.startswith((b"OBX", b"NTE")))
    [event] = events(project, "results-inbound", raw)
    assert "observations" not in event["data"] and event["data"]["order"]["id"] == "ORD-1001"


def test_oru_without_obr_is_a_mapping_error_naming_the_group(project: Project) -> None:
    raw = b"\r".join(line for line in (SAMPLES / "results-inbound" / "oru-r01-lipid-panel.hl7").read_bytes()
                     .split(b"\r") if not line.startswith((b"OBR", b"ORC")))
    with pytest.raises(MappingError, match=r"no OBR in the message \(for_each: OBR\)"):
        events(project, "results-inbound", raw)


def test_bad_obx_value_names_the_item(project: Project) -> None:
    raw = (SAMPLES / "results-inbound" / "oru-r01-lipid-panel.hl7").read_bytes().replace(
        b"|||P|||20261124100000+0100", b"|||P|||2026-13-45")
    with pytest.raises(MappingError, match=r"OBR\[1\] observations\[3\]\.observed_at"):
        events(project, "results-inbound", raw)


def test_siu_s12_becomes_appointment_booked(project: Project) -> None:
    [event] = events(project, "scheduling-inbound", "siu-s12-cardiology.hl7")
    appointment = event["data"]["appointment"]
    assert event["type"] == "appointment.booked.v1" and event["subject"] == "Appointment/APT-5001"
    assert appointment["start"] == "2026-12-01T09:30:00+01:00"
    assert appointment["duration"] == 30
    assert appointment["providers"] == [{"id": "8812", "family": "Quinn", "given": "Michaela", "role": "CARD",
                                         "start": "2026-12-01T09:30:00+01:00"}]
    assert appointment["services"] == [{"code": "93000", "name": "ECG", "coding_system": "CPT",
                                        "start": "2026-12-01T09:30:00+01:00", "duration": 30, "duration_unit": "min"}]
    assert appointment["locations"] == [{"point_of_care": "CARD1", "facility": "GHH",
                                         "start": "2026-12-01T09:30:00+01:00"}]


EXPECTED = {  # adt-inbound has its per-file corpus test in test_adt_route.py
    "orders-inbound": {"ORM^O01": "order.placed.v1", "OML^O21": "order.placed.v1"},
    "results-inbound": {"ORU^R01": "result.reported.v1"},
    "scheduling-inbound": {"SIU^S12": "appointment.booked.v1"},
}


@pytest.mark.parametrize("route", sorted(EXPECTED))
def test_every_corpus_file_through_every_route(project: Project, route: str, corpus: Path) -> None:
    """Each corpus file gives its route's event, is filtered, or fails with a typed error."""
    corpus_files = sorted(corpus.glob("hl7v2/fhir-converter/*.hl7"))
    assert len(corpus_files) > 100
    produced = 0
    for path in corpus_files:
        try:
            outcome = transform(project.routes[route], path.read_bytes())
        except PipelineError as exc:
            assert exc.stage in {"parse", "map", "validate"} and exc.route == route, path.name
            continue
        if outcome.filtered:
            continue
        assert outcome.events, path.name
        assert {e["type"] for e in outcome.events} == {EXPECTED[route][outcome.message_type]}, path.name
        assert len({e["id"] for e in outcome.events}) == len(outcome.events), path.name  # one id per group
        produced += 1
    assert produced >= 3  # the corpus has at least a few messages of every kind each route handles
