"""Fixtures for end-to-end tests: a real local HTTP sink, the engine on the real RabbitMQ, CLI runs."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest

from middleware import topology
from middleware.broker import make_broker
from middleware.broker.base import Broker, Consumer, Handler, IncomingMessage
from middleware.engine import Engine
from middleware.project import Project, load_project
from middleware.topology import Topology

from ..conftest import Sink
from ..project_copy import copy_project

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def rabbit_env(amqp_url: str, queue_prefix: str, sink: Sink, tmp_path: Path) -> dict[str, str]:
    """Environment pointing the shipped project at the real RabbitMQ, a per-test prefix and the sink."""
    return {**os.environ, "MIDDLEWARE_BROKER_URL": amqp_url, "MIDDLEWARE_QUEUE_PREFIX": queue_prefix,
            "CASE_MANAGEMENT_URL": sink.url, "CDR_URL": sink.url,
            "MLLP_PORT": "0", "METRICS_PORT": "0", "HTTP_INGEST_PORT": "0",  # 0: any free port
            "HTTP_INGEST_TOKEN": "integration-test-token",  # the shipped ingest.http listener needs one to start
            "BED_BOARD_PATH": str(tmp_path / "bed-board.jsonl"),
            "EVENT_ARCHIVE_PATH": str(tmp_path / "event-archive.jsonl"),
            "AUDIT_LOG": str(tmp_path / "audit.log"),  # dlq commands audit here, not in the repository
            "MIDDLEWARE_JOURNAL_URL": f"sqlite:///{tmp_path / 'journal.db'}",  # the engine's journal, per test
            "MIDDLEWARE_INGEST_LEDGER": str(tmp_path / "ingest")}  # publish's ledger of files: per test


@pytest.fixture
def rabbit_project(rabbit_env: dict[str, str], tmp_path: Path) -> Project:
    """The shipped project on RabbitMQ, fast http retries, file connectors writing into tmp_path."""
    project = load_project(REPO, rabbit_env)
    connectors = {}
    for name, spec in project.connectors.items():
        if spec.type == "http":
            spec = dataclasses.replace(spec, retry=dataclasses.replace(spec.retry, initial=0.05, max=0.2, jitter=0.0))
        elif spec.type == "file":
            spec = dataclasses.replace(spec, options={"path": str(tmp_path / f"{name}.jsonl")})
        connectors[name] = spec
    routes = {name: dataclasses.replace(r, deliver=tuple(dataclasses.replace(d, retry=None) for d in r.deliver))
              for name, r in project.routes.items()}
    return dataclasses.replace(project, connectors=connectors, routes=routes)


@pytest.fixture
async def broker(rabbit_project: Project) -> AsyncIterator[Broker]:
    """A second connection for the test to inspect queues; deletes the project's queues afterwards."""
    client = make_broker(rabbit_project.settings.broker_url)
    await client.connect()
    yield client
    await topology.delete(client, Topology.of(rabbit_project.routes.values(), rabbit_project.settings.queue_prefix))
    await client.close()


@pytest.fixture
async def engine(rabbit_project: Project, broker: Broker) -> AsyncIterator[Engine]:
    running = Engine(rabbit_project)
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
def cli(rabbit_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``middleware ...`` as a separate process, as an operator or source system would."""

    def invoke(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "middleware", *args, "--project", str(REPO)],
                                env=rabbit_env, capture_output=True, text=True, timeout=60)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    return invoke


def adt_project(root: Path, env: Mapping[str, str], deliver: str,
                connectors: Mapping[str, str] | None = None) -> Project:
    """The shipped project copied under ``root`` with adt-inbound's ``deliver:`` block replaced by
    ``deliver`` (and ``connectors``: file name -> YAML, written into connectors/), loaded with ``env``:
    only that route, no gateways (the test publishes itself)."""
    copy_project(root)
    route = root / "routes" / "adt-inbound.yaml"
    text = route.read_text()
    route.write_text(text[:text.index("\ndeliver:")] + deliver)
    for name, yaml in (connectors or {}).items():
        (root / "connectors" / name).write_text(yaml)
    loaded = load_project(root, env)
    return dataclasses.replace(loaded, settings=dataclasses.replace(loaded.settings, ingest={}),
                               routes={"adt-inbound": loaded.routes["adt-inbound"]})


async def one_dead_letter(broker: Broker, queue: str, timeout: float = 20.0) -> IncomingMessage:
    """The first message that arrives in dead-letter queue ``queue`` (unsettled: the test acks it)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await broker.get(queue)
        if message is not None:
            return message
        assert time.monotonic() < deadline, f"nothing dead-lettered into {queue}"
        await asyncio.sleep(0.05)


async def counting_consumer(broker: Broker, queue: str, handler: Handler) -> tuple[Consumer, list[int]]:
    """Consume ``queue`` one message at a time through ``handler`` (a worker's ``handle``), recording each
    delivery's ``delivery_count``: how often the broker counted a message returned (handed back: 0)."""
    counts: list[int] = []

    async def handle(message: IncomingMessage) -> None:
        counts.append(message.delivery_count)
        await handler(message)

    return await broker.consume(queue, handle, prefetch=1), counts
