"""mllp and amqp connector files through ``middleware validate``: the shipped example is valid, and bad keys,
templates and TLS combinations are reported at their file:line; the loader resolves tls to TlsOptions."""

from __future__ import annotations

from pathlib import Path

import pytest

from middleware.project import load_project
from middleware.tls import TlsOptions
from tests.project_copy import copy_project, edit, line_of, problems

MLLP = "connectors/bed-board-mllp.yaml"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the shipped project that a test may break."""
    return copy_project(tmp_path / "project")


def test_the_shipped_mllp_example_is_valid_and_reads_its_host_and_port_from_the_environment(project: Path) -> None:
    assert problems(project) == []
    loaded = load_project(project, {"BED_BOARD_MLLP_HOST": "bedboard.example.org", "BED_BOARD_MLLP_PORT": "2590"})
    spec = loaded.connectors["bed-board-mllp"]
    assert (spec.type, spec.options["host"], spec.options["port"]) == ("mllp", "bedboard.example.org", 2590)


def test_a_bad_template_target_is_reported_at_the_templates_line(project: Path) -> None:
    path = project / MLLP
    edit(path, "PID-13: null", "PID13: null")
    [found] = problems(project)
    assert found.startswith(f"{MLLP}:{line_of(path, 'templates:')}: templates: 'PID13' is not an HL7 target path")


def test_a_port_out_of_range_and_an_unknown_charset_are_reported(project: Path) -> None:
    path = project / MLLP
    edit(path, "port: ${BED_BOARD_MLLP_PORT:-2576}", "port: 70000\ncharset: EBCDIC")
    found = problems(project)
    assert any(f.startswith(f"{MLLP}:{line_of(path, 'port: 70000')}:") for f in found), found
    assert any(f.startswith(f"{MLLP}:{line_of(path, 'charset:')}:") for f in found), found


def test_an_amqp_connector_with_tls_on_a_plain_url_is_reported_and_tls_resolves(project: Path) -> None:
    path = project / "connectors" / "bus.yaml"
    path.write_text("connector: bus\ntype: amqp\nurl: amqp://guest:guest@127.0.0.1/\nexchange: x\n"
                    "tls: {verify: false}\n")
    assert problems(project) == [f"connectors/bus.yaml:{line_of(path, 'tls:')}: tls is set but url "
                                 "amqp://***@127.0.0.1/ is plain amqp://: use amqps://"]
    edit(path, "amqp://guest", "amqps://guest")
    assert problems(project) == []
    assert load_project(project, {}).connectors["bus"].options["tls"] == TlsOptions(verify=False)
