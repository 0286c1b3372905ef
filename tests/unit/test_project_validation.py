"""`middleware validate` and the project loader: every broken config is reported as file:line: message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from middleware.cli import app
from middleware.delivery import connector_types
from middleware.errors import ConfigError
from middleware.project import load_project
from tests.project_copy import copy_project, edit, line_of, problems


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the shipped project that a test may break (other test modules import this fixture)."""
    return copy_project(tmp_path)


def test_shipped_project_is_valid(project: Path) -> None:
    assert problems(project) == []


def test_unknown_key_is_reported_with_line_and_did_you_mean(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "description:", "descriptoin:")
    assert problems(project) == [f"routes/adt-inbound.yaml:{line_of(route, 'descriptoin')}: "
                                 "unknown key 'descriptoin' (did you mean 'description'?)"]


def test_missing_key_is_reported(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "source: {queue: ehr.adt, format: hl7v2}", "source: {format: hl7v2}")
    assert problems(project) == [f"routes/adt-inbound.yaml:{line_of(route, 'source:')}: missing key: 'queue' in source"]


def test_wrong_type_is_reported(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "    version: 1\n", "    version: one\n")
    found = problems(project)
    line = line_of(route, "version: one")
    assert found == [f"routes/adt-inbound.yaml:{line}: events.0.version: expected integer, got str"]


def test_delivery_to_unknown_connector(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "- to: bed-board", "- to: bed-bord")
    assert problems(project) == [f"routes/adt-inbound.yaml:{line_of(route, 'bed-bord')}: "
                                 "no connector 'bed-bord' in connectors/ (did you mean 'bed-board'?)"]


def test_event_version_without_schema(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "    type: patient.merged\n    version: 1", "    type: patient.merged\n    version: 2")
    assert problems(project) == [f"routes/adt-inbound.yaml:{line_of(route, 'type: patient.merged')}: no schema for "
                                 "patient.merged v2: add schemas/patient.merged/2.json"]


def test_invalid_hl7_path(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "merged_mrn: {path: [\"MRG-1[5=MR].1\", MRG-1.1], required: true}",
         "merged_mrn: {path: [\"MRG-1[5=MR].1\", MRG1.1], required: true}")
    found = problems(project)
    assert len(found) == 1
    assert found[0].startswith(f"routes/adt-inbound.yaml:{line_of(route, 'MRG1.1')}: ")
    assert "MRG1.1" in found[0]


def test_duplicate_route_name(project: Path) -> None:
    shutil.copy(project / "routes" / "adt-inbound.yaml", project / "routes" / "zz-copy.yaml")
    edit(project / "routes" / "zz-copy.yaml", "queue: ehr.adt", "queue: ehr.adt.copy")
    assert problems(project) == ["routes/zz-copy.yaml:1: duplicate route name 'adt-inbound' "
                                 "(also in routes/adt-inbound.yaml:1)"]


def test_two_routes_on_one_queue(project: Path) -> None:
    shutil.copy(project / "routes" / "adt-inbound.yaml", project / "routes" / "zz-copy.yaml")
    edit(project / "routes" / "zz-copy.yaml", "route: adt-inbound", "route: adt-copy")
    assert problems(project) == ["routes/zz-copy.yaml:3: duplicate source queue 'ehr.adt' "
                                 "(also in routes/adt-inbound.yaml:1)"]


def test_unset_environment_variable(project: Path) -> None:
    connector = project / "connectors" / "case-management.yaml"
    edit(connector, "${CASE_MANAGEMENT_TOKEN:-dev-token}", "${CASE_MANAGEMENT_TOKEN}")
    assert problems(project) == [f"connectors/case-management.yaml:{line_of(connector, 'Authorization')}: "
                                 "environment variable CASE_MANAGEMENT_TOKEN is not set "
                                 "(set it, or write ${CASE_MANAGEMENT_TOKEN:-default})"]
    assert problems(project, {"CASE_MANAGEMENT_TOKEN": "s3cret"}) == []


def test_set_environment_variable_is_interpolated(project: Path) -> None:
    loaded = load_project(project, {"CASE_MANAGEMENT_URL": "http://sink.local/x"})
    assert loaded.connectors["case-management"].options["url"] == "http://sink.local/x"
    assert loaded.connectors["case-management"].options["headers"] == {"Authorization": "Bearer dev-token"}


def test_unknown_lookup_table(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "encounter.class: {path: PV1-2, lookup: patient_class}",
         "encounter.class: {path: PV1-2, lookup: patient_klass}")
    found = problems(project)
    assert found == [f"routes/adt-inbound.yaml:{line_of(route, 'patient_klass')}: encounter.class: no lookup table "
                     "'patient_klass' in config/lookups/ (known: patient_class, sex)"]


def test_unknown_connector_type_and_missing_url(project: Path) -> None:
    connector = project / "connectors" / "case-management.yaml"
    edit(connector, "type: http", "type: htp")
    found = problems(project)
    assert found == [f"connectors/case-management.yaml:{line_of(connector, 'type: htp')}: "
                     f"type: 'htp' is not one of: {', '.join(sorted(connector_types()))} (did you mean 'http'?)"]
    edit(connector, "type: htp", "type: http")
    edit(connector, "url: ", "uri: ")
    found = problems(project)
    assert f"connectors/case-management.yaml:{line_of(connector, 'uri:')}: unknown key 'uri' (did you mean 'url'?)" \
        in found
    assert "connectors/case-management.yaml:1: missing key: 'url'" in found


def test_yaml_syntax_error(project: Path) -> None:
    (project / "connectors" / "broken.yaml").write_text("connector: broken\ntype: [http\n")
    found = problems(project)
    assert found == ["connectors/broken.yaml:2: invalid YAML at column 7: the [ opened here is not closed with ] "
                     "(PyYAML stopped at line 3, column 1) (add the ], separate items with commas, or quote a value "
                     "that contains [, ], ',' or ': ')"]


def test_duplicate_yaml_key(project: Path) -> None:
    connector = project / "connectors" / "bed-board.yaml"
    connector.write_text(connector.read_text() + "path: var/out/other.jsonl\n")
    assert problems(project) == [f"connectors/bed-board.yaml:{line_of(connector, 'other.jsonl')}: duplicate key 'path'"]


def test_bad_condition_key(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "  - when: {message_type: ADT^A01}", "  - when: {mesage_type: ADT^A01}")
    found = problems(project)
    assert len(found) == 1 and found[0].startswith(f"routes/adt-inbound.yaml:{line_of(route, 'mesage_type')}: ")
    assert "unknown condition 'mesage_type'" in found[0]


def test_bad_conversion_type_and_subject_placeholder(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "patient.birth_date: {path: PID-7, as: date}", "patient.birth_date: {path: PID-7, as: dat}")
    edit(route, "subject: Patient/{patient.mrn}", "subject: Patient/{patient.id}")
    found = problems(project)
    assert f"routes/adt-inbound.yaml:{line_of(route, 'as: dat}')}: patient.birth_date: unknown type 'dat' for as: " \
           "(use string, date, datetime, int, decimal, bool)" in found
    assert f"routes/adt-inbound.yaml:{line_of(route, 'patient.id')}: subject uses {{patient.id}}, " \
           "which the map does not set" in found


def test_invalid_schema_file_and_config_key(project: Path) -> None:
    (project / "schemas" / "patient.updated" / "2.json").write_text('{"type": "object",\n "required": 5}')
    config = project / "config" / "middleware.yaml"
    edit(config, "prefetch: 20", "prefech: 20")
    found = problems(project)
    assert any(p.startswith("schemas/patient.updated/2.json:1: invalid JSON Schema") for p in found), found
    assert f"config/middleware.yaml:{line_of(config, 'prefech')}: unknown key 'prefech' " \
           "(did you mean 'prefetch'?) in engine" in found


def test_every_problem_is_reported_not_only_the_first(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "descriptio", "descriptoi")
    edit(route, "- to: bed-board", "- to: nowhere")
    edit(project / "connectors" / "bed-board.yaml", "path:", "pathh:")
    assert len(problems(project)) >= 3
    with pytest.raises(ConfigError) as raised:
        load_project(project, {})
    assert len(raised.value.problems) >= 3


def test_validate_command_exit_codes(project: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", "--project", str(project)])
    assert ok.exit_code == 0, ok.output
    connectors = len(list((project / "connectors").glob("*.yaml")))  # shipped examples come and go
    assert ok.output.startswith(f"ok: 9 route(s), {connectors} connector(s), 14 schema(s), 2 lookup table(s)")
    edit(project / "routes" / "adt-inbound.yaml", "- to: bed-board", "- to: bed-bord")
    bad = runner.invoke(app, ["validate", "--project", str(project)])
    assert bad.exit_code == 1
    assert "routes/adt-inbound.yaml:" in bad.stdout and "no connector 'bed-bord'" in bad.stdout


def test_mllp_listener_must_feed_a_route_queue_and_not_share_a_port(project: Path) -> None:
    config = project / "config" / "middleware.yaml"
    edit(config, "      queue: ehr.adt    # a route's source queue", "      queue: ehr.adt.typo")
    config.write_text(config.read_text() + "    - {name: second, port: 2575, queue: ehr.adt}\n")
    found = problems(project)
    listener_line = line_of(config, "- name: ehr-adt")
    assert found == [
        f"config/middleware.yaml:{listener_line}: ingest.mllp ehr-adt: no route consumes queue 'ehr.adt.typo' "
        "(routes consume: ehr.adt, ehr.orders, fhir.inbound, lis.results, payer.roster, rest.referrals, "
        "scheduling.siu, x12.eligibility, x12.enrolment)",
        f"config/middleware.yaml:{line_of(config, 'name: second')}: ingest.mllp second: port 2575 is already used "
        "by ehr-adt",
    ]
