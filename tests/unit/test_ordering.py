"""``ordering:`` on a deliver entry without a broker: key values and headers, validate's findings at
their line, the topology's names, and the embedded broker's clear refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from middleware import topology
from middleware.broker.kombu_broker import KombuBroker
from middleware.cli.status import route_queues
from middleware.errors import BrokerError
from middleware.ordering import UNLIMITED_DELIVERIES, Ordering, key_value, order_headers, partition_delivery_limit
from middleware.project import check_project, load_project
from middleware.route import DeliveryRule
from middleware.topology import RouteTopology, Topology

from ..ordering_kit import order_report, without_consecutive_duplicates, write_project

AMQP = {"MIDDLEWARE_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/", "ORDER_SINK_URL": "http://127.0.0.1:9/events"}
EVENT = {"subject": "Patient/P1", "data": {"patient": {"mrn": "P1", "ids": [1, 2]}, "seq": 7}}


def test_the_key_value_comes_from_the_data_or_the_subject() -> None:
    assert key_value(EVENT, "patient.mrn") == "P1"
    assert key_value(EVENT, "subject") == "Patient/P1"
    assert key_value(EVENT, "seq") == "7"
    assert key_value(EVENT, "patient.ids") == "[1,2]"
    assert key_value(EVENT, "patient.missing") == ""  # no value: every such event shares one partition
    assert key_value(EVENT, "seq.deeper") == ""


def test_each_ordering_key_gives_one_header_and_unordered_rules_none() -> None:
    rules = [DeliveryRule("a", ordering=Ordering("patient.mrn", 4)), DeliveryRule("b"),
             DeliveryRule("c", ordering=Ordering("subject"))]
    assert order_headers(rules, EVENT) == {"x-mw-order.patient.mrn": "P1", "x-mw-order.subject": "Patient/P1"}
    assert order_headers([DeliveryRule("b")], EVENT) == {}


def test_an_ordered_route_loads_with_its_ordering(tmp_path: Path) -> None:
    project = load_project(write_project(tmp_path / "p", partitions=4), AMQP)
    [rule] = project.routes["visits"].deliver
    assert rule.ordering == Ordering("patient.mrn", 4)


def test_the_topology_of_an_ordered_delivery(tmp_path: Path) -> None:
    """No delivery queue: a consistent-hash exchange and N partition queues, listed for status and clean-up."""
    project = load_project(write_project(tmp_path / "p", partitions=4), AMQP)
    everything = Topology.of(project.routes.values(), "X.")
    names = everything.route("visits")
    assert names.deliveries == {}
    assert names.partition_queues("order-sink") == [f"X.visits.to.order-sink.p{n}" for n in range(4)]
    assert names.exchanges == ["X.visits.to.order-sink.partitions"]
    assert names.work_queues == ["X.visits", *names.partition_queues("order-sink")]
    assert everything.exchanges == ["X.middleware.events", "X.visits.to.order-sink.partitions"]
    assert set(names.partition_queues("order-sink")) <= set(everything.queues)


def test_status_lists_the_partition_queues_as_the_delivery(tmp_path: Path) -> None:
    project = load_project(write_project(tmp_path / "p", partitions=3), AMQP)
    [route] = route_queues(project)
    assert [(q.queue, q.role, q.connector) for q in route.queues] == [
        ("visits", "inbound", None), *((f"visits.to.order-sink.p{n}", "delivery", "order-sink") for n in range(3)),
        ("visits.dlq", "dead-letter", None)]


def _problems(root: Path, env: dict[str, str], offline: bool = False) -> list[str]:
    _, problems = check_project(root, env, offline=offline)
    return [str(p) for p in problems]


def test_an_ordering_key_no_event_sets_is_reported_at_its_line(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p", key="patient.nhs_number")
    [problem] = _problems(root, AMQP)
    assert problem.startswith("routes/visits.yaml:12: ordering key 'patient.nhs_number' is not set by any event's map")
    assert "patient.mrn" in problem


@pytest.mark.parametrize(("block", "fragment"), [
    ("{key: patient.mrn, partitions: 0}", "partitions"),
    ("{partitions: 4}", "key"),
    ("{key: patient.mrn, hash: x}", "hash"),
])
def test_a_malformed_ordering_block_is_reported_at_its_line(tmp_path: Path, block: str, fragment: str) -> None:
    root = write_project(tmp_path / "p")
    route = root / "routes" / "visits.yaml"
    route.write_text(route.read_text().replace("{key: patient.mrn, partitions: 8}", block))
    [problem] = _problems(root, AMQP)
    assert problem.startswith("routes/visits.yaml:12") and fragment in problem


def test_the_embedded_broker_refuses_an_ordered_delivery_at_validate_but_offline_commands_work(
        tmp_path: Path) -> None:
    root = write_project(tmp_path / "p")
    embedded = {**AMQP, "MIDDLEWARE_BROKER_URL": "filesystem://var/broker"}
    [problem] = _problems(root, embedded)
    assert problem.startswith("routes/visits.yaml:12: ordering needs RabbitMQ")
    assert _problems(root, embedded, offline=True) == []  # transform and test deliver nothing


async def test_the_embedded_broker_adapter_refuses_the_consistent_hash_exchange(tmp_path: Path) -> None:
    project = load_project(write_project(tmp_path / "p"), AMQP)
    broker = KombuBroker("memory://")
    await broker.connect()
    try:
        with pytest.raises(BrokerError, match="no consistent-hash exchange") as raised:
            await topology.declare(broker, RouteTopology.of(project.routes["visits"]), 10)
        assert "amqp://" in str(raised.value.hint)
    finally:
        await broker.close()


def test_the_order_check_allows_consecutive_duplicates_only() -> None:
    published = [("A", 0), ("B", 0), ("A", 1), ("A", 2)]
    assert without_consecutive_duplicates([0, 1, 1, 2]) == [0, 1, 2]
    assert order_report(published, [("A", 0), ("A", 1), ("B", 0), ("A", 1), ("A", 2)])["out_of_order"] == []
    assert order_report(published, [("A", 0), ("A", 1), ("A", 0), ("A", 2), ("B", 0)])["out_of_order"] == ["A"]
    assert order_report(published, [("A", 0), ("A", 2), ("A", 1), ("B", 0)])["out_of_order"] == ["A"]
    assert order_report(published, [("A", 0), ("A", 1), ("A", 2)]) == {"out_of_order": ["B"], "missing": 1,
                                                                      "duplicates": 0}


def test_a_partition_queue_allows_one_return_per_hold_window_of_max_age() -> None:
    assert partition_delivery_limit(10, 24 * 3600.0) == 10 + 72 + 1  # 20-minute hold windows
    assert partition_delivery_limit(2, 3.0, hold_seconds=0.3) == 2 + 10 + 1
    assert partition_delivery_limit(10, None) == UNLIMITED_DELIVERIES  # max_age: forever
