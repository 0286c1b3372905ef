"""FHIR Bundles split into one message per entry, subscription notifications, NDJSON on FHIR routes.

Splitting is the fhir format's ``split`` (what publish, the HTTP endpoint and the Python API use);
each record is then run through the real fhir-inbound route as the worker would run it.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from middleware.errors import ConfigError, FilterError, ParseError
from middleware.formats import Record, SplitInfo, Unsplit, get_format
from middleware.formats.fhir import SPLIT_TAG, FhirDocument, compile_path
from middleware.project import Project, load_project
from middleware.route import MessageContext, transform, transform_split

REPO = Path(__file__).resolve().parents[2]
FHIR = get_format("fhir")
MR = {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    root = tmp_path_factory.mktemp("bundles")
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, root / folder)
    whole = (root / "routes" / "fhir-inbound.yaml").read_text()
    whole = whole.replace("route: fhir-inbound", "route: fhir-whole").replace(
        "source: {queue: fhir.inbound, format: fhir}", "source: {queue: fhir.whole, format: fhir, split: false}")
    (root / "routes" / "fhir-whole.yaml").write_text(whole)
    return load_project(root, {}, offline=True)


def split(data: Any) -> tuple[list[Record], SplitInfo]:
    info = SplitInfo()
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    return list(FHIR.split(io.BytesIO(raw), info)), info


def patient(n: int, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{**MR, "value": f"MRN-{n}"}], **extra}


def observation(subject: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "Pulse"},
            "subject": {"reference": subject}, "valueQuantity": {"value": 64, "unit": "/min"}, **extra}


def bundle(kind: str, entries: list[dict[str, Any]], bundle_id: str | None = "b-1") -> dict[str, Any]:
    data: dict[str, Any] = {"resourceType": "Bundle", "type": kind, "entry": entries}
    if bundle_id is not None:
        data["id"] = bundle_id
    return data


def urn(n: int) -> str:
    return f"urn:uuid:6c1f0f9e-2d0b-4b8a-9f51-{n:012d}"


@pytest.mark.parametrize("kind", ["batch", "transaction", "collection", "message", "searchset"])
def test_each_bundle_type_is_split_one_record_per_entry_with_its_headers(kind: str) -> None:
    entries = [{"fullUrl": urn(1), "resource": patient(1)},
               {"fullUrl": urn(2), "resource": observation(urn(1))},
               {"fullUrl": "https://ehr.example.org/fhir/Patient/9", "resource": patient(9, id="9")}]
    records, info = split(bundle(kind, entries, f"{kind}-7"))
    assert [r.position for r in records] == [1, 2, 3] and all(r.error is None for r in records)
    assert [r.headers for r in records] == [
        {"x-mw-bundle-id": f"{kind}-7", "x-mw-bundle-type": kind, "x-mw-batch-total": 3, "x-mw-fullurl": url}
        for url in (urn(1), urn(2), "https://ehr.example.org/fhir/Patient/9")]
    assert info.batch_id == f"Bundle/{kind}-7" and info.records == 3
    docs = [FHIR.parse(r.raw) for r in records]
    assert [d.message_type for d in docs] == ["Patient", "Observation", "Patient"]
    assert [d.root for d in docs] == [e["resource"] for e in entries]  # each message reads its own entry


def test_a_bundle_without_id_is_named_by_its_digest_and_has_no_bundle_id_header() -> None:
    records, info = split(bundle("collection", [{"fullUrl": urn(1), "resource": patient(1)}], None))
    assert info.batch_id is not None and info.batch_id.startswith("sha256:")
    assert "x-mw-bundle-id" not in records[0].headers and records[0].headers["x-mw-bundle-type"] == "collection"


def test_a_split_entry_carries_exactly_the_entries_it_references_directly_or_not() -> None:
    encounter = {"resourceType": "Encounter", "status": "finished", "subject": {"reference": urn(1)}}
    entries = [{"fullUrl": urn(1), "resource": patient(1)},
               {"fullUrl": urn(2), "resource": encounter},
               {"fullUrl": urn(3), "resource": observation(urn(1), encounter={"reference": urn(2)})},
               {"fullUrl": urn(4), "resource": patient(4)},  # referenced by nobody
               {"fullUrl": urn(5), "resource": observation("Patient/p-5")},
               {"fullUrl": "https://ehr.example.org/fhir/Patient/p-5", "resource": patient(5, id="p-5")}]
    records, _ = split(bundle("transaction", entries))
    carried = [[e["fullUrl"] for e in orjson.loads(r.raw)["entry"]] for r in records]
    assert carried == [[urn(1)], [urn(2), urn(1)], [urn(3), urn(1), urn(2)], [urn(4)],
                       [urn(5), "https://ehr.example.org/fhir/Patient/p-5"], ["https://ehr.example.org/fhir/Patient/p-5"]]
    assert all(SPLIT_TAG in orjson.loads(r.raw)["meta"]["tag"] for r in records)
    obs = FHIR.parse(records[2].raw)
    assert compile_path("Observation.subject.resolve().identifier.value").read(obs) == ["MRN-1"]
    assert compile_path("Observation.encounter.resolve().subject.resolve().identifier.value").read(obs) == ["MRN-1"]
    assert compile_path("Observation.subject.getReferenceKey(Patient)").read(obs) == []  # urn entry without an id
    relative = FHIR.parse(records[4].raw)
    assert compile_path("Observation.subject.resolve().identifier.value").read(relative) == ["MRN-5"]
    assert compile_path("Patient.identifier.value").read(obs) == []  # a split entry is one resource, not the bundle


def test_urn_uuid_references_resolve_through_the_route_after_the_split(project: Project) -> None:
    entries = [{"fullUrl": urn(1), "resource": patient(1), "request": {"method": "POST", "url": "Patient"}},
               *({"fullUrl": urn(10 + n), "resource": observation(urn(1)),
                  "request": {"method": "POST", "url": "Observation"}} for n in range(3))]
    records, info = split(bundle("transaction", entries))
    route = project.routes["fhir-inbound"]
    for record in records[1:]:
        context = MessageContext(batch_id=info.batch_id, batch_position=str(record.position))
        [event] = transform(route, record.raw, context).events
        assert event["type"] == "result.reported.v1" and event["data"]["patient"]["mrn"] == "MRN-1"


def test_event_ids_stay_unique_across_bundles_sharing_entry_ids(project: Project) -> None:
    route = project.routes["fhir-inbound"]
    same = patient(1, id="1", meta={"versionId": "1"})  # the same id and version in both bundles

    def ids(bundle_id: str | None) -> list[str]:
        data = bundle("transaction", [{"fullUrl": "urn:uuid:a", "resource": same},
                                      {"fullUrl": "urn:uuid:b", "resource": observation("urn:uuid:a", id="1")}],
                      bundle_id)
        return [e["id"] for e in transform_split(route, orjson.dumps(data)).events]

    first, second, anonymous = ids("b-1"), ids("b-2"), ids(None)
    assert len(set(first + second + anonymous)) == 6
    assert ids("b-1") == first  # the same bundle sent again: the same events (deduplicated downstream)
    # the identity without the transport headers also tells the bundles apart
    one = FHIR.parse(split(bundle("collection", [{"resource": same}], "x"))[0][0].raw)
    two = FHIR.parse(split(bundle("collection", [{"resource": same}], "y"))[0][0].raw)
    assert isinstance(one, FhirDocument) and one.source_identity() != two.source_identity()


def test_an_entry_without_id_is_identified_by_its_full_url() -> None:
    [record], _ = split(bundle("collection", [{"fullUrl": urn(1), "resource": patient(1)}]))
    doc = FHIR.parse(record.raw)
    assert doc.message_id == urn(1) and doc.source_identity()[:2] == ("Patient", urn(1))


def test_an_entry_without_resource_is_a_record_that_dead_letters_with_its_reason() -> None:
    entries: list[dict[str, Any]] = [{"fullUrl": urn(1), "resource": patient(1)},
               {"request": {"method": "DELETE", "url": "Patient/77"}}]
    records, _ = split(bundle("transaction", entries))
    assert records[0].error is None
    assert records[1].position == 2 and records[1].error == (
        "Bundle entry 2 of 2 has no resource (request DELETE): nothing to publish")


def test_a_route_with_split_false_keeps_the_bundle_whole(project: Project) -> None:
    whole = project.routes["fhir-whole"]
    assert isinstance(whole.format, Unsplit) and whole.format.name == "fhir"
    raw = orjson.dumps(bundle("transaction", [{"fullUrl": urn(1), "resource": patient(1)},
                                              {"fullUrl": urn(2), "resource": observation(urn(1))}]))
    info = SplitInfo()
    assert list(whole.format.split(io.BytesIO(raw), info)) == [Record(raw)]
    with pytest.raises(FilterError, match="reached the route whole"):
        transform(whole, raw)  # its filter reads single resources: dead-lettered, not dropped
    assert len(transform_split(project.routes["fhir-inbound"], raw).events) == 2


def test_split_must_be_a_boolean(tmp_path: Path) -> None:
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    path = tmp_path / "routes" / "fhir-inbound.yaml"
    path.write_text(path.read_text().replace("format: fhir}", "format: fhir, split: 'no'}"))
    with pytest.raises(ConfigError, match=r"fhir-inbound\.yaml:3"):
        load_project(tmp_path, {}, offline=True)


# -- subscription notifications (R4B backport) ----------------------------------------------------


def r4b_status(kind: str) -> dict[str, Any]:
    return {"resourceType": "SubscriptionStatus", "status": "active", "type": kind,
            "eventsSinceSubscriptionStart": "3", "topic": "http://example.org/topics/admission",
            "subscription": {"reference": "https://ehr.example.org/fhir/Subscription/s-1"}}


def r4_status(kind: str) -> dict[str, Any]:
    return {"resourceType": "Parameters",
            "meta": {"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
                                 "backport-subscription-status-r4"]},
            "parameter": [{"name": "subscription",
                           "valueReference": {"reference": "https://ehr.example.org/fhir/Subscription/s-1"}},
                          {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": kind}]}


@pytest.mark.parametrize("status", [r4b_status, r4_status])
@pytest.mark.parametrize("kind", ["handshake", "heartbeat"])
def test_a_handshake_or_heartbeat_is_a_sign_of_life_with_nothing_to_publish(status: Any, kind: str) -> None:
    records, info = split(bundle("history", [{"fullUrl": urn(1), "resource": status(kind)}]))
    assert records == [] and info.feed == kind


@pytest.mark.parametrize("status", [r4b_status, r4_status])
def test_an_event_notification_yields_its_focus_resources(status: Any, project: Project) -> None:
    entries = [{"fullUrl": urn(1), "resource": status("event-notification")},
               {"fullUrl": urn(2), "resource": observation(urn(3))},
               {"fullUrl": urn(3), "resource": patient(3)}]
    records, info = split(bundle("history", entries, "n-1"))
    assert info.feed == "event-notification" and [r.position for r in records] == [1, 2]
    assert records[0].headers == {"x-mw-bundle-id": "n-1", "x-mw-bundle-type": "history", "x-mw-batch-total": 2,
                                  "x-mw-fullurl": urn(2),
                                  "x-mw-subscription": "https://ehr.example.org/fhir/Subscription/s-1"}
    route = project.routes["fhir-inbound"]
    events = [transform(route, r.raw).events[0] for r in records]
    assert [e["type"] for e in events] == ["result.reported.v1", "patient.registered.v1"]
    assert events[0]["data"]["patient"]["mrn"] == "MRN-3"


def test_an_id_only_notification_entry_dead_letters_with_its_reason() -> None:
    entries = [{"fullUrl": urn(1), "resource": r4b_status("event-notification")},
               {"fullUrl": "https://ehr.example.org/fhir/Patient/5", "request": {"method": "PUT", "url": "Patient/5"}}]
    [record], _ = split(bundle("history", entries))
    assert record.error is not None and "has no resource (request PUT)" in record.error


def test_a_history_bundle_that_is_not_a_notification_stays_whole_and_is_refused() -> None:
    data = bundle("history", [{"fullUrl": urn(1), "resource": patient(1)}])
    [record], _ = split(data)
    assert record.position is None
    with pytest.raises(ParseError, match="Bundle type"):
        FHIR.parse(record.raw)


# -- inputs that are not bundles -------------------------------------------------------------------


def test_a_single_resource_is_published_byte_for_byte() -> None:
    pretty = orjson.dumps(patient(1), option=orjson.OPT_INDENT_2) + b"\n"
    for raw in (pretty, orjson.dumps(patient(1)) + b"\n", b"\xef\xbb\xbf" + pretty, b"{not json"):
        records, info = split(raw)
        assert records == [Record(raw)] and info.records == 1


def test_an_ndjson_file_is_published_resource_by_resource_to_a_fhir_route(project: Project) -> None:
    lines = [orjson.dumps(patient(1)), b"", orjson.dumps(observation("Patient/x")), b"{bad", orjson.dumps(patient(2))]
    records, _ = split(b"\n".join(lines) + b"\n")
    assert [(r.position, r.error) for r in records] == [
        (1, None), (2, None), (3, "NDJSON record 3 (line 4) is not valid JSON"), (4, None)]
    route = project.routes["fhir-inbound"]
    assert transform(route, records[3].raw).events[0]["data"]["patient"]["mrn"] == "MRN-2"


def test_a_split_entry_without_a_resource_is_refused_at_parse() -> None:
    raw = orjson.dumps({"resourceType": "Bundle", "type": "collection", "meta": {"tag": [SPLIT_TAG]},
                        "entry": [{"fullUrl": urn(1)}]})
    with pytest.raises(ParseError, match="split Bundle entry without a FHIR resource"):
        FHIR.parse(raw)


def test_transform_splits_a_bundle_and_prints_every_entrys_events() -> None:
    sample = REPO / "samples" / "fhir-inbound" / "transaction-lab-results.json"
    result = subprocess.run([sys.executable, "-m", "middleware", "transform", "fhir-inbound", str(sample)],
                            cwd=REPO, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [e["type"] for e in events] == ["patient.registered.v1", "result.reported.v1", "result.reported.v1"]
    assert {e["data"]["patient"]["mrn"] for e in events} == {"MRN-58213"}  # the urn:uuid subjects resolved
