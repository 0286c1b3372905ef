"""One topology object names every queue of a route; declaring, status, dlq and clean-up read it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from middleware import topology
from middleware.broker import Broker, OutgoingMessage, make_broker
from middleware.cli.demo import demo_topology
from middleware.cli.dlq import _queues as dlq_queues
from middleware.cli.status import route_queues
from middleware.engine import Engine, project_queues
from middleware.errors import BrokerError
from middleware.project import Project, load_project
from middleware.topology import RouteTopology, Topology

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {"HTTP_INGEST_TOKEN": "t"})


def test_a_route_topology_follows_the_documented_naming_rules(project: Project) -> None:
    adt = RouteTopology.of(project.routes["adt-inbound"], "P.")
    assert adt.inbound == "P.ehr.adt"
    assert adt.exchange == "P.middleware.events"
    assert dict(adt.deliveries) == {"case-management": "P.adt-inbound.to.case-management",
                                    "bed-board": "P.adt-inbound.to.bed-board"}
    assert adt.dead_letter == "P.adt-inbound.dlq"
    assert adt.binding_key == "adt-inbound.#"
    assert adt.delay("case-management", 30) == "P.adt-inbound.to.case-management.delay.30"
    assert adt.partition("bed-board", 3) == "P.adt-inbound.to.bed-board.p3"
    assert adt.delay_queues("bed-board") == [(s, f"P.adt-inbound.to.bed-board.delay.{s}") for s in (5, 30, 300, 1800)]
    assert adt.queues == ["P.ehr.adt", "P.adt-inbound.to.case-management", "P.adt-inbound.to.bed-board",
                          *(f"P.adt-inbound.to.{c}.delay.{s}" for c in ("case-management", "bed-board")
                            for s in (5, 30, 300, 1800)),
                          "P.adt-inbound.dlq"]


def test_delay_and_partition_names_only_exist_for_connectors_the_route_delivers_to(project: Project) -> None:
    adt = RouteTopology.of(project.routes["adt-inbound"])
    with pytest.raises(KeyError):
        adt.delay("no-such-connector", 5)
    with pytest.raises(KeyError):
        adt.partition("no-such-connector", 0)


def test_the_project_topology_lists_every_route_and_the_exchange_once(project: Project) -> None:
    names = Topology.of(project.routes.values(), "P.")
    assert list(names.routes) == sorted(project.routes)
    assert names.exchanges == ["P.middleware.events"]
    for name, route in project.routes.items():
        assert f"P.{route.source_queue}" in names.queues
        assert f"P.{name}.dlq" in names.queues
        for rule in route.deliver:
            assert f"P.{name}.to.{rule.connector}" in names.work_queues
    assert not any(q.endswith(".dlq") for q in names.work_queues)
    assert len(names.queues) == len(set(names.queues))


def test_status_dlq_demo_and_the_engine_read_their_queue_lists_from_the_topology(project: Project) -> None:
    names = Topology.of(project.routes.values(), project.settings.queue_prefix)
    shown = {queue.queue for route in route_queues(project) for queue in route.queues}
    assert shown == set(names.queues)
    assert dlq_queues(project, None) == [(r.route, r.dead_letter) for r in names]
    assert demo_topology(project) == (names.queues, names.exchanges)
    assert project_queues(project) == names.work_queues
    assert Engine(project, gateways=False).topology == names


@pytest.mark.rabbitmq
async def test_declare_creates_every_queue_binds_deliveries_and_delete_removes_them(project: Project, amqp_url: str,
                                                                                  queue_prefix: str) -> None:
    broker = make_broker(amqp_url)
    await broker.connect()
    names = Topology.of(project.routes.values(), queue_prefix)
    adt = names.route("adt-inbound")
    try:
        for route in names:
            await topology.declare(broker, route, delivery_limit=5)
        for queue in names.queues:
            assert (await broker.queue_info(queue)).messages == 0  # RabbitMQ: raises when it was not declared
        await broker.publish(OutgoingMessage(body=b"{}"), exchange=adt.exchange,
                             routing_key="adt-inbound.patient.admitted.v1")
        for queue in adt.deliveries.values():
            assert await _depth(broker, queue) == 1
        assert await _depth(broker, names.route("results-inbound").delivery("clinical-data-repository")) == 0
    finally:
        removed = await topology.delete(broker, names)
        await broker.close()
    assert removed == [*names.queues, *names.exchanges]
    checker = make_broker(amqp_url)
    await checker.connect()
    try:
        for queue in names.queues:
            with pytest.raises(BrokerError):
                await checker.queue_info(queue)
    finally:
        await checker.close()


async def _depth(broker: Broker, queue: str) -> int:
    for _ in range(50):
        if depth := (await broker.queue_info(queue)).messages:
            return depth
        await asyncio.sleep(0.02)
    return 0


@pytest.mark.parametrize("module", ["middleware.ingest.mllp", "middleware.ingest.publisher", "middleware.topology"])
def test_gateways_and_the_publisher_import_without_the_engine(module: str) -> None:
    """No engine <-> gateway import circle: a gateway alone never loads the engine, even when declaring."""
    code = (f"import sys, {module}; "
            "from middleware import topology; "
            "assert 'middleware.engine' not in sys.modules, 'the engine was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_no_ingest_module_imports_the_engine_even_lazily() -> None:
    """The engine starts gateways; gateways declare through the topology, never through the engine."""
    offenders = [path.name for path in sorted((REPO / "middleware" / "ingest").glob("*.py"))
                 if "middleware.engine" in path.read_text(encoding="utf-8")]
    assert offenders == []
