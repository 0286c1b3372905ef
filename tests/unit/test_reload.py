"""Hot reload without a broker: what the watcher sees, and the settings a reload cannot change."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest

from middleware.engine import Engine
from middleware.project import load_project
from middleware.reload import Reloader, snapshot

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    for folder in ("config", "connectors", "schemas", "routes"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    return tmp_path


def test_the_watcher_sees_routes_connectors_schemas_lookups_and_settings_but_not_test_cases(project_dir: Path) -> None:
    files = snapshot(project_dir)
    assert "routes/adt-inbound.yaml" in files and "connectors/bed-board.yaml" in files
    assert "schemas/patient.admitted/1.json" in files and "config/middleware.yaml" in files
    assert any(name.startswith("config/lookups/") for name in files)
    assert any(name.startswith("routes/_fragments/") for name in files)
    assert not any(name.startswith("routes/tests/") for name in files)
    (project_dir / "routes/tests/adt-inbound/new-case.yaml").write_text("input_text: x\n")
    assert snapshot(project_dir) == files  # a new test case reloads nothing
    (project_dir / "config/lookups/sex.yaml").write_text((project_dir / "config/lookups/sex.yaml").read_text() + "\n")
    assert snapshot(project_dir) != files


def test_a_reload_keeps_the_settings_that_need_a_restart_and_says_so(
        project_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = {"HTTP_INGEST_TOKEN": "t", "CASE_MANAGEMENT_URL": "http://127.0.0.1:1", "CDR_URL": "http://127.0.0.1:1"}
    running = load_project(project_dir, env)
    reloader = Reloader(Engine(running, broker=None), project_dir)
    changed = dataclasses.replace(running, settings=dataclasses.replace(
        running.settings, broker_url="amqp://elsewhere/", queue_prefix="other.", prefetch=3))
    with caplog.at_level(logging.WARNING, logger="middleware.reload"):
        kept = reloader._running_settings(changed)
    assert kept.settings.broker_url == running.settings.broker_url
    assert kept.settings.queue_prefix == running.settings.queue_prefix
    assert kept.settings.prefetch == 3  # engine settings apply
    assert caplog.records[-1].settings == ["broker_url", "queue_prefix"]  # type: ignore[attr-defined]
