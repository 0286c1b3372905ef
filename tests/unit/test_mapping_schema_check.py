"""Maps checked against their event's schema at load time (`middleware validate`), with file:line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from middleware.formats import get_format
from middleware.mapcheck import check_map
from middleware.mapping import LookupTable, SpecError, compile_field
from tests.project_copy import REPO, copy_project, edit, line_of, problems


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path)


def test_shipped_maps_fit_their_schemas(project: Path) -> None:
    assert problems(project) == []


def test_a_target_the_schema_does_not_declare(project: Path) -> None:
    route = project / "routes" / "orders-inbound.yaml"
    edit(route, "      order.group_id: ORC-4.1", "      order.group_idd: ORC-4.1")
    assert problems(project) == [f"routes/orders-inbound.yaml:{line_of(route, 'group_idd')}: order.group_idd: "
                                 "not a property of the event's schema (order.placed v1)"]


def test_a_conversion_that_does_not_fit_the_type(project: Path) -> None:
    route = project / "routes" / "orders-inbound.yaml"
    edit(route, "      order.group_id: ORC-4.1", "      order.group_id: {path: ORC-4.1, as: int}")
    assert problems(project) == [f"routes/orders-inbound.yaml:{line_of(route, 'order.group_id')}: order.group_id: "
                                 "as: int gives integer, the schema wants string (order.placed v1)"]


def test_a_list_into_a_text_field_and_a_list_of_objects_into_an_object(project: Path) -> None:
    route = project / "routes" / "orders-inbound.yaml"
    edit(route, "      order.group_id: ORC-4.1", '      order.group_id: "ORC[*]-4.1"')
    edit(route, "      order.tests:", "      order.name:")
    edit(route, "      order.name: {path: [OBR-4.2, RXO-1.2]}\n", "")
    found = problems(project)
    assert any("order.group_id: the path gives a list, the schema wants string" in p for p in found), found
    assert any("order.name: each gives a list, the schema wants string" in p for p in found), found


def test_lookup_values_outside_the_enum(project: Path) -> None:
    (project / "config" / "lookups" / "sex_codes.yaml").write_text(
        "description: site codes\nvalues: {F: female, M: male, X: diverse}\n")
    route = project / "routes" / "scheduling-inbound.yaml"
    edit(route, "patient.sex: {path: PID-8, lookup: sex}", "patient.sex: {path: PID-8, lookup: sex_codes}")
    assert problems(project) == [
        f"routes/scheduling-inbound.yaml:{line_of(route, 'sex_codes')}: patient.sex: lookup table 'sex_codes' gives "
        "'diverse', not in the schema's enum ('male', 'female', 'other', 'unknown') (appointment.booked v1)"]


def test_a_required_field_nobody_maps(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "      merged_mrn: {path: [\"MRG-1[5=MR].1\", MRG-1.1], required: true}\n", "")
    [problem] = problems(project)
    assert problem.startswith("routes/adt-inbound.yaml:")
    assert problem.endswith("merged_mrn: required by the schema but not mapped (patient.merged v1)")


def test_required_fields_of_list_items(project: Path) -> None:
    route = project / "routes" / "results-inbound.yaml"
    edit(route, "          code: OBX-3.1\n", "")
    [problem] = problems(project)
    assert problem.endswith("observations[].code: required by the schema but not mapped (result.reported v1)")


def test_a_template_with_unbalanced_braces_is_an_error(project: Path) -> None:
    route = project / "routes" / "orders-inbound.yaml"
    edit(route, "      order.group_id: ORC-4.1", '      order.group_id: {template: "{ORC-4.1 {ORC-4.2}"}')
    [problem] = problems(project)
    assert problem.startswith(f"routes/orders-inbound.yaml:{line_of(route, 'template')}: order.group_id: template")
    assert "unbalanced braces" in problem


def test_check_map_follows_refs_any_of_and_constants() -> None:
    schema = {"type": "object", "required": ["kind"], "$defs": {"code": {"type": "object", "properties": {
        "code": {"type": "string"}}}}, "properties": {
        "kind": {"enum": ["a", "b"]}, "count": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "coded": {"$ref": "#/$defs/code"}}}
    fmt = get_format("hl7v2")
    rules = [compile_field("kind", {"value": "c"}, fmt, {}), compile_field("count", {"path": "PID-1", "as": "int"}, fmt,
             {}), compile_field("coded.code", "PID-2", fmt, {}), compile_field("coded.name", "PID-3", fmt, {})]
    assert [m for _, m in check_map(rules, schema)] == [
        "kind: the constant gives 'c', not in the schema's enum ('a', 'b')",
        "coded.name: not a property of the event's schema"]
    table = LookupTable("flags", {"Y": True, "N": False})
    found = check_map([compile_field("kind", {"path": "PID-1", "lookup": "flags"}, fmt, {"flags": table})], schema)
    assert [m for _, m in found] == ["kind: lookup 'flags' gives boolean, the schema wants string"]


def test_template_checks_at_compile_time() -> None:
    fmt = get_format("hl7v2")
    for text in ["{TXA-5.3 {TXA-5.2}", "{PID-5.1}}", "name: {}"]:
        with pytest.raises(SpecError, match="unbalanced braces"):
            compile_field("t", {"template": text}, fmt, {})
    assert compile_field("t", {"template": "{PID-5.2} {PID-5.1}"}, fmt, {}).template is not None


def test_schema_files_stay_valid_json() -> None:
    for path in (REPO / "schemas").glob("*/1.json"):
        json.loads(path.read_text())


def test_transform_and_test_need_no_connector_secrets(project: Path) -> None:
    """They deliver nothing, so an unset ${VAR} of a connector does not stop them (it still stops validate)."""
    connector = project / "connectors" / "case-management.yaml"
    edit(connector, "Bearer ${CASE_MANAGEMENT_TOKEN:-dev-token}", "Bearer ${CASE_MANAGEMENT_SECRET_TOKEN}")
    assert problems(project) == [f"connectors/case-management.yaml:{line_of(connector, 'Bearer')}: environment "
                                 "variable CASE_MANAGEMENT_SECRET_TOKEN is not set (set it, or write "
                                 "${CASE_MANAGEMENT_SECRET_TOKEN:-default})"]
    env = {k: v for k, v in os.environ.items() if k != "CASE_MANAGEMENT_SECRET_TOKEN"}
    sample = REPO / "samples" / "adt-inbound" / "a01-admit.hl7"
    transform = subprocess.run([sys.executable, "-m", "middleware", "transform", "--project", str(project),
                                "adt-inbound", str(sample)], capture_output=True, env=env, timeout=120, check=False)
    assert transform.returncode == 0, transform.stderr
    assert json.loads(transform.stdout)["type"] == "patient.admitted.v1"
    shutil.copytree(REPO / "samples" / "adt-inbound", project / "samples" / "adt-inbound")
    test = subprocess.run([sys.executable, "-m", "middleware", "test", "--project", str(project), "adt-inbound"],
                          capture_output=True, env=env, timeout=120, check=False)
    assert test.returncode == 0, test.stdout
    validate = subprocess.run([sys.executable, "-m", "middleware", "validate", "--project", str(project)],
                              capture_output=True, env=env, timeout=120, check=False)
    assert validate.returncode == 1 and b"CASE_MANAGEMENT_SECRET_TOKEN" in validate.stdout + validate.stderr
