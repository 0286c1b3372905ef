"""`middleware test`: the route test cases kept beside the routes (routes/tests/<route>/<case>.yaml)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from middleware.cli import app
from middleware.cli.routetest import subset_diff

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def invoke(project: Path, *args: str) -> Any:
    return runner.invoke(app, ["test", *args, "--project", str(project)])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the shipped project, cases included, to break on purpose."""
    for folder in ("config", "routes", "connectors", "schemas", "samples"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    return tmp_path


def write_case(project: Path, route: str, name: str, text: str) -> Path:
    path = project / "routes" / "tests" / route / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


A01 = "input: ../../../samples/adt-inbound/a01-admit.hl7\n"


def test_the_shipped_cases_all_pass_as_a_user_runs_them() -> None:
    result = subprocess.run([sys.executable, "-m", "middleware", "test"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].endswith(" passed, 0 failed")
    assert all(line.startswith("ok    routes/tests/") for line in lines[:-1]), lines


def test_every_shipped_sample_has_a_case_and_every_route_has_cases() -> None:
    cases = list((REPO / "routes" / "tests").glob("*/*.yaml"))
    used = {(case.parent / yaml.safe_load(case.read_text())["input"]).resolve()
            for case in cases if "input" in yaml.safe_load(case.read_text())}
    samples = {p.resolve() for p in (REPO / "samples").glob("*/*") if p.is_file()}
    assert samples - used == set()
    assert {case.parent.name for case in cases} == {p.stem for p in (REPO / "routes").glob("*.yaml")}
    cancel = yaml.safe_load((REPO / "routes/tests/orders-inbound/orm-o01-cancel.yaml").read_text())
    assert cancel["expect"] == {"filtered": True}
    for malformed in ("adt-inbound/malformed-no-msh", "fhir-inbound/malformed-no-resourcetype"):
        case = yaml.safe_load((REPO / f"routes/tests/{malformed}.yaml").read_text())
        assert case["expect"]["error"]["stage"] == "parse"


def test_a_broken_expectation_fails_with_exit_1_and_names_the_path(project: Path) -> None:
    case = project / "routes/tests/adt-inbound/a01-admit.yaml"
    case.write_text(case.read_text().replace("sex: female", "sex: male"))
    result = invoke(project)
    assert result.exit_code == 1
    assert "FAIL  routes/tests/adt-inbound/a01-admit.yaml" in result.output
    assert "events[0].data.patient.sex: expected 'male', got 'female'" in result.output
    assert "1 failed" in result.output.splitlines()[-1]
    only = invoke(project, "orders-inbound")  # a selection runs only that route's cases
    assert only.exit_code == 0 and "adt-inbound" not in only.output


def test_expectations_are_a_subset_match(project: Path) -> None:
    write_case(project, "adt-inbound", "subset", A01 + """
expect:
  events:
    - type: patient.admitted.v1
      data: {patient: {mrn: MRN-4711, birth_date: 1984-03-12}, encounter: {location: {room: "0712"}}}
""")
    assert invoke(project, "adt-inbound").exit_code == 0
    write_case(project, "adt-inbound", "subset", A01 + """
expect:
  events:
    - data: {patient: {mrn: MRN-4711, nickname: Annie}}
    - type: patient.admitted.v1
""")
    result = invoke(project, "adt-inbound")
    assert result.exit_code == 1
    assert "events[0].data.patient.nickname: expected 'Annie', got (missing)" in result.output
    assert "events length: expected 2, got 1" in result.output


def test_lists_match_item_by_item() -> None:
    actual = {"observations": [{"code": "a", "value": 1}, {"code": "b", "value": 2}]}
    assert subset_diff({"observations": [{"code": "a"}, {"value": 2}]}, actual) == []
    [diff] = subset_diff({"observations": [{"code": "a"}, {"code": "c"}]}, actual)
    assert (diff.path, diff.expected, diff.actual) == ("observations[1].code", "c", "b")
    [short] = subset_diff({"observations": [{"code": "a"}]}, actual)
    assert short.path == "observations length"
    assert subset_diff({"n": True}, {"n": 1})  # booleans are not numbers
    assert subset_diff({"n": 2}, {"n": 2.0}) == []


def test_error_and_filtered_expectations(project: Path) -> None:
    write_case(project, "adt-inbound", "error", """
input: ../../../samples/adt-inbound/malformed-no-msh.hl7
expect: {error: {stage: map, message: no MSH}}
""")
    write_case(project, "orders-inbound", "filtered", """
input: ../../../samples/orders-inbound/orm-o01-lipid-panel.hl7
expect: {filtered: true}
""")
    write_case(project, "adt-inbound", "events-but-error", """
input_text: "not hl7"
expect: {events: [{type: patient.admitted.v1}]}
""")
    result = invoke(project, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    failed = {c["case"]: c["differences"] for c in report["cases"] if not c["ok"]}
    assert set(failed) == {"routes/tests/adt-inbound/error.yaml", "routes/tests/orders-inbound/filtered.yaml",
                           "routes/tests/adt-inbound/events-but-error.yaml"}
    assert failed["routes/tests/adt-inbound/error.yaml"] == [
        {"path": "error.stage", "expected": "map", "actual": "parse"}]
    assert failed["routes/tests/orders-inbound/filtered.yaml"][0]["actual"] == "1 event(s)"
    assert failed["routes/tests/adt-inbound/events-but-error.yaml"][0]["actual"].startswith("error at stage parse")
    assert report["failed"] == 3 and not report["ok"]


def test_update_rewrites_the_expected_events_and_keeps_the_rest(project: Path) -> None:
    case = write_case(project, "adt-inbound", "a01-updated", "# why this case exists\n" + A01 + """
context: {correlation_id: test-1}
expect:
  events:
    - type: patient.admitted.v1
      correlationid: stale
      data: {patient: {mrn: WRONG}}
# a trailing note
""")
    assert invoke(project, "adt-inbound").exit_code == 1
    result = invoke(project, "adt-inbound", "--update")
    assert result.exit_code == 0, result.output
    assert "(updated)" in result.output
    text = case.read_text()
    assert text.startswith("# why this case exists\n") and "context: {correlation_id: test-1}" in text
    [event] = yaml.safe_load(text)["expect"]["events"]
    assert event["correlationid"] == "test-1"  # an attribute the case checked is kept, with its new value
    assert event["subject"] == "Patient/MRN-4711"
    assert event["data"]["patient"]["mrn"] == "MRN-4711" and event["data"]["encounter"]["class"] == "inpatient"
    assert invoke(project, "adt-inbound").exit_code == 0


def test_update_records_a_new_case_without_expect(project: Path) -> None:
    case = write_case(project, "orders-inbound", "new", "input: ../../../samples/orders-inbound/orm-o01-cancel.hl7\n")
    assert invoke(project, "orders-inbound").exit_code == 1  # no expectation yet
    assert invoke(project, "orders-inbound", "--update").exit_code == 0
    assert yaml.safe_load(case.read_text())["expect"] == {"filtered": True}


def test_a_malformed_case_file_is_reported_as_file_line(project: Path) -> None:
    write_case(project, "adt-inbound", "broken", A01 + "expect:\n  events: [\n")
    write_case(project, "adt-inbound", "unknown-key", A01 + "expect:\n  filtered: true\nexpcet: {}\n")
    write_case(project, "adt-inbound", "missing-input", "input: nowhere.hl7\nexpect: {filtered: true}\n")
    write_case(project, "no-such-route", "case", A01 + "expect: {filtered: true}\n")
    result = invoke(project)
    assert result.exit_code == 1
    assert "routes/tests/adt-inbound/broken.yaml:4: invalid YAML" in result.output
    assert "routes/tests/adt-inbound/unknown-key.yaml:4: unknown key 'expcet'" in result.output
    assert "routes/tests/adt-inbound/missing-input.yaml:1: cannot read input nowhere.hl7" in result.output
    assert "routes/tests/no-such-route/case.yaml:1: no route 'no-such-route'" in result.output
    assert result.output.splitlines()[-1].endswith("4 failed")


def test_unknown_route_is_one_error_line(project: Path) -> None:
    result = invoke(project, "nope")
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: no route or case file 'nope'")
