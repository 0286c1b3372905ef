"""One event per group (``for_each``) and group membership that follows the HL7 message structure:
several orders, results and merges in one message; notes on the right observation."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.errors import MappingError, SchemaValidationError
from middleware.formats import get_format
from middleware.formats.hl7v2 import parse
from middleware.formats.hl7v2_groups import own_segments, spans
from middleware.project import Project, load_project
from middleware.route import transform

REPO = Path(__file__).resolve().parents[2]

MSH_ORU = "MSH|^~\\&|LIS|NORTHLAB|EHR|NORTHLAB|20260301101500+0100||ORU^R01^ORU_R01|G-{n}|P|2.5.1"
PID = "PID|1||NL-100^^^NORTHLAB^MR||Varga^Ilona||19710204|F"


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {})


def hl7(*segments: str) -> bytes:
    return "\r".join(segments).encode()


def run(project: Project, route: str, raw: bytes) -> list[dict]:
    return transform(project.routes[route], raw).events


def test_oru_with_two_orders_gives_one_result_per_order_with_its_own_observations(project: Project) -> None:
    raw = hl7(MSH_ORU.format(n=1), PID,
              "ORC|RE|PL-1^EHR|FL-1^LIS", "OBR|1|PL-1^EHR|FL-1^LIS|58410-2^CBC panel^LN|||20260301080000+0100",
              "OBX|1|NM|718-7^Hemoglobin^LN||13.2|g/dL|||||F",
              "OBX|2|NM|789-8^Erythrocytes^LN||4.4|10*6/uL|||||F",
              "ORC|RE|PL-2^EHR|FL-2^LIS", "OBR|2|PL-2^EHR|FL-2^LIS|2345-7^Glucose^LN|||20260301081500+0100",
              "OBX|1|NM|2345-7^Glucose^LN||5.1|mmol/L|||||F")
    first, second = run(project, "results-inbound", raw)
    assert (first["data"]["order"]["id"], second["data"]["order"]["id"]) == ("PL-1", "PL-2")
    assert [o["code"] for o in first["data"]["observations"]] == ["718-7", "789-8"]
    assert [o["code"] for o in second["data"]["observations"]] == ["2345-7"]
    assert first["data"]["result"]["observed_at"] == "2026-03-01T08:00:00+01:00"
    assert second["data"]["result"]["observed_at"] == "2026-03-01T08:15:00+01:00"
    assert first["data"]["patient"] == second["data"]["patient"]  # the header PID is read by every group
    assert first["id"] != second["id"]


def test_an_order_without_its_own_orc_does_not_read_the_previous_orders_orc(project: Project) -> None:
    raw = hl7(MSH_ORU.format(n=2), PID,
              "ORC|RE|PL-1^EHR", "OBR|1|||58410-2^CBC panel^LN", "OBX|1|NM|718-7^Hemoglobin^LN||13.2",
              "OBR|2|||2345-7^Glucose^LN", "OBX|1|NM|2345-7^Glucose^LN||5.1")
    first, second = run(project, "results-inbound", raw)
    assert first["data"]["order"]["id"] == "PL-1"  # OBR-2 empty: ORC-2 of its own ORC
    assert "id" not in second["data"]["order"]


def test_oru_with_two_patients_reads_each_orders_own_patient(project: Project) -> None:
    raw = hl7(MSH_ORU.format(n=3), PID, "OBR|1|PL-1||2345-7^Glucose^LN", "OBX|1|NM|2345-7^Glucose^LN||5.1",
              "PID|1||NL-200^^^NORTHLAB^MR||Horvat^Marko", "OBR|1|PL-7||2345-7^Glucose^LN",
              "OBX|1|NM|2345-7^Glucose^LN||6.3")
    first, second = run(project, "results-inbound", raw)
    assert (first["data"]["patient"]["mrn"], second["data"]["patient"]["mrn"]) == ("NL-100", "NL-200")
    assert [o["value"] for o in first["data"]["observations"]] == [5.1]
    assert [o["value"] for o in second["data"]["observations"]] == [6.3]


def test_order_notes_stay_with_the_order_and_observation_notes_with_their_obx(project: Project) -> None:
    raw = hl7(MSH_ORU.format(n=4), PID, "OBR|1|PL-1||24331-1^Lipid panel^LN",
              "NTE|1|L|Specimen slightly hemolysed",
              "OBX|1|NM|2093-3^Cholesterol^LN||5.2|mmol/L|||||F",
              "OBX|2|NM|2571-8^Triglyceride^LN||2.3|mmol/L|||||F",
              "NTE|1|L|Not fasting", "NTE|2|L|Repeat fasting",
              "OBX|3|NM|2085-9^HDL^LN||1.1|mmol/L|||||F")
    [event] = run(project, "results-inbound", raw)
    assert event["data"]["result"]["notes"] == ["Specimen slightly hemolysed"]
    assert [o.get("notes") for o in event["data"]["observations"]] == [None, ["Not fasting", "Repeat fasting"], None]


def test_an_order_note_is_not_copied_onto_observations_that_have_no_notes(project: Project) -> None:
    raw = hl7(MSH_ORU.format(n=5), PID, "OBR|1|PL-1||24331-1^Lipid panel^LN", "NTE|1||Order note",
              "OBX|1|NM|2093-3^Cholesterol^LN||5.2", "OBX|2|NM|2571-8^Triglyceride^LN||2.3")
    [event] = run(project, "results-inbound", raw)
    assert event["data"]["result"]["notes"] == ["Order note"]
    assert all("notes" not in o for o in event["data"]["observations"])


def test_notes_after_an_obx_are_kept_even_when_the_order_has_notes_too(project: Project) -> None:
    """The old rule ended an OBX item at any segment kind seen before the first OBX, so NTEs were lost."""
    raw = hl7(MSH_ORU.format(n=6), PID, "OBR|1|PL-1||24331-1^Lipid panel^LN", "NTE|1||Order note",
              "OBX|1|NM|2093-3^Cholesterol^LN||5.2", "NTE|1||Result note", "ZRN|1|site data",
              "NTE|2||Second result note")
    [event] = run(project, "results-inbound", raw)
    assert event["data"]["observations"][0]["notes"] == ["Result note", "Second result note"]


def test_orm_with_three_orders_gives_three_orders(project: Project) -> None:
    raw = hl7("MSH|^~\\&|EHR|WESTCLINIC|LIS|WESTLAB|20260302090000||ORM^O01^ORM_O01|G-7|P|2.4",
              "PID|1||WC-55^^^WESTCLINIC^MR||Okafor^Chidi", "PV1|1|O",
              "ORC|NW|WC-O1^EHR|||||^^^^^R", "OBR|1|WC-O1^EHR||2345-7^Glucose^LN", "NTE|1||Fasting sample",
              "ORC|NW|WC-O2^EHR|||||^^^^^S", "OBR|1|WC-O2^EHR||6690-2^WBC^LN",
              "ORC|NW|WC-O3^EHR", "OBR|1|WC-O3^EHR||1558-6^Fasting glucose^LN")
    events = run(project, "orders-inbound", raw)
    assert [e["data"]["order"]["id"] for e in events] == ["WC-O1", "WC-O2", "WC-O3"]
    assert [e["data"]["order"]["tests"] for e in events] == [
        [{"code": "2345-7", "name": "Glucose", "coding_system": "LN"}],
        [{"code": "6690-2", "name": "WBC", "coding_system": "LN"}],
        [{"code": "1558-6", "name": "Fasting glucose", "coding_system": "LN"}]]
    assert [e["data"]["order"].get("priority") for e in events] == ["R", "S", None]
    assert [e["data"]["order"].get("notes") for e in events] == [["Fasting sample"], None, None]
    assert [e["subject"] for e in events] == ["Order/WC-O1", "Order/WC-O2", "Order/WC-O3"]
    assert len({e["id"] for e in events}) == 3


def test_only_new_orders_of_a_mixed_message_are_placed(project: Project) -> None:
    raw = hl7("MSH|^~\\&|EHR|WESTCLINIC|LIS|WESTLAB|20260302090000||ORM^O01|G-8|P|2.3",
              "PID|1||WC-55^^^WESTCLINIC^MR", "ORC|CA|WC-O9", "OBR|1|WC-O9||2345-7^Glucose^LN",
              "ORC|NW|WC-O10", "OBR|1|WC-O10||6690-2^WBC^LN")
    [event] = run(project, "orders-inbound", raw)
    assert event["data"]["order"]["id"] == "WC-O10"
    assert event["data"]["order"]["tests"] == [{"code": "6690-2", "name": "WBC", "coding_system": "LN"}]


def test_a40_with_two_pairs_merges_both(project: Project) -> None:
    raw = hl7("MSH|^~\\&|MPI|EASTHOSP|ADT|EASTHOSP|20260303120000||ADT^A40^ADT_A39|G-9|P|2.5",
              "EVN|A40|20260303120000", "PID|1||EH-1^^^EASTHOSP^MR||Lund^Erik", "PD1|||EASTHOSP",
              "MRG|EH-901^^^EASTHOSP^MR", "PV1|1|N", "PID|1||EH-2^^^EASTHOSP^MR||Lund^Karin",
              "MRG|EH-902^^^EASTHOSP^MR")
    events = run(project, "adt-inbound", raw)
    assert [(e["data"]["patient"]["mrn"], e["data"]["merged_mrn"]) for e in events] == [
        ("EH-1", "EH-901"), ("EH-2", "EH-902")]
    assert [e["data"]["patient"]["name"]["given"] for e in events] == ["Erik", "Karin"]


def test_a_failing_group_is_named_in_the_error(project: Project) -> None:
    raw = hl7("MSH|^~\\&|MPI|EASTHOSP|ADT|EASTHOSP|20260303120000||ADT^A40|G-10|P|2.5", "EVN|A40",
              "PID|1||EH-1^^^EASTHOSP^MR", "MRG|EH-901", "PID|1||EH-2^^^EASTHOSP^MR", "MRG|")
    with pytest.raises(MappingError, match=r"rule patient\.merged\.v1: PID\[2\] merged_mrn: required"):
        run(project, "adt-inbound", raw)


def test_group_spans_follow_the_structure() -> None:
    message = parse(hl7("MSH|^~\\&|A|B|C|D|20260101||OML^O21|1|P|2.5.1", "PID|1||X", "ORC|NW|1", "TQ1|1",
                        "OBR|1", "NTE|1", "ORC|NW|2", "OBR|2", "OBX|1", "NTE|1", "OBX|2"))
    ids = [s.id for s in message.segments]
    obr = [i for i, s in enumerate(ids) if s == "OBR"]
    header_end, found = spans(message.segments, obr, "OBR")
    assert header_end == 2  # PID and MSH are the header; ORC TQ1 lead the first OBR
    assert [ids[start:end] for start, _, end in found] == [
        ["ORC", "TQ1", "OBR", "NTE"], ["ORC", "OBR", "OBX", "NTE", "OBX"]]
    second = message.segments[found[1][0]:found[1][2]]
    assert [s.id for s in own_segments(second, 1)] == ["ORC", "OBR", "OBX", "OBX"]  # the OBX's NTE is its own


def test_schema_errors_name_the_group(project: Project) -> None:
    raw = hl7(MSH_ORU.format(n=11), PID, "OBR|1|PL-1||2345-7", "OBX|1|NM|2345-7||5.1",
              "OBR|2|PL-2||2345-7", "OBX|1|NM|||5.1")
    with pytest.raises((MappingError, SchemaValidationError), match=r"OBR\[2\]"):
        run(project, "results-inbound", raw)


@settings(max_examples=300, deadline=None)
@given(body=st.lists(st.sampled_from(["PID", "PD1", "PV1", "ORC", "TQ1", "OBR", "NTE", "OBX", "PRT", "SPM", "MRG",
                                      "ZX1", "AIS", "AIP"]), max_size=25),
       anchor=st.sampled_from(["OBR", "ORC", "OBX", "PID", "MRG", "AIS"]))
def test_groups_are_disjoint_and_hold_exactly_their_anchor(body: list[str], anchor: str) -> None:
    message = parse(hl7("MSH|^~\\&|A|B|C|D|20260101||ORU^R01|1|P|2.5.1",
                        *(f"{sid}|{n}" for n, sid in enumerate(body, start=1))))
    segments = message.segments
    anchors = [i for i, s in enumerate(segments) if s.id == anchor]
    header_end, found = spans(segments, anchors, anchor)
    assert [a for _, a, _ in found] == anchors
    covered = [i for start, _, end in found for i in range(start, end)]
    assert len(covered) == len(set(covered))  # no segment in two groups
    for start, position, end in found:
        assert start <= position < end and [s.id for s in segments[start:end]].count(anchor) == 1
        assert start >= header_end
    views = get_format("hl7v2").each(message, anchor)
    assert [v.all(anchor) for v in views] == [[segments[a]] for a in anchors]  # each group reads its own anchor
