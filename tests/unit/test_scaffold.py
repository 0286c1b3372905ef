"""``middleware new route NAME --from SAMPLE``: the scaffolded route validates and its test case passes at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from middleware.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for folder in ("config", "connectors", "schemas"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    (tmp_path / "routes").mkdir()
    shutil.copy(REPO / "routes" / "adt-inbound.yaml", tmp_path / "routes")
    shutil.copytree(REPO / "routes" / "_fragments", tmp_path / "routes" / "_fragments")
    return tmp_path


def new_route(project: Path, *args: str) -> object:
    return runner.invoke(app, ["new", "route", *args, "--project", str(project)])


def assert_validates_and_tests(project: Path, name: str) -> None:
    validated = runner.invoke(app, ["validate", "--project", str(project)])
    assert validated.exit_code == 0, validated.output
    tested = runner.invoke(app, ["test", name, "--project", str(project)])
    assert tested.exit_code == 0, tested.output
    assert "1 passed" in tested.output


def test_adt_sample_gives_a_route_with_pid_fields_a_schema_a_case_and_the_sample(project: Path) -> None:
    result = new_route(project, "adt-new", "--from", str(REPO / "samples/adt-inbound/a01-admit.hl7"))
    assert result.exit_code == 0, result.output
    route = yaml.safe_load((project / "routes/adt-new.yaml").read_text())
    assert route["source"] == {"queue": "adt-new", "format": "hl7v2"}
    rule = route["events"][0]
    assert rule["when"] == {"message_type": "ADT^A01"} and rule["type"] == "adt_new.received"
    assert rule["map"]["patient.mrn"] == {"path": ["PID-3[5=MR].1", "PID-3.1"], "required": True}
    assert rule["map"]["patient.name.family"] == "PID-5.1"
    assert rule["map"]["patient.birth_date"] == {"path": "PID-7", "as": "date"}
    assert rule["map"]["patient.sex"] == "PID-8"
    schema = json.loads((project / "schemas/adt_new.received/1.json").read_text())
    assert schema["required"] == ["patient"] and schema["properties"]["patient"]["required"] == ["mrn"]
    assert (project / "samples/adt-new/a01-admit.hl7").read_bytes() == \
        (REPO / "samples/adt-inbound/a01-admit.hl7").read_bytes()
    case = yaml.safe_load((project / "routes/tests/adt-new/a01-admit.yaml").read_text())
    event = case["expect"]["events"][0]
    assert event["type"] == "adt_new.received.v1" and event["data"]["patient"]["mrn"] == event["subject"][8:]
    assert_validates_and_tests(project, "adt-new")


@pytest.mark.parametrize(("sample", "fmt", "path"), [
    ("fhir-inbound/patient-registered.json", "fhir", "Patient.name[0].family"),
    ("fhir-inbound/observation-potassium.json", "fhir", "Observation.code.coding[0].code"),
    ("eligibility-batch/payer-roster-2026-11.csv", "csv", "member_id"),
    ("enrolment-x12/834-northwind-december.x12", "x12", "NM1[IL]-3"),
    ("referrals-rest/cardiology-urgent.json", "json", "patient.mrn"),
    ("results-inbound/batch-lab-results.hl7", "hl7v2", "OBR-4.1"),
])
def test_every_format_scaffolds_a_route_that_validates_and_passes_its_case(
        project: Path, sample: str, fmt: str, path: str) -> None:
    result = new_route(project, "feed", "--from", str(REPO / "samples" / sample), "--event-type", "feed.arrived")
    assert result.exit_code == 0, result.output
    route = yaml.safe_load((project / "routes/feed.yaml").read_text())
    assert route["source"]["format"] == fmt
    sources = [v if isinstance(v, str) else v["path"] for v in route["events"][0]["map"].values()]
    assert any(path == s or (isinstance(s, list) and path in s) for s in sources)
    assert route["events"][0]["type"] == "feed.arrived"
    assert_validates_and_tests(project, "feed")


def test_a_semicolon_csv_keeps_its_delimiter(project: Path, tmp_path: Path) -> None:
    sample = tmp_path / "roster.csv"
    sample.write_text("member_id;family;plan\nM1;Okafor;Gold\nM2;Lind;Silver\n")
    assert new_route(project, "roster", "--from", str(sample)).exit_code == 0
    route = yaml.safe_load((project / "routes/roster.yaml").read_text())
    assert route["source"]["delimiter"] == ";"
    assert route["events"][0]["map"]["record.member_id"] == {"path": "member_id", "required": True}
    assert_validates_and_tests(project, "roster")


def test_existing_files_are_never_overwritten(project: Path) -> None:
    sample = str(REPO / "samples/adt-inbound/a01-admit.hl7")
    before = (project / "routes/adt-inbound.yaml").read_bytes()
    result = new_route(project, "adt-inbound", "--from", sample, "--event-type", "other.thing")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: routes/adt-inbound.yaml exists: new route never overwrites "
        "(pick another NAME or --event-type, or remove the file)"]
    assert (project / "routes/adt-inbound.yaml").read_bytes() == before
    taken = new_route(project, "again", "--from", sample, "--event-type", "patient.admitted")  # a catalogue schema
    assert taken.exit_code == 1 and "schemas/patient.admitted/1.json exists" in taken.output
    assert not (project / "routes/again.yaml").exists() and not (project / "samples/again").exists()


def test_a_taken_queue_or_an_unreadable_sample_writes_nothing(project: Path, tmp_path: Path) -> None:
    sample = str(REPO / "samples/adt-inbound/a01-admit.hl7")
    taken = new_route(project, "adt2", "--from", sample, "--queue", "ehr.adt")
    assert taken.exit_code == 1 and "already consumes queue 'ehr.adt'" in taken.output
    junk = tmp_path / "junk.txt"
    junk.write_text("hello world\n")
    bad = new_route(project, "junk", "--from", str(junk))
    assert bad.exit_code == 1 and bad.output.startswith("error: neither an HL7 v2 message")
    assert sorted(p.name for p in (project / "routes").glob("*.yaml")) == ["adt-inbound.yaml"]
    assert not (project / "samples").exists()


def test_a_project_that_does_not_load_gets_the_new_files_removed(project: Path) -> None:
    (project / "routes/broken.yaml").write_text("route: broken\n")  # a problem of the project, not ours
    result = new_route(project, "feed", "--from", str(REPO / "samples/adt-inbound/a01-admit.hl7"))
    assert result.exit_code == 1 and "the project does not load with the new route" in result.output
    assert not (project / "routes/feed.yaml").exists() and not (project / "schemas/feed.received").exists()
    assert not (project / "samples/feed/a01-admit.hl7").exists()
