"""`middleware schema-of`: JSON Schemas for editors, generated from the component specs, shipped in the
package, referenced by every shipped YAML file, and valid for all of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator
from typer.testing import CliRunner

from middleware.cli import app
from middleware.editor_schema import KINDS, render, schema_of, shipped

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {
    "route": sorted((REPO / "routes").glob("*.yaml")),
    "fragment": sorted((REPO / "routes" / "_fragments").glob("*.yaml")),
    "connector": sorted((REPO / "connectors").glob("*.yaml")),
    "config": [REPO / "config" / "middleware.yaml"],
    "lookup": sorted((REPO / "config" / "lookups").glob("*.yaml")),
}


@pytest.mark.parametrize("kind", KINDS)
def test_the_shipped_schema_is_the_generated_one(kind: str) -> None:
    assert shipped(kind).read_text(encoding="utf-8") == render(kind), (
        f"{shipped(kind).relative_to(REPO)} is stale: run .venv/bin/python -m middleware.editor_schema --write")
    Draft7Validator.check_schema(schema_of(kind))


def test_schema_of_prints_it_and_refuses_unknown_kinds() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["schema-of", "connector"])
    assert result.exit_code == 0 and json.loads(result.stdout) == schema_of("connector")
    assert runner.invoke(app, ["schema-of", "routes"]).exit_code == 1


@pytest.mark.parametrize(("kind", "path"), [(k, p) for k, paths in SHIPPED.items() for p in paths],
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_shipped_yaml_file_names_its_schema_and_is_valid_against_it(kind: str, path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    schema_file = shipped(kind)
    up = "../../" if kind in ("fragment", "lookup") else "../"
    modeline = f"# yaml-language-server: $schema={up}middleware/specs/{schema_file.name}"
    assert modeline in text.splitlines()
    assert (path.parent / modeline.split("=", 1)[1]).resolve() == schema_file
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in Draft7Validator(schema_of(kind)).iter_errors(
        yaml.safe_load(text))]
    assert errors == []


def test_the_editor_schema_catches_what_validate_catches() -> None:
    route = yaml.safe_load((REPO / "routes" / "adt-inbound.yaml").read_text())
    validator = Draft7Validator(schema_of("route"))
    route["events"][0]["mapp"] = route["events"][0].pop("map")
    route["filter"] = {"message_typ": "ADT^A01"}
    route["events"][1]["map"]["patient.sex"] = {"path": "PID-8", "as": "sex"}
    found = sorted(e.message for e in validator.iter_errors(route))
    assert any("'mapp' was unexpected" in m for m in found)
    assert any("'message_typ' was unexpected" in m for m in found)
    assert "{'path': 'PID-8', 'as': 'sex'} is not valid under any of the given schemas" in found
    connector = yaml.safe_load((REPO / "connectors" / "case-management.yaml").read_text())
    connector["timeout"] = "${TIMEOUT:-5}"  # a ${VAR} goes where a number goes
    assert list(Draft7Validator(schema_of("connector")).iter_errors(connector)) == []
    connector["timeout"] = "soon"
    assert list(Draft7Validator(schema_of("connector")).iter_errors(connector))
