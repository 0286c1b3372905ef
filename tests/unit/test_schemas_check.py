"""`middleware schemas list/check` and the compatibility rules of `compatibility_problems`."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from middleware.cli import app
from middleware.schemas import compatibility_problems, required_paths

REPO = Path(__file__).resolve().parents[2]


# -- compatibility_problems: each rule flags, its allowed counterpart passes --------------------------

BASE: dict[str, Any] = {
    "$id": "urn:middleware:schema:x:1",
    "title": "x v1",
    "type": "object",
    "required": ["patient"],
    "properties": {
        "patient": {
            "type": "object",
            "required": ["mrn"],
            "properties": {
                "mrn": {"type": "string", "minLength": 1, "maxLength": 20},
                "sex": {"enum": ["male", "female"]},
                "birth_date": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
                "phone": {"type": "string"},
            },
        },
        "observations": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10,
            "items": {"type": "object", "required": ["code"],
                      "properties": {"code": {"type": "string"}, "value": {"type": "number", "minimum": 0,
                                                                           "maximum": 100}}},
        },
    },
}


def changed(**paths: Any) -> dict[str, Any]:
    """A copy of BASE with keys set (value) or deleted (None); a key is a '__'-separated path."""
    new = copy.deepcopy(BASE)
    for dotted, value in paths.items():
        *parents, last = dotted.split("__")
        node = new
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return new


def problems(new: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    return compatibility_problems(BASE if old is None else old, new)


def test_identical_schema_is_compatible() -> None:
    assert problems(copy.deepcopy(BASE)) == []


def test_annotations_may_change() -> None:
    new = changed(**{"$id": "urn:other", "title": "renamed", "description": "now described",
                     "properties__patient__properties__mrn__description": "the MRN",
                     "properties__patient__properties__mrn__examples": ["123"]})
    assert problems(new) == []


def test_removed_property_is_flagged() -> None:
    assert problems(changed(properties__patient__properties__phone=None)) == ["data.patient.phone: property removed"]


def test_new_optional_property_is_allowed() -> None:
    assert problems(changed(properties__patient__properties__email={"type": "string"})) == []


def test_new_required_property_is_flagged() -> None:
    new = changed(properties__patient__properties__email={"type": "string"},
                  properties__patient__required=["mrn", "email"])
    assert problems(new) == ["data.patient: 'email' became required"]


def test_existing_property_becoming_required_is_flagged() -> None:
    assert problems(changed(required=["patient", "observations"])) == ["data: 'observations' became required"]


def test_property_no_longer_required_is_flagged() -> None:
    assert problems(changed(properties__patient__required=[])) == [
        "data.patient: 'mrn' is no longer required"]


def test_required_order_does_not_matter() -> None:
    old = changed(required=["patient", "observations"])
    assert problems(changed(required=["observations", "patient"]), old) == []


def test_type_change_is_flagged_even_widening() -> None:
    assert problems(changed(properties__patient__properties__phone__type="integer")) == [
        "data.patient.phone: type changed from string to integer"]
    assert problems(changed(properties__patient__properties__phone__type=["string", "null"])) == [
        "data.patient.phone: type changed from string to [null, string]"]
    assert problems(changed(properties__patient__properties__phone__type=None)) == [
        "data.patient.phone: type changed from string to any"]


def test_type_as_single_item_list_is_the_same_type() -> None:
    assert problems(changed(properties__patient__properties__phone__type=["string"])) == []


def test_removed_enum_value_is_flagged() -> None:
    assert problems(changed(properties__patient__properties__sex__enum=["male"])) == [
        'data.patient.sex: enum values removed: "female"']


def test_added_enum_value_is_allowed() -> None:
    assert problems(changed(properties__patient__properties__sex__enum=["male", "female", "other"])) == []


def test_enum_added_where_none_is_flagged() -> None:
    assert problems(changed(properties__patient__properties__phone__enum=["1"])) == [
        "data.patient.phone: enum added (only the listed values are accepted now)"]


def test_enum_values_compare_by_json_type() -> None:
    old = {"enum": [1, True]}
    assert compatibility_problems(old, {"enum": [1.0, 1]}) == ["data: enum values removed: true"]


def test_pattern_added_or_changed_is_flagged() -> None:
    assert problems(changed(properties__patient__properties__phone__pattern="^\\d+$")) == [
        "data.patient.phone: pattern added"]
    assert problems(changed(properties__patient__properties__birth_date__pattern="^\\d{4}$")) == [
        'data.patient.birth_date: pattern changed from "^\\\\d{4}-\\\\d{2}-\\\\d{2}$" to "^\\\\d{4}$"']


def test_pattern_removed_is_allowed() -> None:
    assert problems(changed(properties__patient__properties__birth_date__pattern=None)) == []


def test_lower_bounds_raised_or_added_are_flagged() -> None:
    assert problems(changed(properties__patient__properties__mrn__minLength=2)) == [
        "data.patient.mrn: minLength raised from 1 to 2"]
    assert problems(changed(properties__observations__minItems=2)) == [
        "data.observations: minItems raised from 1 to 2"]
    assert problems(changed(properties__observations__items__properties__value__minimum=1)) == [
        "data.observations[].value: minimum raised from 0 to 1"]
    assert problems(changed(properties__patient__properties__phone__minLength=3)) == [
        "data.patient.phone: minLength added (3)"]


def test_lower_bounds_lowered_removed_or_neutral_are_allowed() -> None:
    assert problems(changed(properties__patient__properties__mrn__minLength=0)) == []
    assert problems(changed(properties__observations__minItems=None)) == []
    assert problems(changed(properties__observations__items__properties__value__minimum=-5)) == []
    assert problems(changed(properties__patient__properties__phone__minLength=0)) == []


def test_upper_bounds_lowered_or_added_are_flagged() -> None:
    assert problems(changed(properties__patient__properties__mrn__maxLength=10)) == [
        "data.patient.mrn: maxLength lowered from 20 to 10"]
    assert problems(changed(properties__observations__maxItems=5)) == [
        "data.observations: maxItems lowered from 10 to 5"]
    assert problems(changed(properties__observations__items__properties__value__maximum=50)) == [
        "data.observations[].value: maximum lowered from 100 to 50"]
    assert problems(changed(properties__patient__properties__phone__maxLength=30)) == [
        "data.patient.phone: maxLength added (30)"]


def test_upper_bounds_raised_or_removed_are_allowed() -> None:
    assert problems(changed(properties__patient__properties__mrn__maxLength=64)) == []
    assert problems(changed(properties__observations__maxItems=None)) == []
    assert problems(changed(properties__observations__items__properties__value__maximum=1000)) == []


def test_additional_properties_false_is_flagged() -> None:
    assert problems(changed(properties__patient__additionalProperties=False)) == [
        "data.patient.*: no longer accepts any value"]
    old = changed(properties__patient__additionalProperties=True)
    assert problems(changed(properties__patient__additionalProperties=False), old) == [
        "data.patient.*: no longer accepts any value"]


def test_additional_properties_schema_added_is_flagged() -> None:
    assert problems(changed(properties__patient__additionalProperties={"type": "string"})) == [
        "data.patient.*: type changed from any to string"]


def test_additional_properties_loosened_is_allowed() -> None:
    old = changed(properties__patient__additionalProperties=False)
    assert problems(copy.deepcopy(BASE), old) == []
    assert problems(changed(properties__patient__additionalProperties={"type": "string"}), old) == []
    assert problems(changed(properties__patient__additionalProperties=True), old) == []


def test_items_are_compared_recursively() -> None:
    assert problems(changed(properties__observations__items__properties__code__type="integer")) == [
        "data.observations[].code: type changed from string to integer"]
    assert problems(changed(properties__observations__items__required=["code", "value"])) == [
        "data.observations[]: 'value' became required"]
    assert problems(changed(properties__observations__items__properties__unit={"type": "string"})) == []


def test_items_removed_is_flagged() -> None:
    found = problems(changed(properties__observations__items=None))
    assert "data.observations[]: type changed from object to any" in found
    assert "data.observations[]: 'code' is no longer required" in found


def test_const_format_unique_items_added_are_flagged_removed_allowed() -> None:
    assert problems(changed(properties__patient__properties__phone__format="email")) == [
        "data.patient.phone: format added"]
    assert problems(changed(properties__observations__uniqueItems=True)) == ["data.observations: uniqueItems added"]
    assert problems(changed(properties__patient__properties__phone__const="1")) == ["data.patient.phone: const added"]
    old = changed(properties__patient__properties__phone__format="email")
    assert problems(copy.deepcopy(BASE), old) == []


def test_unchecked_keywords_must_stay_unchanged() -> None:
    old = changed(properties__patient__properties__phone__anyOf=[{"minLength": 1}])
    assert problems(copy.deepcopy(old), old) == []
    assert problems(changed(properties__patient__properties__phone__anyOf=[{"minLength": 2}]), old) == [
        "data.patient.phone: anyOf changed (not checked: keep it unchanged)"]
    assert problems(copy.deepcopy(BASE), old) == [
        "data.patient.phone: anyOf removed (not checked: keep it unchanged)"]
    assert problems(old) == ["data.patient.phone: anyOf added (not checked: keep it unchanged)"]


def test_every_problem_is_reported() -> None:
    new = changed(properties__patient__properties__phone=None, properties__patient__properties__mrn__minLength=5,
                  required=["patient", "observations"])
    assert problems(new) == ["data: 'observations' became required", "data.patient.mrn: minLength raised from 1 to 5",
                             "data.patient.phone: property removed"]


def test_boolean_schemas() -> None:
    assert compatibility_problems(False, {"type": "string"}) == []
    assert compatibility_problems(True, {"type": "string"}) == ["data: type changed from any to string"]
    assert compatibility_problems({"type": "string"}, False) == ["data: no longer accepts any value"]


def test_required_paths_list_leaves_of_required_chains() -> None:
    assert required_paths(BASE) == ["patient.mrn"]
    assert required_paths(changed(required=["patient", "observations"])) == ["patient.mrn", "observations[].code"]
    assert required_paths({"type": "object", "required": ["a"], "properties": {"a": {"type": "object"}}}) == ["a"]


# -- the commands ---------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the shipped project (beside a baseline copy of its schemas in tmp_path/baseline)."""
    root = tmp_path / "project"
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, root / folder)
    shutil.copytree(REPO / "schemas", tmp_path / "baseline" / "schemas")
    return root


def edit_schema(path: Path, change: Any) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document, indent=2))


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def test_help() -> None:
    for command in (["schemas"], ["schemas", "list"], ["schemas", "check"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0, result.output
    assert "--project" in invoke("schemas", "list", "--help").output
    assert "--against-dir" in invoke("schemas", "check", "--help").output


def test_check_unchanged_copy_is_ok(project: Path) -> None:
    result = invoke("schemas", "check", "--project", str(project), "--against-dir", str(project.parent / "baseline"))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: 14 schema(s) compatible with ")


def test_check_reports_incompatible_changes(project: Path) -> None:
    def narrow(doc: dict[str, Any]) -> None:
        doc["properties"]["patient"]["required"].append("phone")
        del doc["properties"]["encounter"]["properties"]["attending_doctor"]
        doc["title"] = "renamed is fine"

    edit_schema(project / "schemas" / "patient.admitted" / "1.json", narrow)
    result = invoke("schemas", "check", "-p", str(project), "--against-dir", str(project.parent / "baseline"))
    assert result.exit_code == 1
    action = "(add a new major version schemas/patient.admitted/2.json)"
    assert result.stdout.splitlines() == [
        f"schemas/patient.admitted/1.json: data.patient: 'phone' became required {action}",
        f"schemas/patient.admitted/1.json: data.encounter.attending_doctor: property removed {action}",
    ]
    assert "2 incompatible change(s)" in result.stderr


def test_check_allows_new_optional_properties_and_new_majors(project: Path) -> None:
    path = project / "schemas" / "patient.admitted" / "1.json"
    edit_schema(path, lambda doc: doc["properties"]["patient"]["properties"].update(email={"type": "string"}))
    v2 = json.loads(path.read_text())
    v2["required"].append("source")
    (path.parent / "2.json").write_text(json.dumps(v2))
    result = invoke("schemas", "check", "-p", str(project), "--against-dir", str(project.parent / "baseline"),
                    "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["compared"] == 14 and report["new"] == ["schemas/patient.admitted/2.json"]


def test_check_baseline_dir_may_be_the_schemas_folder_itself(project: Path) -> None:
    edit_schema(project / "schemas" / "order.placed" / "1.json", lambda doc: doc.update(type="array"))
    baseline = project.parent / "baseline" / "schemas"
    result = invoke("schemas", "check", "-p", str(project), "--against-dir", str(baseline))
    assert result.exit_code == 1
    assert result.stdout == ("schemas/order.placed/1.json: data: type changed from object to array "
                             "(add a new major version schemas/order.placed/2.json)\n")


def test_check_removed_major_and_invalid_json(project: Path) -> None:
    shutil.rmtree(project / "schemas" / "patient.merged")
    (project / "schemas" / "order.placed" / "1.json").write_text("{not json")
    result = invoke("schemas", "check", "-p", str(project), "--against-dir", str(project.parent / "baseline"),
                    "--json")
    assert result.exit_code == 1
    found = {(p["file"], p["message"]) for p in json.loads(result.stdout)["problems"]}
    assert found == {("schemas/order.placed/1.json", "invalid JSON at line 1: Expecting property name enclosed in "
                                                     "double quotes"),
                     ("schemas/patient.merged/1.json", "schema removed")}


def test_check_usage_errors(project: Path, tmp_path: Path) -> None:
    result = invoke("schemas", "check", "-p", str(project), "--against", "HEAD", "--against-dir", str(tmp_path))
    assert result.exit_code == 2 and result.stderr.startswith("error: use either --against REF or --against-dir")
    result = invoke("schemas", "check", "-p", str(project), "--against-dir", str(tmp_path / "nope"))
    assert result.exit_code == 2


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_check_outside_git_repository(tmp_path: Path) -> None:
    root = tmp_path / "not-a-repo"
    shutil.copytree(REPO / "schemas", root / "schemas")
    ceiling = {"GIT_CEILING_DIRECTORIES": str(tmp_path)}
    result = runner.invoke(app, ["schemas", "check", "-p", str(root)], env=ceiling)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "is not in a git repository" in result.stderr
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_check_against_git_revision(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    root = repo / "integration"  # the project is a sub-folder of the repository
    shutil.copytree(REPO / "schemas", root / "schemas")

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "baseline")
    result = invoke("schemas", "check", "-p", str(root))
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: 14 schema(s) compatible with git HEAD, 0 new\n"

    edit_schema(root / "schemas" / "patient.merged" / "1.json",
                lambda doc: doc["required"].remove("merged_mrn"))
    (root / "schemas" / "lab.cancelled").mkdir()
    (root / "schemas" / "lab.cancelled" / "1.json").write_text('{"type": "object"}')
    result = invoke("schemas", "check", "-p", str(root))
    assert result.exit_code == 1
    assert result.stdout == ("schemas/patient.merged/1.json: data: 'merged_mrn' is no longer required "
                             "(add a new major version schemas/patient.merged/2.json)\n")

    git("add", ".")
    git("commit", "-q", "-m", "breaking")
    assert invoke("schemas", "check", "-p", str(root)).exit_code == 0  # HEAD now has it
    result = invoke("schemas", "check", "-p", str(root), "--against", "HEAD~1", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["baseline"] == "git HEAD~1" and report["new"] == ["schemas/lab.cancelled/1.json"]
    assert [p["file"] for p in report["problems"]] == ["schemas/patient.merged/1.json"]
    result = invoke("schemas", "check", "-p", str(root), "--against", "no-such-ref")
    assert result.exit_code == 2 and "unknown git revision 'no-such-ref'" in result.stderr


def test_list_shows_catalogue_producers_and_unused(project: Path) -> None:
    unused = project / "schemas" / "lab.cancelled"
    unused.mkdir()
    (unused / "1.json").write_text(json.dumps({"title": "lab.cancelled v1", "type": "object", "required": ["id"]}))
    result = invoke("schemas", "list", "-p", str(project), "--json")
    assert result.exit_code == 0, result.output
    entries = {(e["type"], e["major"]): e for e in json.loads(result.stdout)}
    admitted = entries[("patient.admitted", 1)]
    assert admitted["produced_by"] == [{"route": "adt-inbound", "message_types": ["ADT^A01"], "when": "ADT^A01"}]
    assert admitted["file"] == "schemas/patient.admitted/1.json" and admitted["unused"] is False
    assert admitted["description"] == "A patient was admitted (ADT^A01)."
    assert admitted["required"] == ["patient.mrn"]  # catalogue v1: only identifiers are required
    assert entries[("result.reported", 1)]["required"] == ["patient.mrn"]  # observations[].code: optional list
    assert {p["route"] for p in entries[("result.reported", 1)]["produced_by"]} == {"fhir-inbound",
                                                                                     "results-inbound"}
    lab = entries[("lab.cancelled", 1)]
    assert lab["unused"] is True and lab["produced_by"] == [] and lab["required"] == ["id"]

    table = invoke("schemas", "list", "-p", str(project))
    assert table.exit_code == 0
    assert "unused: no route produces it" in table.stdout
    assert table.stdout.rstrip().endswith("1 unused schema(s): schemas/lab.cancelled/1.json")


def test_list_invalid_project_fails_with_one_line(project: Path) -> None:
    (project / "schemas" / "patient.admitted" / "1.json").write_text("{")
    result = invoke("schemas", "list", "-p", str(project))
    assert result.exit_code == 1 and result.stderr.startswith("error: invalid project")
