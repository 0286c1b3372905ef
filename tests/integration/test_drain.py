"""Drain on SIGTERM (DESIGN promise 6) and a reason on every dead letter (promise 7), on the real
RabbitMQ and on the embedded broker, with `middleware run` as a real process and a slow HTTP sink."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import ClientError, ClientSession, web

from middleware import topology
from middleware.broker import make_broker, naming
from middleware.broker.base import Broker, OutgoingMessage
from middleware.cli.publish import publish_files
from middleware.delivery import Connector, Delivery
from middleware.delivery.base import ConnectorSpec
from middleware.engine import Engine, declare_route_topology
from middleware.errors import BrokerError
from middleware.observe import Metrics
from middleware.project import Project, load_project
from middleware.topology import Topology
from middleware.workers import RouteWorker

from ..project_copy import copy_project
from .conftest import REPO, counting_consumer, one_dead_letter

pytestmark = pytest.mark.rabbitmq
A04 = (REPO / "samples" / "adt-inbound" / "a04-register.hl7").read_bytes()
ROUTE = "adt-inbound"
PREFETCH = 20  # engine.prefetch in config/middleware.yaml
DRAIN_TIMEOUT = 30.0  # engine.drain_timeout in config/middleware.yaml
Cli = Callable[..., subprocess.CompletedProcess[str]]


class SlowSink:
    """A real HTTP sink answering each request after 1-3 s (or ``fixed`` seconds); records the
    Idempotency-Key of every request it received and of every one it answered."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.answered: list[str] = []
        self.fixed: float | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            key = request.headers.get("Idempotency-Key", "")
            await request.read()
            self.received.append(key)
            await asyncio.sleep(self.fixed if self.fixed is not None else random.uniform(1.0, 3.0))
            self.answered.append(key)
            return web.Response(status=200, text="ok")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/events"

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def wait_received(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"sink received {len(self.received)}, expected {count}"
            await asyncio.sleep(0.02)

    async def wait_distinct(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(set(self.answered)) < count:
            assert time.monotonic() < deadline, f"sink answered {len(set(self.answered))} events, expected {count}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def slow_sink() -> AsyncIterator[SlowSink]:
    sink = SlowSink()
    await sink.start()
    yield sink
    await sink.stop()


@pytest.fixture(params=["amqp", "filesystem"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def drain_env(rabbit_env: dict[str, str], slow_sink: SlowSink, tmp_path: Path) -> dict[str, str]:
    """The shipped project pointed at the slow sink (RabbitMQ; see ``kind_env`` for the embedded broker)."""
    return {**rabbit_env, "CASE_MANAGEMENT_URL": slow_sink.url, "CDR_URL": slow_sink.url}


def _env_for(kind: str, env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    if kind == "filesystem":
        return {**env, "MIDDLEWARE_BROKER_URL": f"filesystem://{tmp_path}/broker"}
    return env


@pytest.fixture
async def cleanup(rabbit_env: dict[str, str]) -> AsyncIterator[list[Project]]:
    """Projects whose queues (on RabbitMQ) the test declared: deleted afterwards."""
    projects: list[Project] = []
    yield projects
    for project in projects:
        if not project.settings.broker_url.startswith("amqp"):
            continue
        client = make_broker(project.settings.broker_url)
        await client.connect()
        await topology.delete(client, Topology.of(project.routes.values(), project.settings.queue_prefix))
        await client.close()


def _messages(tmp_path: Path, count: int, tag: str = "DRAIN") -> Path:
    """``count`` distinct ADT^A04 messages in one batch file: one event each, each its own id."""
    batch = b"".join(A04.replace(b"DEMO-A04-0001", f"{tag}-{n:05d}".encode()).replace(
        b"MRN-5120", f"MRN-{n:05d}".encode()).rstrip(b"\r\n") + b"\r\n" for n in range(count))
    path = tmp_path / f"{tag.lower()}.hl7"
    path.write_bytes(batch)
    return path


async def _publish(env: dict[str, str], tmp_path: Path, count: int, cleanup: list[Project]) -> Project:
    project = load_project(REPO, env)
    cleanup.append(project)
    published = await publish_files(project, [_messages(tmp_path, count)], "ehr.adt")
    assert len(published) == count
    return project


def _start(env: dict[str, str], tmp_path: Path, log_name: str = "run.log") -> subprocess.Popen[bytes]:
    log = (tmp_path / log_name).open("ab")  # a file, not a pipe: a chatty engine never blocks on it
    return subprocess.Popen([sys.executable, "-m", "middleware", "run", "--project", str(REPO)], env=env,
                            stdout=subprocess.DEVNULL, stderr=log, cwd=tmp_path)


async def _sigterm(process: subprocess.Popen[bytes], timeout: float = DRAIN_TIMEOUT + 15) -> tuple[int, float]:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(process.wait, timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # not left running after the test
        process.wait()
        raise
    return code, time.monotonic() - started


async def _depth(project: Project, queue: str) -> int:
    client = make_broker(project.settings.broker_url)
    await client.connect()
    try:
        return (await client.queue_info(queue)).messages
    finally:
        await client.close()


async def test_sigterm_drains_in_flight_deliveries_then_exits_0(
        broker_kind: str, drain_env: dict[str, str], slow_sink: SlowSink, tmp_path: Path,
        cleanup: list[Project]) -> None:
    """SIGTERM with deliveries in flight to a slow (1-3 s) sink: no new delivery starts, the in-flight
    ones are answered and acked, exit 0 within the drain timeout; after a restart the sink sees not
    one duplicate, and nothing was dead-lettered. On RabbitMQ and on the embedded broker."""
    env = _env_for(broker_kind, drain_env, tmp_path)
    total = 2 * PREFETCH
    project = await _publish(env, tmp_path, total, cleanup)
    first = _start(env, tmp_path)
    try:
        await slow_sink.wait_received(PREFETCH // 2)
    finally:
        code, seconds = await _sigterm(first)
    drained = list(slow_sink.received)
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert seconds < DRAIN_TIMEOUT
    assert PREFETCH // 2 <= len(drained) <= PREFETCH  # consumers were cancelled first: nothing new started
    assert sorted(slow_sink.answered) == sorted(drained)  # every in-flight delivery finished
    log = (tmp_path / "run.log").read_text()
    assert '"draining"' in log and "handed back" not in log

    slow_sink.fixed = 0.0
    second = _start(env, tmp_path)
    try:
        await slow_sink.wait_distinct(total)
    finally:
        code, _ = await _sigterm(second)
    assert code == 0
    after = slow_sink.received[len(drained):]
    assert not set(after) & set(drained)  # 0 duplicates of the drained work
    assert len(slow_sink.received) == len(set(slow_sink.received)) == total
    assert await _depth(project, naming.dead_letter_queue(ROUTE, project.settings.queue_prefix)) == 0


async def test_second_sigterm_exits_at_once(drain_env: dict[str, str], slow_sink: SlowSink, tmp_path: Path,
                                            cleanup: list[Project]) -> None:
    """A first SIGTERM drains (the process waits for the sink); a second one exits at once."""
    slow_sink.fixed = 6.0
    await _publish(drain_env, tmp_path, 5, cleanup)
    process = _start(drain_env, tmp_path)
    try:
        await slow_sink.wait_received(5)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert process.poll() is None  # still draining: the sink has not answered yet
    finally:
        code, seconds = await _sigterm(process)
    assert code == 128 + signal.SIGTERM
    assert seconds < 2.0
    assert slow_sink.answered == []  # it did not wait for the sink
    assert "second signal: exiting without draining" in (tmp_path / "run.log").read_text()


async def test_twelve_restarts_while_a_sink_is_slow_dead_letter_nothing(
        drain_env: dict[str, str], slow_sink: SlowSink, tmp_path: Path, cleanup: list[Project]) -> None:
    """Twelve SIGTERM restarts in a row, each while ~20 deliveries wait on a 1-3 s sink (more than
    the delivery limit of 10): 0 dead letters, 0 duplicates, every event delivered in the end."""
    total = 300
    project = await _publish(drain_env, tmp_path, total, cleanup)
    for restart in range(12):
        before = len(slow_sink.received)
        process = _start(drain_env, tmp_path)
        try:
            await slow_sink.wait_received(before + 5)
        finally:
            code, _ = await _sigterm(process)
        assert code == 0, f"restart {restart}: exit {code}: {(tmp_path / 'run.log').read_text()[-3000:]}"
    assert len(slow_sink.received) < total  # work was still left when the restarts ended
    slow_sink.fixed = 0.0
    last = _start(drain_env, tmp_path)
    try:
        await slow_sink.wait_distinct(total, timeout=120)
    finally:
        code, _ = await _sigterm(last)
    assert code == 0
    dead = await _depth(project, naming.dead_letter_queue(ROUTE, project.settings.queue_prefix))
    duplicates = len(slow_sink.received) - len(set(slow_sink.received))
    assert (dead, duplicates) == (0, 0)


async def test_past_the_drain_timeout_messages_go_back_and_never_dead_letter(
        rabbit_project: Project, broker: Broker, slow_sink: SlowSink, tmp_path: Path) -> None:
    """A sink slower than engine.drain_timeout, delivery_limit 1, three stops in a row: what was in
    flight is handed back each time (uncounted), nothing is dead-lettered, all is delivered later."""
    slow_sink.fixed = 4.0
    settings = dataclasses.replace(rabbit_project.settings, drain_timeout=0.3, delivery_limit=1)
    specs = {name: dataclasses.replace(spec, options={**spec.options, "url": slow_sink.url})
             for name, spec in rabbit_project.connectors.items() if name == "case-management"}
    project = dataclasses.replace(rabbit_project, settings=settings)
    prefix = settings.queue_prefix
    queue = naming.delivery_queue(ROUTE, "case-management", prefix)
    total = 6
    for cycle in range(3):
        engine = Engine(project, connector_specs=specs, gateways=False)
        await engine.start()
        if cycle == 0:
            await publish_files(project, [_messages(tmp_path, total)], "ehr.adt")
        try:
            await slow_sink.wait_received(total * (cycle + 1))
        finally:
            started = time.monotonic()
            await engine.stop()
        assert time.monotonic() - started < 0.3 + 3  # drain timeout, then hand-back: bounded
        assert (await broker.queue_info(queue)).messages == total  # all back in their queue
        assert (await broker.queue_info(naming.dead_letter_queue(ROUTE, prefix))).messages == 0
    fetched = await broker.get(queue)
    assert fetched is not None and fetched.delivery_count == 0  # three shutdowns counted no delivery
    await fetched.reject(requeue=True)  # one failed delivery: the next is the last allowed one
    slow_sink.fixed = 0.0
    engine = Engine(project, connector_specs=specs, gateways=False)
    await engine.start()
    try:
        await slow_sink.wait_distinct(total)
    finally:
        await engine.stop()
    assert (await broker.queue_info(naming.dead_letter_queue(ROUTE, prefix))).messages == 0


# -- every dead letter has a reason ----------------------------------------------------------------

class _BrokerFailing(Connector):
    """A connector whose every send fails as if the broker had failed mid-way (the message is given back)."""

    async def send(self, delivery: Delivery) -> None:
        raise BrokerError("publish failed, connection lost: simulated", hint="check that RabbitMQ is running")


async def test_failure_on_the_last_allowed_delivery_is_dead_lettered_with_its_reason(
        rabbit_project: Project, broker: Broker, connector_type: Callable[[str, type], None]) -> None:
    """A failure that gives a message back is retried by redelivery; on its last allowed delivery
    the worker dead-letters it itself, with stage, error, attempts and times (not RabbitMQ, bare)."""
    connector_type("broker-failing", _BrokerFailing)  # like any connector type, for this test only
    settings = dataclasses.replace(rabbit_project.settings, delivery_limit=2)
    project = dataclasses.replace(rabbit_project, settings=settings)
    failing = ConnectorSpec("case-management", "broker-failing", {})
    engine = Engine(project, connector_specs={"case-management": failing}, gateways=False)
    await engine.start()
    dlq = naming.dead_letter_queue(ROUTE, settings.queue_prefix)
    try:
        [published] = await publish_files(project, [REPO / "samples" / "adt-inbound" / "a04-register.hl7"], "ehr.adt")
        letter = await one_dead_letter(broker, dlq)
    finally:
        await engine.stop()
    headers = letter.headers
    assert headers["x-mw-stage"] == "deliver" and headers["x-mw-connector"] == "case-management"
    assert headers["x-mw-error-class"] == "BrokerError" and "simulated" in headers["x-mw-error"]
    assert headers["x-mw-attempts"] == 3  # x-delivery-count 0, 1, 2: the last one dead-lettered it
    assert headers["x-mw-last-failure"] and headers["x-mw-correlation-id"] == published.correlation_id
    assert "x-death" not in headers  # we dead-lettered it, not RabbitMQ
    await letter.ack()


async def test_route_worker_failing_on_the_last_allowed_delivery_dead_letters_with_its_reason(
        rabbit_project: Project, broker: Broker) -> None:
    """The route worker's events cannot be published (no delivery queue bound): redelivered, then
    on the last allowed delivery dead-lettered by the worker with stage parse and the broker error."""
    settings = dataclasses.replace(rabbit_project.settings, delivery_limit=2)
    route = rabbit_project.routes[ROUTE]
    prefix = settings.queue_prefix
    dlq, inbound = naming.dead_letter_queue(ROUTE, prefix), naming.inbound_queue(route.source_queue, prefix)
    await broker.declare_queue(dlq, kind="dead-letter")
    await broker.declare_queue(inbound, kind="work", dead_letter_to=dlq, delivery_limit=2)
    await broker.declare_exchange(naming.events_exchange(prefix))  # no delivery queue bound to it
    worker = RouteWorker(route, broker, Metrics(), prefix=prefix, delivery_limit=2)
    consumer, counts = await counting_consumer(broker, inbound, worker.handle)
    try:
        await broker.publish(OutgoingMessage(A04, correlation_id="corr-route"), queue=inbound)
        letter = await one_dead_letter(broker, dlq)
    finally:
        await consumer.close()
    assert counts == [0, 1, 2]
    headers = letter.headers
    assert headers["x-mw-stage"] == "parse" and headers["x-mw-error-class"] == "BrokerError"
    assert headers["x-mw-attempts"] == 3 and headers["x-mw-replay-queue"] == inbound
    assert letter.body == A04 and "x-death" not in headers
    await letter.ack()


async def test_dlq_lists_a_message_rabbitmq_dead_lettered_at_the_delivery_limit(
        rabbit_project: Project, broker: Broker, cli: Cli) -> None:
    """A message RabbitMQ itself dead-letters at x-delivery-limit (the engine was killed while handling
    it each time) has only x-death: `dlq list --stage deliver` / `--stage parse` still find it, with
    route, connector, error, attempts and last failure, and replay sends it back where it came from."""
    settings = rabbit_project.settings
    prefix, limit = settings.queue_prefix, settings.delivery_limit
    route = rabbit_project.routes[ROUTE]
    await declare_route_topology(broker, route, settings)
    delivery = naming.delivery_queue(ROUTE, "case-management", prefix)
    inbound = naming.inbound_queue(route.source_queue, prefix)
    event = OutgoingMessage(b'{"id": "evt-1"}', {"x-mw-route": ROUTE, "x-mw-event-type": "patient.registered.v1"},
                            "corr-evt", "evt-1", "application/cloudevents+json")
    await broker.publish(event, queue=delivery)
    await broker.publish(OutgoingMessage(A04, correlation_id="corr-raw", message_id="raw-1"), queue=inbound)
    for queue in (delivery, inbound):  # what a kill on every delivery amounts to: returned limit + 1 times
        for _ in range(limit + 1):
            message = await one_dead_letter(broker, queue)
            await message.reject(requeue=True)

    listed = json.loads(cli("dlq", "list", "--stage", "deliver", "--json").stdout)
    [row] = listed if isinstance(listed, list) else listed["dead_letters"]
    assert (row["id"], row["route"], row["stage"], row["connector"]) == ("evt-1", ROUTE, "deliver", "case-management")
    assert row["error_class"] == "DeliveryLimitExceeded" and row["attempts"] == limit + 1
    assert row["last_failure"].endswith("Z") and row["correlation_id"] == "corr-evt"
    assert row["replay_queue"] == delivery
    listed = json.loads(cli("dlq", "list", "--stage", "parse", "--json").stdout)
    [row] = listed if isinstance(listed, list) else listed["dead_letters"]
    assert (row["id"], row["route"], row["stage"], row["replay_queue"]) == ("raw-1", ROUTE, "parse", inbound)
    shown = cli("dlq", "show", "evt-1").stdout
    assert "DeliveryLimitExceeded" in shown and "without an ack" in shown


# -- one SIGTERM, the whole project running ---------------------------------------------------------

FOLDER = """  folder:
    - name: drops
      path: inbox
      route: adt-inbound
      pattern: "*.hl7"
      min_age: 0.2
      poll_interval: 0.1
"""


def _full_project(root: Path) -> Path:
    """The shipped project with every gateway on: its HTTP and MLLP listeners and a watched folder."""
    copy_project(root)
    config = root / "config" / "middleware.yaml"
    config.write_text(config.read_text().replace("  mllp:", FOLDER + "  mllp:", 1))
    (root / "inbox").mkdir()
    return root


def _listening_port(log: Path, event: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if f'"event": "{event}"' in line:
                return int(json.loads(line)["port"])
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} in {log}: {log.read_text()[-2000:]}")


async def _post_hl7(port: int, body: bytes) -> bool:
    """One HL7 message over HTTP ingest; True when it was accepted (202: the broker confirmed it)."""
    try:
        async with ClientSession() as session, session.post(
                f"http://127.0.0.1:{port}/v1/routes/{ROUTE}/messages", data=body,
                headers={"Authorization": "Bearer integration-test-token",
                         "Content-Type": "x-application/hl7-v2+er7"}) as response:
            return response.status == 202
    except (OSError, ClientError):  # the listener closed first: not accepted, the sender resends
        return False


async def _send_mllp(port: int, body: bytes) -> bool:
    """One HL7 message over MLLP; True when it was acknowledged AA (after the broker's confirm)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x0b" + body.replace(b"\r\n", b"\r") + b"\x1c\r")
        await writer.drain()
        ack = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), DRAIN_TIMEOUT)
        writer.close()
        return b"MSA|AA" in ack
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return False


async def test_one_sigterm_with_every_gateway_on_and_work_in_flight_exits_0_and_loses_nothing(
        drain_env: dict[str, str], slow_sink: SlowSink, tmp_path: Path, cleanup: list[Project]) -> None:
    """`middleware run` of the whole project (HTTP, MLLP and folder gateways, console, journal) is sent
    one SIGTERM while deliveries wait on a slow sink and an HTTP post, an MLLP message and a folder file
    arrive: it exits 0 within engine.drain_timeout, three times in a row; afterwards every accepted
    message is delivered (none lost, none dead-lettered)."""
    root = _full_project(tmp_path / "project")
    env = {**drain_env, "CONSOLE_TOKEN": "console-token"}
    project = load_project(root, env)
    cleanup.append(project)
    published = await publish_files(project, [_messages(tmp_path, 40)], "ehr.adt")
    accepted = len(published)
    for cycle in range(3):
        log = tmp_path / f"run{cycle}.log"
        log.touch()
        before = len(slow_sink.received)
        with log.open("ab") as stderr:
            process = subprocess.Popen([sys.executable, "-m", "middleware", "run", "--project", str(root)],
                                       env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path)
        try:
            http = await asyncio.to_thread(_listening_port, log, "http ingest listening")
            mllp = await asyncio.to_thread(_listening_port, log, "mllp listening")
            batch = _messages(tmp_path, 30, tag=f"FOLDER{cycle}").read_bytes()
            (root / "inbox" / f"drop{cycle}.hl7").write_bytes(batch)
            sends = [asyncio.create_task(_post_hl7(http, _messages(tmp_path, 1, tag=f"HTTP{cycle}").read_bytes())),
                     asyncio.create_task(_send_mllp(mllp, _messages(tmp_path, 1, tag=f"MLLP{cycle}").read_bytes()))]
            await slow_sink.wait_received(before + 1)  # deliveries in flight: the sink holds them 1-3 s
        finally:
            code, seconds = await _sigterm(process)
        accepted += sum(await asyncio.gather(*sends))
        assert code == 0, f"cycle {cycle}: exit {code} after {seconds:.1f} s: {log.read_text()[-3000:]}"
        assert seconds < DRAIN_TIMEOUT, f"cycle {cycle}: {seconds:.1f} s"
    accepted += 3 * 30  # the folder files: taken whole, or resumed at the next start
    slow_sink.fixed = 0.0
    log = tmp_path / "last.log"
    with log.open("ab") as stderr:
        last = subprocess.Popen([sys.executable, "-m", "middleware", "run", "--project", str(root)],
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path)
    try:
        await slow_sink.wait_distinct(accepted, timeout=120)
    finally:
        code, _ = await _sigterm(last)
    assert code == 0, log.read_text()[-3000:]
    assert await _depth(project, naming.dead_letter_queue(ROUTE, project.settings.queue_prefix)) == 0
