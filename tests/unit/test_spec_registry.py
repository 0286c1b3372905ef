"""The component registry: each connector, format and gateway declares its keys beside its code;
``validate`` and the docs' key tables come from those specs; third-party components plug in
through the same entry points as the built-ins."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from middleware import spec
from middleware.delivery.base import ConnectorSpec, connector_types, make_connector
from middleware.delivery.file import FileConnector
from middleware.delivery.http import HttpConnector
from middleware.formats import format_names
from middleware.project import check_project

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the shipped project that a test may break."""
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, tmp_path / "project" / folder)
    return tmp_path / "project"


def line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def problems(project: Path) -> list[str]:
    return [str(p) for p in check_project(project, {"HTTP_INGEST_TOKEN": "t"})[1]]


def test_built_in_components_are_found_through_their_entry_points() -> None:
    assert {"http", "file"} <= set(connector_types())
    assert {"hl7v2", "fhir", "json"} <= set(format_names())
    assert spec.component("connector", "http").factory is HttpConnector
    assert spec.component("connector", "file").factory is FileConnector
    assert "url" in spec.component("connector", "http").required


def test_an_http_connector_with_a_file_key_fails_validation_at_its_line(project: Path) -> None:
    connector = project / "connectors" / "case-management.yaml"
    connector.write_text(connector.read_text() + "path: var/out/oops.jsonl\n")
    assert problems(project) == [f"connectors/case-management.yaml:{line_of(connector, 'path:')}: "
                                 "unknown key 'path' (a key of type: file)"]


def test_a_file_connector_with_an_http_key_fails_validation_at_its_line(project: Path) -> None:
    connector = project / "connectors" / "bed-board.yaml"
    connector.write_text(connector.read_text() + "url: http://127.0.0.1:9/events\n")
    assert problems(project) == [f"connectors/bed-board.yaml:{line_of(connector, 'url:')}: "
                                 "unknown key 'url' (a key of type: http)"]


def test_a_key_of_the_type_is_required_by_its_own_spec(project: Path) -> None:
    connector = project / "connectors" / "bed-board.yaml"
    connector.write_text(re.sub(r"(?m)^path:.*\n", "", connector.read_text()))
    assert problems(project) == ["connectors/bed-board.yaml:1: missing key: 'path'"]


def test_a_route_source_key_no_format_declares_is_refused(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    route.write_text(route.read_text().replace("source: {queue: ehr.adt, format: hl7v2}",
                                               "source: {queue: ehr.adt, format: hl7v2, colour: blue}"))
    assert problems(project) == [f"routes/adt-inbound.yaml:{line_of(route, 'source:')}: unknown key 'colour' "
                                 "in source"]


def test_a_source_key_of_another_format_names_that_format(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    route.write_text(route.read_text().replace("source: {queue: ehr.adt, format: hl7v2}",
                                               "source: {queue: ehr.adt, format: hl7v2, delimiter: ';'}"))
    assert problems(project) == [f"routes/adt-inbound.yaml:{line_of(route, 'source:')}: unknown key 'delimiter' "
                                 "(a key of format: csv) in source"]


def test_registering_another_factory_under_a_taken_name_is_refused() -> None:
    with pytest.raises(spec.RegistryError, match="registered twice"):
        spec.register("connector", "http", None, FileConnector)
    with pytest.raises(spec.RegistryError, match="unknown component kind"):
        spec.register("output", "x", None, FileConnector)


def test_the_key_table_lists_each_key_with_type_default_and_meaning() -> None:
    table = spec.key_table(spec.component("connector", "http"))
    assert "| `url` | string | required | `http://` or `https://` endpoint" in table
    assert "| `method` | `POST` \\| `PUT` \\| `PATCH` | `POST` |" in table


def test_the_docs_key_tables_are_the_ones_the_specs_print() -> None:
    """docs/ holds the generated tables between markers; regenerate with python -m middleware.spec --markdown."""
    docs = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").glob("*.md")))
    blocks = dict(re.findall(r"<!-- spec:([\w.]+) -->\n(.*?)<!-- /spec:\1 -->", docs, flags=re.S))
    assert {"connector", "ingest.mllp"} <= set(blocks), "docs/ lack a <!-- spec:... --> block"
    for selector, text in blocks.items():
        assert text == spec.markdown(selector), \
            f"docs' {selector} tables are stale: python -m middleware.spec --markdown --kind {selector}"


THIRD_PARTY = '''
from middleware.delivery.base import Connector, register

SPEC = {"type": "object", "required": ["topic"],
        "properties": {"topic": {"type": "string", "description": "where the pager sends"}}}


@register("pager", SPEC)
class PagerConnector(Connector):
    """A third-party connector type: registered through its own entry point."""
'''


def _third_party(tmp_path: Path) -> dict[str, str]:
    """A package installed the lightest real way: a module and its .dist-info (entry_points.txt) on sys.path."""
    site = tmp_path / "site"
    (site / "mw_pager-1.0.dist-info").mkdir(parents=True)
    (site / "mw_pager.py").write_text(THIRD_PARTY)
    (site / "mw_pager-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mw-pager\nVersion: 1.0\n")
    (site / "mw_pager-1.0.dist-info" / "entry_points.txt").write_text("[middleware.connectors]\npager = mw_pager\n")
    return {**os.environ, "PYTHONPATH": str(site), "HTTP_INGEST_TOKEN": "t"}


def test_a_third_party_connector_registered_by_entry_point_is_found_validated_and_built(tmp_path: Path,
                                                                                       project: Path) -> None:
    env = _third_party(tmp_path)
    listed = subprocess.run([sys.executable, "-m", "middleware.spec"], env=env, capture_output=True, text=True,
                            check=True).stdout
    connectors = next(line for line in listed.splitlines() if line.startswith("connector: "))
    assert {"file", "http", "pager"} <= set(connectors.removeprefix("connector: ").split(", "))
    (project / "connectors" / "pager.yaml").write_text("connector: pager\ntype: pager\nchannel: ops\n")
    run = subprocess.run([sys.executable, "-m", "middleware", "validate", "--project", str(project)], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert "connectors/pager.yaml:3: unknown key 'channel'" in run.stdout + run.stderr
    assert "connectors/pager.yaml:1: missing key: 'topic'" in run.stdout + run.stderr
    code = ("from middleware.delivery.base import ConnectorSpec, make_connector; "
            "c = make_connector(ConnectorSpec('p', 'pager', {'topic': 'ops'})); "
            "print(type(c).__module__, type(c).__name__)")
    built = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert built.stdout.split() == ["mw_pager", "PagerConnector"]


def test_without_its_entry_point_the_third_party_type_is_unknown() -> None:
    with pytest.raises(KeyError):
        make_connector(ConnectorSpec("p", "pager", {"topic": "ops"}))


ECHO_GATEWAY = '''
from middleware.ingest import GatewayContext, register

SPEC = {"type": "object", "required": ["note"],
        "properties": {"name": {"type": "string"}, "note": {"type": "string", "description": "what it says"}}}


class EchoGateway:
    """A third-party gateway: the engine starts it like MLLP and HTTP, through the registry."""

    def __init__(self, listener, context):
        self.listener, self.context, self.port, self.started = listener, context, 0, False

    async def start(self, *, declare=True):
        self.started = True

    async def stop(self):
        self.started = False


@register("echo", SPEC)
def make(listener, context):
    return EchoGateway(listener, context)
'''

START_ENGINE = '''
import asyncio, sys
from middleware.broker import make_broker
from middleware.engine import Engine
from middleware.project import load_project

async def main():
    project = load_project(sys.argv[1])
    engine = Engine(project, broker=make_broker("memory://"))
    await engine.start()
    for gateway in engine.gateways:
        print(type(gateway).__name__, getattr(gateway, "started", True), getattr(gateway, "listener", {}))
    await engine.stop()

asyncio.run(main())
'''


def test_a_third_party_gateway_is_validated_by_its_spec_and_started_by_the_engine(tmp_path: Path,
                                                                                 project: Path) -> None:
    env = _third_party(tmp_path)
    site = Path(env["PYTHONPATH"])
    (site / "mw_echo.py").write_text(ECHO_GATEWAY)
    (site / "mw_pager-1.0.dist-info" / "entry_points.txt").write_text("[middleware.ingest]\necho = mw_echo\n")
    env.update(HTTP_INGEST_PORT="0", MLLP_PORT="0")
    config = project / "config" / "middleware.yaml"
    config.write_text(config.read_text().replace("ingest:\n", "ingest:\n  echo:\n    - {name: e1, nots: hi}\n", 1))
    run = subprocess.run([sys.executable, "-m", "middleware", "validate", "--project", str(project)], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert f"config/middleware.yaml:{line_of(config, 'nots:')}: unknown key 'nots'" in run.stdout + run.stderr
    config.write_text(config.read_text().replace("nots: hi", "note: hi"))
    started = subprocess.run([sys.executable, "-c", START_ENGINE, str(project)], env=env, capture_output=True,
                             text=True, check=True).stdout.splitlines()
    assert [line.split()[0] for line in started] == ["EchoGateway", "HttpGateway", "MllpGateway"]
    assert started[0].startswith("EchoGateway True {'name': 'e1', 'note': 'hi', 'file': 'config/middleware.yaml'")
