"""Hot reload without a broker: what the watcher sees, and the settings a reload cannot change."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest

from middleware.engine import Engine
from middleware.ingest.publisher import Publisher
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


async def test_on_the_in_memory_broker_a_change_applies_mid_flow_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    """The swap on the kombu adapter: every message routed once, the new map after the reload, and a
    broken route leaves the running version in place (RabbitMQ: tests/integration/test_hot_reload.py)."""
    root, out = tmp_path / "project", tmp_path / "out.jsonl"
    (root / "schemas/feed.received").mkdir(parents=True)
    (root / "config").mkdir()
    (root / "routes").mkdir()
    (root / "connectors").mkdir()
    (root / "config/middleware.yaml").write_text("broker: {url: 'memory://'}\njournal: {enabled: false}\n")
    (root / "connectors/archive.yaml").write_text(f"connector: archive\ntype: file\npath: {out}\n")
    (root / "schemas/feed.received/1.json").write_text(
        '{"type": "object", "properties": {"id": {"type": "string"}, "tag": {"type": "string"}}}')
    route = ("route: feed\nsource: {queue: feed.in, format: json}\nevents:\n  - type: feed.received\n"
             "    version: 1\n    map:\n      id: id\ndeliver:\n  - to: archive\n")
    (root / "routes/feed.yaml").write_text(route)
    engine = Engine(load_project(root), gateways=False)
    await engine.start()
    reloader = Reloader(engine, root)
    publisher = Publisher(engine.broker, engine.project.routes["feed"], engine.project.settings)

    async def publish(first: int, count: int) -> None:
        for n in range(first, first + count):
            await publisher.publish(json.dumps({"id": f"m{n}"}).encode())

    def events() -> list[dict[str, str]]:
        return [json.loads(line)["data"] for line in out.read_text().splitlines()] if out.exists() else []

    try:
        flow = asyncio.create_task(publish(0, 50))
        await asyncio.sleep(0.05)
        (root / "routes/feed.yaml").write_text(route.replace("id: id\n", "id: id\n      tag: {value: v2}\n"))
        assert await reloader.reload() is True
        await flow
        await publish(50, 10)  # after the reload returned
        (root / "routes/feed.yaml").write_text(route.replace("map:", "mapp:"))
        assert await reloader.reload() is False
        await publish(60, 10)
        for _ in range(250):
            if len(events()) >= 70:
                break
            await asyncio.sleep(0.02)
    finally:
        await engine.stop()
    ids = [e["id"] for e in events()]
    assert sorted(ids) == sorted(f"m{n}" for n in range(70)) and len(set(ids)) == 70
    assert all(e.get("tag") == "v2" for e in events() if int(e["id"][1:]) >= 50)
    assert reloader.outcomes.labels("ok")._value.get() == 1 and reloader.outcomes.labels("refused")._value.get() == 1
