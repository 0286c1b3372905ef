"""Old versions and containers are matched or dead-lettered, never silently filtered; SIU times and
resources; order priority; only identifiers required by the catalogue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from middleware.errors import FilterError
from middleware.formats.hl7v2 import parse
from middleware.project import Project, load_project
from middleware.route import transform

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {})


def hl7(*segments: str) -> bytes:
    return "\r".join(segments).encode()


def test_implied_message_type_of_old_versions() -> None:
    assert parse(hl7("MSH|^~\\&|A|B|C|D|199001011200||ORU|1|P|2.1")).implied_message_type == "ORU^R01"
    assert parse(hl7("MSH|^~\\&|A|B|C|D|199001011200||ADT|1|P|2.2", "EVN|A03|199001011200")
                 ).implied_message_type == "ADT^A03"  # v2.1/2.2 put the trigger in EVN-1
    assert parse(hl7("MSH|^~\\&|A|B|C|D|199001011200||ADT|1|P|2.2")).implied_message_type is None
    assert parse(hl7("MSH|^~\\&|A|B|C|D|199001011200||ORU^R01|1|P|2.5")).implied_message_type is None


def test_v21_oru_without_trigger_is_reported(project: Project) -> None:
    raw = hl7("MSH|^~\\&|LAB|OLDHOSP|HIS|OLDHOSP|199105061200||ORU|OLD-1|P|2.1",
              "PID|||OH-42||Brandt^Hans||19400101|M", "OBR|1|OP-1||GLU^Glucose^L|||199105061100",
              "OBX|1|NM|GLU^Glucose^L||5.5|mmol/L|||||F")
    outcome = transform(project.routes["results-inbound"], raw)
    assert not outcome.filtered and outcome.message_type == "ORU"
    [event] = outcome.events
    assert event["data"]["patient"]["mrn"] == "OH-42" and event["data"]["observations"][0]["value"] == 5.5


def test_v22_adt_takes_its_trigger_from_evn1(project: Project) -> None:
    raw = hl7("MSH|^~\\&|HIS|OLDHOSP|ADT|OLDHOSP|199406011200||ADT|OLD-2|P|2.2", "EVN|A01|199406011200",
              "PID|||OH-43||Brandt^Greta||19420202|F", "PV1||I|W1^101^1")
    [event] = transform(project.routes["adt-inbound"], raw).events
    assert event["type"] == "patient.admitted.v1" and event["data"]["patient"]["mrn"] == "OH-43"


def test_a_bare_code_whose_trigger_cannot_be_inferred_is_dead_lettered_not_filtered(project: Project) -> None:
    raw = hl7("MSH|^~\\&|HIS|OLDHOSP|ADT|OLDHOSP|199406011200||ADT|OLD-3|P|2.2", "PID|||OH-44")
    with pytest.raises(FilterError, match="MSH-9 ADT has no trigger event") as raised:
        transform(project.routes["adt-inbound"], raw)
    assert raised.value.stage == "filter"
    other = hl7("MSH|^~\\&|HIS|OLDHOSP|ADT|OLDHOSP|199406011200||ACK|OLD-4|P|2.2", "MSA|AA|1")
    assert transform(project.routes["adt-inbound"], other).filtered  # not a code the route lists: filtered


def test_a_route_can_still_say_otherwise_for_the_bare_code(project: Project) -> None:
    """A condition listing the bare code matches it exactly (a rule of its own for old senders)."""
    from middleware.formats import get_format
    from middleware.mapping import compile_condition

    bare = compile_condition({"message_type": "ORU"}, get_format("hl7v2"))
    assert bare.matches(parse(hl7("MSH|^~\\&|A|B|C|D|1990||ORU|1|P|2.1")))
    assert not bare.matches(parse(hl7("MSH|^~\\&|A|B|C|D|1990||ORU^R01|1|P|2.5")))


def test_a_fhir_bundle_is_dead_lettered_with_the_reason_not_filtered(project: Project) -> None:
    bundle = {"resourceType": "Bundle", "id": "b-1", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:8d1f3a52-0c51-4d0e-9f5e-0d7b1c1f0a01",
         "resource": {"resourceType": "Patient", "identifier": [{"value": "P-1"}]}}]}
    with pytest.raises(FilterError, match="FHIR Bundle of type collection with 1 entry") as raised:
        transform(project.routes["fhir-inbound"], json.dumps(bundle).encode())
    assert "HTTP ingest" in str(raised.value)
    encounter = {"resourceType": "Encounter", "id": "e-1", "status": "finished"}
    assert transform(project.routes["fhir-inbound"], json.dumps(encounter).encode()).filtered


SIU = ["MSH|^~\\&|SCHED|RIVERCLINIC|EHR|RIVERCLINIC|20260305080000+0100||SIU^S12^SIU_S12|S-{n}|P|2.6",
       "SCH|RC-A1^SCHED|||||||CHECKUP^Check-up|20|min|^^20^20260310090000+0100^20260310092000+0100",
       "TQ1|1||||||20260310094500+0100|20260310100500+0100", "PID|1||RC-9^^^RIVERCLINIC^MR||Ito^Yuki",
       "RGS|1", "AIS|1||99213^Office visit^CPT|20260310094500+0100|||20|min", "NTE|1||Bring referral letter",
       "AIG|1||ECG-2^ECG cart^L|EQ^Equipment||||20260310094500+0100",
       "AIL|1||RC-EXAM3^3^A^RIVERCLINIC|EXAM^Exam room||20260310094500+0100",
       "AIP|1||7001^Nakamura^Rei|ATT^Attending||20260310094500+0100",
       "AIP|2||7002^Sato^Mio|NUR^Nurse||20260310094500+0100"]


def test_siu_start_and_end_come_from_tq1_before_sch11(project: Project) -> None:
    [event] = transform(project.routes["scheduling-inbound"], hl7(*SIU).replace(b"{n}", b"1")).events
    appointment = event["data"]["appointment"]
    assert (appointment["start"], appointment["end"]) == ("2026-03-10T09:45:00+01:00", "2026-03-10T10:05:00+01:00")
    without_tq1 = [s for s in SIU if not s.startswith("TQ1")]
    [event] = transform(project.routes["scheduling-inbound"], hl7(*without_tq1).replace(b"{n}", b"2")).events
    assert event["data"]["appointment"]["start"] == "2026-03-10T09:00:00+01:00"  # SCH-11.4


def test_siu_resources_from_ais_aig_ail_aip(project: Project) -> None:
    [event] = transform(project.routes["scheduling-inbound"], hl7(*SIU).replace(b"{n}", b"3")).events
    appointment = event["data"]["appointment"]
    assert appointment["services"] == [{"code": "99213", "name": "Office visit", "coding_system": "CPT",
                                        "start": "2026-03-10T09:45:00+01:00", "duration": 20, "duration_unit": "min"}]
    assert appointment["resources"] == [{"id": "ECG-2", "name": "ECG cart", "type": "Equipment",
                                         "start": "2026-03-10T09:45:00+01:00"}]
    assert appointment["locations"] == [{"point_of_care": "RC-EXAM3", "room": "3", "bed": "A",
                                         "facility": "RIVERCLINIC", "type": "Exam room",
                                         "start": "2026-03-10T09:45:00+01:00"}]
    assert [(p["id"], p["role"]) for p in appointment["providers"]] == [("7001", "Attending"), ("7002", "Nurse")]


@pytest.mark.parametrize(("orc7", "tq1", "obr27", "expected"), [
    ("^^^^^R", "TQ1|1||||||||S^Stat^HL70485", "^^^^^A", "A"),  # OBR-27.6 first
    ("^^^^^R", "TQ1|1||||||||S^Stat^HL70485", "", "S"),  # else TQ1-9
    ("^^^^^R", "", "", "R"),  # else ORC-7.6
])
def test_order_priority_obr27_then_tq1_then_orc7(project: Project, orc7: str, tq1: str, obr27: str,
                                                 expected: str) -> None:
    obr = "OBR|1|PO-1||2345-7^Glucose^LN" + "|" * 23 + obr27
    segments = ["MSH|^~\\&|EHR|A|LIS|A|20260306||OML^O21|P-1|P|2.5.1", "PID|1||PA-1^^^A^MR",
                f"ORC|NW|PO-1|||||{orc7}", *([tq1] if tq1 else []), obr]
    [event] = transform(project.routes["orders-inbound"], hl7(*segments)).events
    assert event["data"]["order"]["priority"] == expected


def test_adt_with_only_an_identifier_gives_events(project: Project) -> None:
    """An emergency admission with no bed, visit number, class, disposition, given name or birth date."""
    for trigger, kind in [("A01", "patient.admitted.v1"), ("A03", "patient.discharged.v1"),
                          ("A04", "patient.registered.v1"), ("A08", "patient.updated.v1"),
                          ("A02", "patient.transferred.v1")]:
        raw = hl7(f"MSH|^~\\&|HIS|A|ADT|A|20260307||ADT^{trigger}|E-{trigger}|P|2.5", f"EVN|{trigger}",
                  "PID|1||ER-1^^^A^MR||Doe", "PV1|1")
        [event] = transform(project.routes["adt-inbound"], raw).events
        assert event["type"] == kind and event["data"]["patient"] == {"mrn": "ER-1", "name": {"family": "Doe"}}


def test_fhir_patient_without_birth_date_or_family_name_gives_an_event(project: Project) -> None:
    patient = {"resourceType": "Patient", "id": "p-2", "identifier": [{"value": "FP-2"}],
               "name": [{"text": "Baby Boy Jensen"}]}
    [event] = transform(project.routes["fhir-inbound"], json.dumps(patient).encode()).events
    assert event["data"]["patient"]["mrn"] == "FP-2" and "birth_date" not in event["data"]["patient"]


def test_catalogue_requires_only_identifiers() -> None:
    def required(node: dict, path: str = "") -> set[str]:
        found = {f"{path}{name}" for name in node.get("required", [])}
        for name, child in (node.get("properties") or {}).items():
            found |= required(child, f"{path}{name}.")
        if isinstance(node.get("items"), dict):
            found |= required(node["items"], f"{path}[].")
        return found

    patient = {"patient", "patient.mrn"}
    expected = {
        "patient.registered": patient, "patient.updated": patient, "patient.admitted": patient,
        "patient.discharged": patient, "patient.transferred": patient, "patient.admission_cancelled": patient,
        "patient.discharge_cancelled": patient, "patient.merged": patient | {"merged_mrn"},
        "order.placed": patient | {"order", "order.id"},
        "appointment.booked": patient | {"appointment", "appointment.id"},
        "result.reported": patient | {"observations.[].code"},
    }
    catalogue = {name: required(json.loads((REPO / "schemas" / name / "1.json").read_text())) for name in expected}
    assert catalogue == expected
