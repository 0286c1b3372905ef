"""The public Python API: a source system publishes with confirms in three lines, on RabbitMQ and
on the embedded broker, through the one Publisher every way in uses."""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import middleware
from middleware import Publisher, SyncPublisher
from middleware.broker import make_broker
from middleware.broker.base import Broker
from middleware.errors import BrokerError, ConfigError
from middleware.ingest import publisher as publisher_module
from middleware.project import Project
from middleware.topology import RouteTopology

REPO = Path(__file__).resolve().parents[2]
ADT = (b"MSH|^~\\&|EPIC|GHH|CASEMGR|GHH|20261124083000||ADT^A01|API-1|P|2.5.1\r"
       b"EVN|A01|20261124082900\rPID|1||MRN-1^^^GHH^MR||Doe^Jane||19840312|F\r")


def test_the_package_root_exports_only_the_publishers_with_docstrings_and_types() -> None:
    assert middleware.__all__ == ["Publisher", "SyncPublisher", "__version__"]
    assert Publisher is publisher_module.Publisher  # one publisher: the gateways' and the CLI's
    for exported in (Publisher, SyncPublisher, Publisher.connect, Publisher.publish, SyncPublisher.publish,
                     SyncPublisher.publish_file):
        assert inspect.getdoc(exported), f"{exported.__qualname__} has no docstring"
    hints = inspect.get_annotations(SyncPublisher.publish, eval_str=True)
    assert hints == {"raw": bytes, "source": str, "correlation_id": str | None,
                     "headers": publisher_module.Mapping[str, publisher_module.Any] | None, "return": str}
    with pytest.raises(AttributeError):
        middleware.Engine  # noqa: B018  (private: not exported)


def test_importing_a_module_does_not_load_the_publisher() -> None:
    code = "import sys, middleware.spec; assert 'middleware.ingest.publisher' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.rabbitmq
async def test_async_publisher_on_rabbitmq_declares_publishes_confirmed_and_closes(
        rabbit_env: dict[str, str], rabbit_project: Project, broker: Broker) -> None:
    async with await Publisher.connect("adt-inbound", project=REPO, env=rabbit_env) as publisher:
        correlation_id = await publisher.publish(ADT)
        kept = await publisher.publish(ADT, correlation_id="caller-chosen-1", headers={"x-site": "north"})
    assert publisher.broker.url and kept == "caller-chosen-1"
    inbound = RouteTopology.of(rabbit_project.routes["adt-inbound"], rabbit_project.settings.queue_prefix).inbound
    first, second = await broker.get(inbound), await broker.get(inbound)
    assert first is not None and second is not None
    assert (first.body, first.correlation_id, first.headers["x-mw-ingest"]) == (ADT, correlation_id, "python")
    assert first.content_type == "x-application/hl7-v2+er7"
    assert (second.correlation_id, second.headers["x-site"]) == ("caller-chosen-1", "north")
    await first.ack()
    await second.ack()
    with pytest.raises(BrokerError):  # closed on leaving the block: the connection it opened is gone
        await publisher.publish(ADT)


@pytest.mark.rabbitmq
def test_sync_publisher_on_rabbitmq_publishes_a_batch_file_one_message_per_record(
        rabbit_env: dict[str, str], rabbit_project: Project, tmp_path: Path) -> None:
    batch = tmp_path / "adt.hl7"
    batch.write_bytes(b"FHS|^~\\&|EPIC\rBHS|^~\\&|EPIC\r" + ADT + ADT.replace(b"API-1", b"API-2") + b"BTS|2\rFTS|1\r")
    with SyncPublisher("adt-inbound", project=REPO, env=rabbit_env) as publisher:
        result = publisher.publish_file(batch)
        single = publisher.publish(ADT)
    assert (result.published, result.dead_lettered, result.complete) == (2, 0, True)
    inbound = RouteTopology.of(rabbit_project.routes["adt-inbound"], rabbit_project.settings.queue_prefix).inbound

    async def drain() -> list[tuple[bytes, str | None]]:
        client = make_broker(rabbit_project.settings.broker_url)
        await client.connect()
        got = []
        try:
            while (message := await client.get(inbound)) is not None:
                got.append((message.body, message.correlation_id))
                await message.ack()
            names = RouteTopology.of(rabbit_project.routes["adt-inbound"], rabbit_project.settings.queue_prefix)
            for queue in names.queues:
                await client.delete_queue(queue)
            await client.delete_exchange(names.exchange)  # the publisher declared the route's topology
        finally:
            await client.close()
        return got

    got = asyncio.run(drain())
    assert [body for body, _ in got] == [ADT, ADT.replace(b"API-1", b"API-2"), ADT]
    assert got[2][1] == single


def test_sync_publisher_on_the_embedded_broker_in_three_lines(tmp_path: Path) -> None:
    url = f"filesystem://{tmp_path / 'broker'}"
    with SyncPublisher("adt-inbound", project=REPO, broker_url=url, env={"HTTP_INGEST_TOKEN": "t"}) as publisher:
        correlation_id = publisher.publish(ADT)

    async def take() -> tuple[bytes, str | None] | None:
        client = make_broker(url)
        await client.connect()
        try:
            message = await client.get("ehr.adt")
            if message is None:
                return None
            await message.ack()
            return message.body, message.correlation_id
        finally:
            await client.close()

    assert asyncio.run(take()) == (ADT, correlation_id)


async def test_an_unknown_route_or_an_unreachable_broker_is_a_typed_error() -> None:
    with pytest.raises(ConfigError, match=r"no route 'adt' in .* \(routes: adt-inbound, "):
        await Publisher.connect("adt", project=REPO, env={"HTTP_INGEST_TOKEN": "t"})
    with pytest.raises(BrokerError):
        await Publisher.connect("adt-inbound", project=REPO, broker_url="amqp://guest:guest@127.0.0.1:1/",
                                env={"HTTP_INGEST_TOKEN": "t"})


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    """The README's Python example, run against the embedded broker from the repository folder."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## Publishing from Python\n.*?```python\n(.*?)```", readme, flags=re.S)
    assert match, "README has no Python example under '## Publishing from Python'"
    example = match.group(1)
    assert len([line for line in example.splitlines() if line.strip() and not line.startswith("#")]) <= 4
    env = {"MIDDLEWARE_BROKER_URL": f"filesystem://{tmp_path / 'broker'}", "HTTP_INGEST_TOKEN": "t",
           "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", "hl7_bytes = " + repr(ADT) + "\n" + example], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
