"""One contract, every adapter: memory://, the file-backed embedded broker and the real RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from middleware.broker import make_broker
from middleware.broker.base import Broker, IncomingMessage, OutgoingMessage
from middleware.errors import BrokerError

REPO = Path(__file__).resolve().parents[2]
BINARY = bytes(range(256)) + b"MSH|^~\\&|\r\xef\xbb\xbf"


@pytest.fixture(params=["memory", "filesystem", "amqp"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path, amqp_url: str) -> str:
    return {"memory": "memory://", "filesystem": f"filesystem://{tmp_path}/broker", "amqp": amqp_url}[
        request.param]


class Topology:
    """Names under this test's prefix; deletes everything it declared."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.broker = broker
        self.prefix = prefix
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    async def queue(self, name: str, **kwargs: object) -> str:
        full = self.prefix + name
        await self.broker.declare_queue(full, **kwargs)  # type: ignore[arg-type]
        self.queues.append(full)
        return full

    async def exchange(self, name: str) -> str:
        full = self.prefix + name
        await self.broker.declare_exchange(full)
        self.exchanges.append(full)
        return full

    async def cleanup(self, broker: Broker) -> None:
        for queue in self.queues:
            await broker.delete_queue(queue)
        for exchange in self.exchanges:
            await broker.delete_exchange(exchange)


@pytest.fixture
async def broker(broker_url: str, queue_prefix: str) -> AsyncIterator[tuple[Broker, Topology]]:
    client = make_broker(broker_url)
    await client.connect()
    topology = Topology(client, queue_prefix)
    yield client, topology
    cleaner = make_broker(broker_url)  # the test may have closed its own connection
    await cleaner.connect()
    await topology.cleanup(cleaner)
    await cleaner.close()
    with contextlib.suppress(Exception):  # already closed by the test
        await client.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def depth(broker: Broker, queue: str) -> int:
    return (await broker.queue_info(queue)).messages


async def test_publish_and_get_keep_body_headers_and_ids(broker: tuple[Broker, Topology]) -> None:
    client, topo = broker
    queue = await topo.queue("in")
    await client.publish(OutgoingMessage(BINARY, {"x-source": "ehr", "x-n": 3}, "corr-1", "msg-1",
                                         "x-application/hl7-v2+er7"), queue=queue)
    await eventually(lambda: _is(depth(client, queue), 1))
    message = await client.get(queue)
    assert message is not None
    assert message.body == BINARY
    assert message.headers["x-source"] == "ehr" and message.headers["x-n"] == 3
    assert (message.correlation_id, message.message_id) == ("corr-1", "msg-1")
    assert message.content_type == "x-application/hl7-v2+er7"
    assert message.delivery_count == 0
    await message.ack()
    assert await client.get(queue) is None
    assert await depth(client, queue) == 0


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_topic_exchange_routes_by_binding(broker: tuple[Broker, Topology]) -> None:
    client, topo = broker
    admitted, everything = await topo.queue("admitted"), await topo.queue("all")
    exchange = await topo.exchange("events")
    await client.bind(admitted, exchange, "adt.patient.admitted.*")
    await client.bind(everything, exchange, "adt.#")
    await client.publish(OutgoingMessage(b"a"), exchange=exchange, routing_key="adt.patient.admitted.v1")
    await client.publish(OutgoingMessage(b"b"), exchange=exchange, routing_key="adt.patient.merged.v1")
    await client.publish(OutgoingMessage(b"c"), exchange=exchange, routing_key="orders.order.placed.v1")
    await eventually(lambda: _is(depth(client, everything), 2))
    assert await depth(client, admitted) == 1
    bodies = []
    while (message := await client.get(everything)) is not None:
        bodies.append(message.body)
        await message.ack()
    assert sorted(bodies) == [b"a", b"b"]


async def test_consume_delivers_everything_with_at_most_prefetch_in_flight(broker: tuple[Broker, Topology]) -> None:
    client, topo = broker
    queue = await topo.queue("work")
    for n in range(30):
        await client.publish(OutgoingMessage(str(n).encode()), queue=queue)
    seen: list[bytes] = []
    in_flight = peak = 0

    async def handler(message: IncomingMessage) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        seen.append(message.body)
        in_flight -= 1
        await message.ack()

    consumer = await client.consume(queue, handler, prefetch=4)
    await eventually(lambda: _true(len(seen) == 30))
    await consumer.cancel()
    assert sorted(int(b) for b in seen) == list(range(30))
    assert 1 < peak <= 4
    assert await depth(client, queue) == 0


async def _true(value: bool) -> bool:
    return value


async def test_cancel_stops_new_deliveries(broker: tuple[Broker, Topology]) -> None:
    client, topo = broker
    queue = await topo.queue("work")
    seen: list[bytes] = []

    async def handler(message: IncomingMessage) -> None:
        seen.append(message.body)
        await message.ack()

    consumer = await client.consume(queue, handler, prefetch=2)
    await client.publish(OutgoingMessage(b"first"), queue=queue)
    await eventually(lambda: _true(seen == [b"first"]))
    await consumer.cancel()
    await client.publish(OutgoingMessage(b"second"), queue=queue)
    await asyncio.sleep(0.3)
    assert seen == [b"first"]
    assert await depth(client, queue) == 1


async def test_requeue_counts_deliveries_and_dead_letters_past_the_limit(broker: tuple[Broker, Topology]) -> None:
    client, topo = broker
    dlq = await topo.queue("dlq", kind="dead-letter")
    queue = await topo.queue("work", dead_letter_to=dlq, delivery_limit=2)
    await client.publish(OutgoingMessage(b"poison", {"x-k": "v"}, "corr-p"), queue=queue)
    counts = []
    for _ in range(10):
        message = None
        for _ in range(50):
            message = await client.get(queue)
            if message is not None or await depth(client, dlq):
                break
            await asyncio.sleep(0.02)
        if message is None:
            break
        counts.append(message.delivery_count)
        await message.reject(requeue=True)
    assert counts == [0, 1, 2]  # the first delivery plus `delivery_limit` redeliveries
    await eventually(lambda: _is(depth(client, dlq), 1))
    dead = await client.get(dlq)
    assert dead is not None and dead.body == b"poison" and dead.correlation_id == "corr-p"
    await dead.ack()


async def test_handler_failure_gives_the_message_back(broker: tuple[Broker, Topology]) -> None:
    client, topo = broker
    queue = await topo.queue("work")
    attempts: list[int] = []

    async def flaky(message: IncomingMessage) -> None:
        attempts.append(message.delivery_count)
        if len(attempts) == 1:
            raise ConnectionError("broker went away mid-way")
        await message.ack()

    consumer = await client.consume(queue, flaky, prefetch=1)
    await client.publish(OutgoingMessage(b"m"), queue=queue)
    await eventually(lambda: _true(len(attempts) == 2))
    await consumer.cancel()
    assert attempts == [0, 1]
    assert await depth(client, queue) == 0


async def test_unacked_message_returns_when_the_connection_closes(broker_url: str, broker: tuple[Broker, Topology],
                                                                  ) -> None:
    client, topo = broker
    queue = await topo.queue("work")
    await client.publish(OutgoingMessage(b"held"), queue=queue)
    held = None
    for _ in range(100):
        if (held := await client.get(queue)) is not None:
            break
        await asyncio.sleep(0.02)
    assert held is not None
    if broker_url == "memory://":  # memory:// has no life outside its connection's process state
        await held.reject(requeue=True)
    else:
        await client.close()
        client = make_broker(broker_url)
        await client.connect()
    again = None
    for _ in range(100):
        if (again := await client.get(queue)) is not None:
            break
        await asyncio.sleep(0.02)
    assert again is not None and again.body == b"held"
    await again.ack()
    if broker_url != "memory://":
        await client.close()


async def test_purge_and_queue_info(broker: tuple[Broker, Topology]) -> None:
    client, topo = broker
    queue = await topo.queue("work")
    for n in range(5):
        await client.publish(OutgoingMessage(b"%d" % n), queue=queue)
    await eventually(lambda: _is(depth(client, queue), 5))
    assert await client.purge(queue) == 5
    assert await depth(client, queue) == 0


@pytest.mark.rabbitmq
async def test_amqp_publish_to_a_missing_queue_is_an_error(amqp_url: str, queue_prefix: str) -> None:
    client = make_broker(amqp_url)
    await client.connect()
    try:
        with pytest.raises(BrokerError, match="does not exist"):
            await client.publish(OutgoingMessage(b"x"), queue=queue_prefix + "nobody-declared-me")
        with pytest.raises(BrokerError, match="does not exist"):
            await client.queue_info(queue_prefix + "nobody-declared-me")
        exchange = queue_prefix + "events"
        await client.declare_exchange(exchange)
        await client.publish(OutgoingMessage(b"tap"), exchange=exchange, routing_key="r.x.v1")  # may go nowhere
        with pytest.raises(BrokerError, match="no queue is bound"):
            await client.publish(OutgoingMessage(b"x"), exchange=exchange, routing_key="r.x.v1", mandatory=True)
        await client.delete_exchange(exchange)
    finally:
        await client.close()


@pytest.mark.rabbitmq
async def test_amqp_work_queues_are_durable_quorum_queues(amqp_url: str, queue_prefix: str) -> None:
    client = make_broker(amqp_url)
    await client.connect()
    name = queue_prefix + "work"
    try:
        await client.declare_queue(name, kind="work", dead_letter_to=queue_prefix + "dlq", delivery_limit=5)
        listed = subprocess.run(["rabbitmqctl", "list_queues", "-q", "name", "type", "durable", "arguments"],
                                capture_output=True, text=True, timeout=60)
        if listed.returncode != 0:
            pytest.fail(f"rabbitmqctl failed: {listed.stderr}")
        [line] = [row for row in listed.stdout.splitlines() if row.startswith(name + "\t")]
        assert "\tquorum\ttrue\t" in line and "x-delivery-limit" in line and "at-least-once" in line
    finally:
        await client.delete_queue(name)
        await client.close()


async def test_amqp_unreachable_broker_is_a_broker_error() -> None:
    client = make_broker("amqp://guest:guest@127.0.0.1:1/")
    with pytest.raises(BrokerError, match="cannot connect"):
        await asyncio.wait_for(client.connect(), 30)


CRASHING_CONSUMER = textwrap.dedent("""
    import asyncio, sys
    from middleware.broker import make_broker

    async def main():
        broker = make_broker(sys.argv[1])
        await broker.connect()
        async def hold(message):
            print("holding", flush=True)
            await asyncio.sleep(3600)
        await broker.consume(sys.argv[2], hold, prefetch=5)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_embedded_broker_keeps_messages_a_killed_consumer_held(tmp_path: Path) -> None:
    """SIGKILL while a message is in flight: the next consumer gets it again (nothing lost)."""
    url = f"filesystem://{tmp_path}/broker"
    client = make_broker(url)
    await client.connect()
    await client.declare_queue("work")
    await client.publish(OutgoingMessage(b"precious", correlation_id="c-1"), queue="work")
    process = subprocess.Popen([sys.executable, "-c", CRASHING_CONSUMER, url, "work"], stdout=subprocess.PIPE,
                               text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        assert line.strip() == "holding"
        assert await depth(client, "work") == 0  # taken out of the queue, held by the consumer
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    got: list[IncomingMessage] = []

    async def take(message: IncomingMessage) -> None:
        got.append(message)
        await message.ack()

    consumer = await client.consume("work", take)
    await eventually(lambda: _true(len(got) == 1))
    await consumer.cancel()
    assert got[0].body == b"precious" and got[0].correlation_id == "c-1"
    await client.close()


async def test_embedded_broker_allows_one_consuming_engine(tmp_path: Path) -> None:
    url = f"filesystem://{tmp_path}/broker"
    first, second = make_broker(url), make_broker(url)
    await first.connect()
    await second.connect()
    await first.declare_queue("work")

    async def ignore(message: IncomingMessage) -> None:
        await message.ack()

    consumer = await first.consume("work", ignore)
    with pytest.raises(BrokerError, match="another engine"):
        await second.consume("work", ignore)
    await second.publish(OutgoingMessage(b"publishing is fine"), queue="work")  # publishers may share it
    await consumer.cancel()
    await first.close()
    await second.close()


async def _seed_backlog(folder: Path, queue: str, count: int) -> None:
    """``count`` ready spool files for ``queue``, as another process publishing them would leave them.

    One message goes through the broker; its file is copied under later FIFO names (no fsync per
    copy: this builds a backlog quickly, it is not a publish).
    """
    seeder = make_broker(f"filesystem://{folder}")
    await seeder.connect()
    await seeder.declare_queue(queue)
    await seeder.publish(OutgoingMessage(b"seed", correlation_id="0"), queue=queue)
    await seeder.close()
    queues = folder / "queues"
    [original] = [name for name in os.listdir(queues) if name.endswith(f".{queue}.msg")]
    data = (queues / original).read_bytes()
    stamp = int(original.split("_")[0])
    for n in range(1, count):
        (queues / f"{stamp + n:020d}_{n:032x}.{queue}.msg").write_bytes(data)


@pytest.mark.parametrize("backlog", [100, 3000])
async def test_embedded_broker_get_does_not_list_the_folder_per_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backlog: int) -> None:
    """Getting a message costs the same with a small or a large backlog: the folder is listed a
    bounded number of times (index refreshes), never once per get."""
    from middleware.broker import kombu_broker

    folder = tmp_path / "broker"
    await _seed_backlog(folder, "work", backlog)
    listings = 0
    real_listdir, real_scandir = os.listdir, os.scandir

    def counting_listdir(path: Any = ".") -> list[str]:
        nonlocal listings
        listings += Path(path) == folder / "queues"
        return real_listdir(path)

    def counting_scandir(path: Any = ".") -> Any:
        nonlocal listings
        listings += Path(path) == folder / "queues"
        return real_scandir(path)

    client = make_broker(f"filesystem://{folder}")
    await client.connect()
    await client.declare_queue("work")
    monkeypatch.setattr(os, "listdir", counting_listdir)
    monkeypatch.setattr(os, "scandir", counting_scandir)
    started = time.monotonic()
    got = 0
    while (message := await client.get("work")) is not None:
        await message.ack()
        got += 1
    elapsed = time.monotonic() - started
    await client.close()
    assert got == backlog
    # one initial scan, one when the queue ran dry, one refresh per STALE_AFTER seconds of work
    assert listings <= 2 + elapsed / kombu_broker.STALE_AFTER, (listings, elapsed)


async def test_embedded_broker_gets_in_fifo_order_and_sees_other_publishers(tmp_path: Path) -> None:
    url = f"filesystem://{tmp_path}/broker"
    consumer, publisher = make_broker(url), make_broker(url)  # two connections: two processes' views
    await consumer.connect()
    await publisher.connect()
    await consumer.declare_queue("work")
    for n in range(3):
        await consumer.publish(OutgoingMessage(f"own {n}".encode()), queue="work")
    first = await consumer.get("work")  # the consumer's index now holds the rest
    assert first is not None and first.body == b"own 0"
    await first.ack()
    await publisher.publish(OutgoingMessage(b"from elsewhere"), queue="work")
    again = await consumer.get("work")
    assert again is not None and again.body == b"own 1"
    await consumer._run(consumer._release_sync, again)  # type: ignore[attr-defined]  # given back untouched
    bodies = []
    deadline = time.monotonic() + 10
    while len(bodies) < 3 and time.monotonic() < deadline:
        message = await consumer.get("work")
        if message is None:  # the other publisher's file is found when the index runs dry
            await asyncio.sleep(0.01)
            continue
        bodies.append(message.body)
        await message.ack()
    assert bodies == [b"own 1", b"own 2", b"from elsewhere"]
    await consumer.close()
    await publisher.close()


async def test_embedded_broker_removes_temporary_files_of_killed_publishers(tmp_path: Path) -> None:
    """A publisher SIGKILLed mid-write leaves ``.<name>.tmp``; the consuming engine deletes it at
    start, but never a file a live publisher is still writing (it holds a lock on it)."""
    url = f"filesystem://{tmp_path}/broker"
    client = make_broker(url)
    await client.connect()
    await client.declare_queue("work")
    queues = tmp_path / "broker" / "queues"
    stale = queues / ".00000000000000000001_dead.work.msg.tmp"
    stale.write_bytes(b"half a mess")
    live = queues / ".00000000000000000002_live.work.msg.tmp"
    live.write_bytes(b"being writ")
    fresh = queues / ".00000000000000000003_new.work.msg.tmp"  # created this instant, not locked yet
    fresh.write_bytes(b"")
    old = time.time() - 600
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    writer = os.open(live, os.O_RDONLY)
    fcntl.flock(writer, fcntl.LOCK_EX)
    try:
        async def ignore(message: IncomingMessage) -> None:
            await message.ack()

        consumer = await client.consume("work", ignore)
        await consumer.cancel()
        assert not stale.exists()
        assert live.exists() and fresh.exists()
        assert await depth(client, "work") == 0  # never taken for messages either
    finally:
        os.close(writer)
        await client.close()


async def test_embedded_broker_commits_concurrent_publishes_together_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publishes waiting at the same time share one folder fsync (group commit), keep their order,
    and each is confirmed only once its file is durable under its final name."""
    import stat

    folder_syncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal folder_syncs
        folder_syncs += stat.S_ISDIR(os.fstat(fd).st_mode)
        real_fsync(fd)

    client = make_broker(f"filesystem://{tmp_path}/broker")
    await client.connect()
    await client.declare_queue("work")
    monkeypatch.setattr(os, "fsync", counting_fsync)
    await asyncio.gather(*(client.publish(OutgoingMessage(f"m{n}".encode()), queue="work") for n in range(300)))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert folder_syncs <= 3  # one per group, not one per message
    queues = tmp_path / "broker" / "queues"
    assert not [name for name in os.listdir(queues) if name.endswith(".tmp")]
    bodies = []
    while (message := await client.get("work")) is not None:
        bodies.append(message.body)
        await message.ack()
    assert bodies == [f"m{n}".encode() for n in range(300)]
    await client.close()
