"""Ordered deliveries on the real RabbitMQ (``ordering:`` on a deliver entry): per-key order at a
real local sink, a failing event blocks only its partition and is never overtaken, bounded waits,
and three ``middleware run`` processes with one SIGKILLed mid-run."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from middleware import ordering, topology
from middleware.broker import make_broker
from middleware.broker.base import Broker
from middleware.deadletter import DeadLetter
from middleware.engine import Engine
from middleware.project import Project, load_project
from middleware.topology import RouteTopology, Topology

from ..ordering_kit import OrderSink, order_report, publish_visits, start_engine, visits, write_project

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def order_sink() -> AsyncIterator[OrderSink]:
    sink = OrderSink()
    await sink.start()
    yield sink
    await sink.stop()


@pytest.fixture
def order_env(amqp_url: str, queue_prefix: str, order_sink: OrderSink) -> dict[str, str]:
    return {"MIDDLEWARE_BROKER_URL": amqp_url, "MIDDLEWARE_QUEUE_PREFIX": queue_prefix,
            "ORDER_SINK_URL": order_sink.url}


@pytest.fixture
async def client(amqp_url: str) -> AsyncIterator[Broker]:
    broker = make_broker(amqp_url)
    await broker.connect()
    yield broker
    await broker.close()


async def _cleanup(broker: Broker, project: Project) -> None:
    await topology.delete(broker, Topology.of(project.routes.values(), project.settings.queue_prefix))


async def _dead_letters(broker: Broker, queue: str) -> list[DeadLetter]:
    letters = []
    while (message := await broker.get(queue)) is not None:
        letters.append(DeadLetter.from_message(message))
        await message.ack()
    return letters


async def _run_in_process(project: Project, client: Broker, items: list[tuple[str, int]], sink: OrderSink,
                          timeout: float = 30, wait_for: list[tuple[str, int]] | None = None) -> RouteTopology:
    """Start an engine, publish ``items``, wait until the sink accepted ``wait_for`` (default: all), stop."""
    engine = Engine(project, gateways=False)
    await engine.start()
    names = engine.topology.route("visits")
    try:
        await publish_visits(client, names.inbound, items)
        await sink.wait_for(items if wait_for is None else wait_for, timeout=timeout)
    finally:
        await engine.stop()
    return names


async def test_per_key_order_and_a_failing_event_blocks_only_its_partition(
        tmp_path: Path, order_env: dict[str, str], order_sink: OrderSink, client: Broker) -> None:
    project = load_project(write_project(tmp_path / "p", partitions=8), order_env)
    items = visits(patients=12, per_patient=10)
    started = asyncio.get_running_loop().time()

    def others_blocked() -> bool:  # 503 for P000's 4th event until half the patients are done (30 s at most)
        done = {mrn for mrn, seq in order_sink.accepted if seq == 9}
        return len(done) < 6 and asyncio.get_running_loop().time() - started < 30

    order_sink.fail_while[("P000", 3)] = others_blocked
    try:
        await _run_in_process(project, client, items, order_sink, timeout=60)
        report = order_report(items, order_sink.accepted)
        assert report == {"out_of_order": [], "missing": 0, "duplicates": 0}
        assert len(order_sink.failed_at[("P000", 3)]) >= 3  # retried in place, never parked or dropped
        # the other partitions went on meanwhile: half the patients were done while P000's event failed
        through = order_sink.accepted.index(("P000", 3))
        done_before = {mrn for mrn, seq in order_sink.accepted[:through] if seq == 9}
        assert len(done_before) >= 6, done_before
        assert order_sink.failed_at[("P000", 3)][-1] - started < 30  # it ended because the others got through
        dead = await _dead_letters(client, naming_dlq(project))
        assert dead == []
    finally:
        await _cleanup(client, project)


def naming_dlq(project: Project) -> str:
    return Topology.of(project.routes.values(), project.settings.queue_prefix).route("visits").dead_letter


async def test_a_hold_window_returns_the_event_to_the_head_of_its_partition(
        tmp_path: Path, order_env: dict[str, str], order_sink: OrderSink, client: Broker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RabbitMQ's consumer_timeout bounds how long one message may be held: the worker gives it back
    after a hold window; it comes back first (quorum queues deliver returns first), still in order."""
    monkeypatch.setattr(ordering, "HOLD_SECONDS", 0.4)
    project = load_project(write_project(tmp_path / "p", partitions=2), order_env)
    items = visits(patients=3, per_patient=10)
    order_sink.fail[("P001", 2)] = 10  # ~1.5 s of failures: several hold windows
    try:
        await _run_in_process(project, client, items, order_sink)
        assert order_report(items, order_sink.accepted) == {"out_of_order": [], "missing": 0, "duplicates": 0}
        assert await _dead_letters(client, naming_dlq(project)) == []
    finally:
        await _cleanup(client, project)


async def test_max_age_and_non_retryable_failures_dead_letter_and_the_partition_moves_on(
        tmp_path: Path, order_env: dict[str, str], order_sink: OrderSink, client: Broker) -> None:
    project = load_project(write_project(tmp_path / "p", partitions=2, max_age="1s"), order_env)
    items = visits(patients=2, per_patient=6)
    order_sink.fail[("P000", 1)] = 10_000  # never accepted: dead-lettered once max_age is over
    try:
        await _run_in_process(project, client, items, order_sink, wait_for=[i for i in items if i != ("P000", 1)])
        assert ("P000", 1) not in order_sink.accepted
        assert order_report([i for i in items if i != ("P000", 1)], order_sink.accepted)["out_of_order"] == []
        [letter] = await _dead_letters(client, naming_dlq(project))
        assert letter.stage == "deliver" and letter.connector == "order-sink"
        assert "503" in letter.error and letter.attempts >= 3
        assert re.fullmatch(r".*visits\.to\.order-sink\.p[01]", letter.replay_queue)  # replay: back to its partition
        waited = order_sink.failed_at[("P000", 1)]
        assert waited[-1] - waited[0] >= 0.8  # held in place about max_age before giving up
    finally:
        await _cleanup(client, project)
    order_sink.accepted.clear()
    order_sink.fail, order_sink.fail_status = {("P000", 1): 1}, 400  # non-retryable: dead-lettered at once
    project = load_project(write_project(tmp_path / "q", partitions=2), order_env)
    try:
        await _run_in_process(project, client, [i for i in items if i != ("P000", 1)], order_sink)
        await _run_in_process(project, client, [("P000", 1), ("P000", 9)], order_sink, wait_for=[("P000", 9)])
        assert order_sink.accepted[-1] == ("P000", 9)
        [letter] = await _dead_letters(client, naming_dlq(project))
        assert "400" in letter.error and letter.attempts == 1
    finally:
        await _cleanup(client, project)


async def test_an_ordered_event_waits_in_place_for_its_max_age_however_many_hold_windows_it_takes(
        tmp_path: Path, order_env: dict[str, str], order_sink: OrderSink, client: Broker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11: like a parked delivery, an ordered one gives up only after its max_age. Hold windows
    of 0.3 s with delivery_limit 2 used to end the wait on the third delivery (~1 s); now the
    partition queue's limit leaves room for every return, and max_age (3 s) ends it, with a dead
    letter counting every send and its first and last failure. Its key's next event waits meanwhile."""
    monkeypatch.setattr(ordering, "HOLD_SECONDS", 0.3)
    project = load_project(write_project(tmp_path / "p", partitions=2, delivery_limit=2, max_age="3s"), order_env)
    items = visits(patients=2, per_patient=6)
    overtaken: list[bool] = []  # at each failure of P000's event 1: had its event 2 been delivered?
    order_sink.fail_while[("P000", 1)] = lambda: overtaken.append(("P000", 2) in order_sink.accepted) or True
    others = [i for i in items if i != ("P000", 1)]
    try:
        await _run_in_process(project, client, items, order_sink, timeout=30, wait_for=others)
        assert ("P000", 1) not in order_sink.accepted and not any(overtaken)
        assert order_report(others, order_sink.accepted) == {"out_of_order": [], "missing": 0, "duplicates": 0}
        [letter] = await _dead_letters(client, naming_dlq(project))
        waited = order_sink.failed_at[("P000", 1)]
        assert waited[-1] - waited[0] >= 2.7  # held for about max_age, through ~10 hold windows
        assert letter.attempts == len(waited)  # every send, across the hold windows
        assert "retry.max_age 3s" in letter.error and "503" in letter.error
        first, last = (dt.datetime.fromisoformat(t) for t in (letter.first_failure, letter.last_failure))
        assert (last - first).total_seconds() >= 3.0
        assert re.fullmatch(r".*visits\.to\.order-sink\.p[01]", letter.replay_queue)
    finally:
        await _cleanup(client, project)


async def test_three_engines_one_killed_keep_per_patient_order_and_lose_nothing(
        tmp_path: Path, order_env: dict[str, str], order_sink: OrderSink, client: Broker) -> None:
    """The acceptance test (smaller than bench/ordering.py's 5,000 events, same shape): three
    ``middleware run`` processes, the one holding the single active consumers SIGKILLed mid-run.
    Per patient the sink sees the published order once consecutive duplicates (the event in flight
    when the process died, delivered again) are removed; every event arrives."""
    root = write_project(tmp_path / "p", partitions=8)
    project = load_project(root, order_env)
    names = Topology.of(project.routes.values(), project.settings.queue_prefix).route("visits")
    items = visits(patients=50, per_patient=16)  # 800 events
    order_sink.delay = 0.002
    engines: list[subprocess.Popen[bytes]] = []
    try:
        engines.append(start_engine(root, order_env))
        await _wait_for_consumers(client, [*names.partition_queues("order-sink"), names.inbound])  # the first: all
        engines += [start_engine(root, order_env) for _ in range(2)]
        await publish_visits(client, names.inbound, items)
        while len(order_sink.accepted) < len(items) // 3:
            await asyncio.sleep(0.02)
        engines[0].send_signal(signal.SIGKILL)
        engines[0].wait(10)
        await order_sink.wait_for(items, timeout=60)
        report = order_report(items, order_sink.accepted)
        assert report["out_of_order"] == [] and report["missing"] == 0, report
    finally:
        for process in engines[1:]:
            process.send_signal(signal.SIGTERM)
        for process in engines:
            await asyncio.to_thread(process.wait, 30)
        await _cleanup(client, project)
    assert [p.returncode for p in engines] == [-signal.SIGKILL, 0, 0]


async def _wait_for_consumers(broker: Broker, queues: list[str], timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    for queue in queues:
        while True:
            try:
                if (await broker.queue_info(queue)).consumers:
                    break
            except Exception:  # not declared yet
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no consumer on {queue}")
            await asyncio.sleep(0.1)
