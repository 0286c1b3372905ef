"""`middleware transform` and the CLI surface, run as a user would: a separate process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "adt-inbound"


def middleware(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "middleware", *args], cwd=REPO, input=stdin,
                          capture_output=True, timeout=60)


def test_transform_prints_events_as_json_lines() -> None:
    result = middleware("transform", "adt-inbound", str(SAMPLES / "a01-admit.hl7"))
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.decode().splitlines()
    event = json.loads(line)
    assert event["type"] == "patient.admitted.v1"
    assert event["data"]["patient"]["mrn"] == "MRN-4711"
    assert result.stderr == b""


def test_transform_takes_a_route_file_and_stdin() -> None:
    raw = (SAMPLES / "a40-merge.hl7").read_bytes()
    result = middleware("transform", "routes/adt-inbound.yaml", "-", stdin=raw)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"]["merged_mrn"] == "MRN-4799"


@pytest.mark.parametrize(("sample", "stage"), [("malformed-no-msh.hl7", "parse")])
def test_transform_bad_input_exits_1_with_one_error_line(sample: str, stage: str) -> None:
    result = middleware("transform", "adt-inbound", str(SAMPLES / sample))
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {stage}: "), lines


def test_transform_mapping_and_validation_errors_name_their_stage(tmp_path: Path) -> None:
    bad_class = tmp_path / "bad-class.hl7"
    bad_class.write_bytes((SAMPLES / "a01-admit.hl7").read_bytes().replace(b"PV1|1|I|", b"PV1|1|Z|"))
    result = middleware("transform", "adt-inbound", str(bad_class))
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode().startswith("error: map: rule patient.admitted.v1: encounter.class")
    no_birth_date = tmp_path / "no-dob.hl7"
    no_birth_date.write_bytes((SAMPLES / "a01-admit.hl7").read_bytes().replace(b"|19840312|", b"||"))
    assert middleware("transform", "adt-inbound", str(no_birth_date)).returncode == 0  # optional in the catalogue
    strict = tmp_path / "project"  # a project whose patient.admitted schema requires a birth date
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, strict / folder)
    schema_file = strict / "schemas" / "patient.admitted" / "1.json"
    schema = json.loads(schema_file.read_text())
    schema["properties"]["patient"]["required"].append("birth_date")
    schema_file.write_text(json.dumps(schema))
    result = middleware("transform", "--project", str(strict), "adt-inbound", str(no_birth_date))
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode().startswith("error: validate: patient.admitted v1 data does not match")
    assert len(result.stderr.decode().splitlines()) == 1


def test_transform_unknown_route_and_missing_file() -> None:
    result = middleware("transform", "no-such-route", str(SAMPLES / "a01-admit.hl7"))
    assert result.returncode == 1
    assert result.stderr.decode().startswith("error: no route 'no-such-route'")
    result = middleware("transform", "adt-inbound", "does-not-exist.hl7")
    assert result.returncode == 1 and result.stderr.decode().startswith("error: cannot read does-not-exist.hl7")


def test_every_command_has_help() -> None:
    commands = ("run", "demo", "publish", "validate", "transform", "test", "status", "dlq list", "dlq show",
                "dlq replay", "dlq purge", "dlq export", "schemas list", "schemas check")
    for command in commands:
        result = middleware(*command.split(), "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert b"--project" in result.stdout
