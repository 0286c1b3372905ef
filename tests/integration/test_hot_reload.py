"""Hot reload on the real RabbitMQ: a valid change applies between messages (none lost, none twice), an
invalid one is refused with its file:line and the last good version keeps routing; SIGHUP and --watch."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from middleware import topology
from middleware.broker import make_broker
from middleware.engine import Engine
from middleware.ingest.publisher import Publisher
from middleware.project import load_project
from middleware.reload import Reloader
from middleware.topology import Topology

pytestmark = pytest.mark.rabbitmq

ROUTE_V1 = """route: feed
source: {queue: feed.in, format: json}
events:
  - type: feed.received
    version: 1
    map:
      record.id: {path: id, required: true}
deliver:
  - to: archive
"""
ROUTE_V2 = ROUTE_V1.replace("      record.id: {path: id, required: true}\n",
                            "      record.id: {path: id, required: true}\n      record.tag: {value: v2}\n")
ROUTE_BROKEN = ROUTE_V1.replace("    map:\n", "    mapp:\n")  # line 6: unknown key 'mapp'
SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "required": ["record"],
          "properties": {"record": {"type": "object", "required": ["id"], "properties": {
              "id": {"type": "string"}, "tag": {"type": "string"}}}}}


@pytest.fixture
async def project_dir(tmp_path: Path, amqp_url: str, queue_prefix: str) -> AsyncIterator[Path]:
    """A one-route project on RabbitMQ delivering to a file; its queues are deleted afterwards."""
    root = tmp_path / "project"
    for folder in ("config", "connectors", "routes", "schemas/feed.received"):
        (root / folder).mkdir(parents=True)
    (root / "config/middleware.yaml").write_text(
        f"broker: {{url: '{amqp_url}', queue_prefix: '{queue_prefix}'}}\n"
        "engine: {drain_timeout: 5, prefetch: 10}\njournal: {enabled: false}\n")
    (root / "connectors/archive.yaml").write_text(f"connector: archive\ntype: file\npath: {tmp_path / 'out.jsonl'}\n")
    (root / "schemas/feed.received/1.json").write_text(json.dumps(SCHEMA))
    (root / "routes/feed.yaml").write_text(ROUTE_V1)
    project = load_project(root)  # (a test leaves a broken route behind)
    yield root
    client = make_broker(amqp_url)
    await client.connect()
    await topology.delete(client, Topology.of(project.routes.values(), queue_prefix))
    await client.close()


def delivered(out: Path) -> list[dict[str, object]]:
    """The records the file sink holds, in delivery order."""
    if not out.exists():
        return []
    return [json.loads(line)["data"]["record"] for line in out.read_text().splitlines() if line.strip()]


async def wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


class Feed:
    """Publishes ``{"id": "m<n>"}`` messages continuously until stopped; remembers when each went."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.sent: list[tuple[str, float]] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping.is_set():
            name = f"m{len(self.sent)}"
            await self.publisher.publish(json.dumps({"id": name}).encode())
            self.sent.append((name, time.monotonic()))
            await asyncio.sleep(0.01)

    async def stop(self) -> set[str]:
        """Stop between two publishes (cancelling one mid-confirm would leave a delivered id out of ``sent``)."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        return {name for name, _ in self.sent}


@pytest.fixture
async def running(project_dir: Path) -> AsyncIterator[tuple[Engine, Reloader, Feed]]:
    engine = Engine(load_project(project_dir))
    await engine.start()
    reloader = Reloader(engine, project_dir)
    publisher = await Publisher.connect("feed", project=project_dir)
    feed = Feed(publisher)
    try:
        yield engine, reloader, feed
    finally:
        await feed.stop()
        await publisher.close()
        await engine.stop()


def assert_each_once(out: Path, sent: set[str]) -> list[dict[str, object]]:
    records = delivered(out)
    ids = [str(r["id"]) for r in records]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    assert set(ids) == sent
    return records


async def test_a_valid_change_applies_between_messages_without_loss_or_duplicate(
        running: tuple[Engine, Reloader, Feed], project_dir: Path, tmp_path: Path) -> None:
    engine, reloader, feed = running
    out = tmp_path / "out.jsonl"
    feed.start()
    await wait_for(lambda: len(delivered(out)) >= 30)
    (project_dir / "routes/feed.yaml").write_text(ROUTE_V2)
    assert await reloader.reload() is True
    applied = time.monotonic()
    await wait_for(lambda: sum(1 for _, at in feed.sent if at > applied) >= 30)
    sent = await feed.stop()
    await wait_for(lambda: len(delivered(out)) >= len(sent))
    records = assert_each_once(out, sent)
    after = {name for name, at in feed.sent if at > applied}
    assert all(r.get("tag") == "v2" for r in records if r["id"] in after)  # the new map, once applied
    assert any("tag" not in r for r in records)  # ... and the old one before
    assert reloader.outcomes.labels("ok")._value.get() == 1
    assert len(engine._consumers) == 2  # the new version: one inbound and one delivery consumer, no leftovers


async def test_an_invalid_change_is_refused_with_file_and_line_and_the_old_version_keeps_routing(
        running: tuple[Engine, Reloader, Feed], project_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    _, reloader, feed = running
    out = tmp_path / "out.jsonl"
    feed.start()
    await wait_for(lambda: len(delivered(out)) >= 10)
    (project_dir / "routes/feed.yaml").write_text(ROUTE_BROKEN)
    with caplog.at_level(logging.INFO, logger="middleware.reload"):
        assert await reloader.reload() is False
    refused = [r for r in caplog.records if r.getMessage().startswith("reload refused")]
    assert len(refused) == 1 and "routes/feed.yaml:6: unknown key 'mapp'" in refused[0].getMessage()
    assert reloader.outcomes.labels("refused")._value.get() == 1
    count = len(delivered(out))
    await wait_for(lambda: len(delivered(out)) >= count + 20)  # still routing, with the last good version
    sent = await feed.stop()
    await wait_for(lambda: len(delivered(out)) >= len(sent))
    assert all("tag" not in r for r in assert_each_once(out, sent))


async def test_run_watch_applies_a_change_refuses_a_broken_file_and_reloads_on_sighup(
        project_dir: Path, tmp_path: Path) -> None:
    out, log_path = tmp_path / "out.jsonl", tmp_path / "run.log"
    with log_path.open("ab") as log:
        command = [sys.executable, "-m", "middleware", "run", "--watch", "--project", str(project_dir)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)  # a file: never blocks
    try:
        await wait_for(lambda: '"engine started"' in log_path.read_text())
        async with await Publisher.connect("feed", project=project_dir) as publisher:
            feed = Feed(publisher)
            try:
                await _watch_refuse_and_sighup(process, feed, project_dir, out, log_path)
            finally:
                await feed.stop()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, log_path.read_text()[-3000:]


async def _watch_refuse_and_sighup(process: subprocess.Popen[bytes], feed: Feed, project_dir: Path, out: Path,
                                   log_path: Path) -> None:
    feed.start()
    await wait_for(lambda: len(delivered(out)) >= 10)
    (project_dir / "routes/feed.yaml").write_text(ROUTE_V2)
    await wait_for(lambda: '"reload ok"' in log_path.read_text())
    assert '"trigger": "watch"' in log_path.read_text()
    count = len(delivered(out))
    await wait_for(lambda: len(delivered(out)) >= count + 20)
    assert delivered(out)[-1].get("tag") == "v2"

    (project_dir / "routes/feed.yaml").write_text(ROUTE_BROKEN)
    await wait_for(lambda: "reload refused: routes/feed.yaml:6: unknown key 'mapp'" in log_path.read_text())
    process.send_signal(signal.SIGHUP)
    await wait_for(lambda: log_path.read_text().count("reload refused: routes/feed.yaml:6") == 2)
    assert '"trigger": "signal"' in log_path.read_text()
    count = len(delivered(out))
    await wait_for(lambda: len(delivered(out)) >= count + 20)  # the last good version still routes
    assert delivered(out)[-1].get("tag") == "v2"
    sent = await feed.stop()
    await wait_for(lambda: len(delivered(out)) >= len(sent))
    assert_each_once(out, sent)


async def test_a_new_route_and_its_queues_start_on_reload(
        running: tuple[Engine, Reloader, Feed], project_dir: Path, tmp_path: Path) -> None:
    engine, reloader, _ = running
    (project_dir / "routes/second.yaml").write_text(ROUTE_V2.replace("route: feed", "route: second")
                                                    .replace("queue: feed.in", "queue: second.in"))
    assert await reloader.reload() is True
    try:
        assert sorted(engine.project.routes) == ["feed", "second"] and len(engine._consumers) == 4
        async with await Publisher.connect("second", project=project_dir) as publisher:
            await publisher.publish(b'{"id": "s1"}')
        await wait_for(lambda: len(delivered(tmp_path / "out.jsonl")) == 1)
        assert delivered(tmp_path / "out.jsonl") == [{"id": "s1", "tag": "v2"}]
    finally:
        second = engine.project.routes["second"]
        (project_dir / "routes/second.yaml").unlink()
        assert await reloader.reload() is True  # its consumers stop before its queues go
        await topology.delete(engine.broker, Topology.of([second], engine.settings.queue_prefix))
