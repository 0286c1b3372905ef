"""``validation: strict``: hl7apy checks the message structure; the lenient default does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from middleware.errors import ParseError
from middleware.project import Project, check_project, load_project
from middleware.route import transform
from tests.project_copy import copy_project

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Project:
    root = tmp_path_factory.mktemp("strict")
    copy_project(root)
    for route in ("adt-inbound", "scheduling-inbound"):
        path = root / "routes" / f"{route}.yaml"
        path.write_text(path.read_text().replace("\nsource:", "\nvalidation: strict\nsource:", 1))
    return load_project(root, {})


@pytest.fixture(scope="module")
def lenient() -> Project:
    return load_project(REPO, {})


def test_conforming_messages_pass_strict(strict: Project) -> None:
    for sample in ("a01-admit.hl7", "a03-discharge.hl7", "a04-register.hl7", "a40-merge.hl7"):
        assert transform(strict.routes["adt-inbound"], (SAMPLES / "adt-inbound" / sample).read_bytes()).events


def test_structure_violation_fails_strict_at_parse_but_passes_lenient(strict: Project, lenient: Project) -> None:
    lines = (SAMPLES / "adt-inbound" / "a04-register.hl7").read_bytes().splitlines()
    no_pv1 = b"\r".join(line for line in lines if not line.startswith(b"PV1"))  # ADT_A01 requires PV1
    assert transform(lenient.routes["adt-inbound"], no_pv1).events
    with pytest.raises(ParseError, match=r"does not conform to HL7 2\.3\.1 ADT\^A04 structure") as raised:
        transform(strict.routes["adt-inbound"], no_pv1)
    assert raised.value.stage == "parse" and raised.value.route == "adt-inbound"


def test_strict_errors_never_quote_values(strict: Project) -> None:
    raw = (SAMPLES / "scheduling-inbound" / "siu-s12-cardiology.hl7").read_bytes()
    assert transform(strict.routes["scheduling-inbound"], raw).events
    bad = raw.replace(b"|30|min|", "|Müller-Lüdenscheidt|min|".encode())  # SCH-9 must be a number
    with pytest.raises(ParseError) as raised:
        transform(strict.routes["scheduling-inbound"], bad)
    assert "Müller" not in str(raised.value) and "SIU^S12" in str(raised.value)


def test_unsupported_version_says_which_are(strict: Project) -> None:
    raw = (SAMPLES / "adt-inbound" / "a01-admit.hl7").read_bytes().replace(b"|P|2.5.1|", b"|P|2.9|")
    with pytest.raises(ParseError, match=r"version 2.9 is not supported.*2\.5\.1"):
        transform(strict.routes["adt-inbound"], raw)


def test_strict_is_only_for_hl7v2(tmp_path: Path) -> None:
    copy_project(tmp_path)
    (tmp_path / "routes" / "referrals.yaml").write_text(
        "route: referrals\nvalidation: strict\nsource: {queue: rest.strict-only, format: json}\n"
        "events:\n  - type: patient.merged\n    version: 1\n    map: {patient.mrn: a, merged_mrn: b}\n")
    _, problems = check_project(tmp_path, {})
    assert [str(p) for p in problems] == [
        "routes/referrals.yaml:2: validation: strict is not available for format json (it is for hl7v2)"]
