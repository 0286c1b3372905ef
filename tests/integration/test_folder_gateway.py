"""The watched folder gateway (``ingest.folder[]``) on the real RabbitMQ: files dropped into an inbox
are published record by record, moved to done/ with a report; files still being written wait; two
gateways on one folder never take the same file; a gateway killed mid-file resumes after a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from middleware.broker import IncomingMessage, make_broker
from middleware.broker.base import Broker
from middleware.engine import Engine
from middleware.ingest import FolderListener
from middleware.ingest.folder import FolderGateway
from middleware.observe import Metrics
from middleware.project import Project
from middleware.topology import RouteTopology, declare

REPO = Path(__file__).resolve().parents[2]
ROUTE = "adt-inbound"


def adt(n: int) -> bytes:
    return (f"MSH|^~\\&|EHR|GHH|ADT|GHH|20260101120000||ADT^A01|MSG{n}|P|2.5\r"
            f"EVN|A01|20260101120000\rPID|1||{n}^^^GHH^MR||DOE^JOHN||19800101|M\rPV1|1|I\r").encode()


def batch(count: int, *, first: int = 1) -> bytes:
    return (b"BHS|^~\\&|EHR\r" + b"".join(adt(n) for n in range(first, first + count))
            + f"BTS|{count}\r".encode())


def topology_of(project: Project) -> RouteTopology:
    return RouteTopology.of(project.routes[ROUTE], project.settings.queue_prefix)


async def count_on(broker: Broker, queue: str) -> int:
    return (await broker.queue_info(queue)).messages


async def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def report_of(folder: Path, name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((folder / (name + ".report.json")).read_bytes())
    return loaded


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    return tmp_path / "inbox"


@pytest.fixture
async def gateways(rabbit_project: Project, broker: Broker, inbox: Path,
                   tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Builds started folder gateways on ``inbox``, each on its own broker connection; stops them after."""
    started: list[tuple[FolderGateway, Broker]] = []

    async def start(name: str = "drop", metrics: Metrics | None = None, **options: Any) -> FolderGateway:
        connection = make_broker(rabbit_project.settings.broker_url)
        await connection.connect()
        settings = {"min_age": 0.3, "poll_interval": 0.05, **options}
        listener = FolderListener(name=name, path=str(inbox), route=ROUTE, ledger=str(tmp_path / "ledger"),
                                  **settings)
        gateway = FolderGateway(listener, connection, rabbit_project.settings, rabbit_project.routes[ROUTE], metrics)
        await gateway.start()
        started.append((gateway, connection))
        return gateway

    yield start
    for gateway, connection in started:
        await gateway.stop()
        await connection.close()


async def test_a_dropped_file_is_published_and_moved_to_done_with_its_report(
        rabbit_project: Project, broker: Broker, inbox: Path, gateways: Callable[..., Any]) -> None:
    metrics = Metrics()
    await gateways(metrics=metrics)
    body = batch(50)
    (inbox / "adt-0001.hl7").write_bytes(body)
    done = inbox / "done"
    await wait_for(lambda: (done / "adt-0001.hl7.report.json").exists())
    assert await count_on(broker, topology_of(rabbit_project).inbound) == 50
    assert (done / "adt-0001.hl7").read_bytes() == body
    report = report_of(done, "adt-0001.hl7")
    assert report["outcome"] == "done"
    assert (report["records"], report["published"], report["dead_lettered"]) == (50, 50, 0)
    assert report["digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    assert report["control_total"] == "ok"
    assert not (inbox / "adt-0001.hl7").exists() and not any((inbox / "processing").iterdir())
    message = await broker.get(topology_of(rabbit_project).inbound)
    assert message is not None
    assert message.headers["x-mw-ingest"] == "folder:drop"
    assert message.headers["x-mw-batch-id"] == report["digest"]
    assert message.headers["x-mw-source-file"] == "adt-0001.hl7"
    assert message.headers["x-mw-batch-total"] == 50  # BTS-1, known before the first record was published
    await message.reject(requeue=True)
    assert metrics.value("middleware_folder_files_finished", folder="drop", outcome="done") == 1
    assert metrics.value("middleware_folder_records", folder="drop", outcome="published") == 50
    # the same file dropped again is recognised by its digest: not published twice
    (inbox / "again.hl7").write_bytes(body)
    await wait_for(lambda: (done / "again.hl7.report.json").exists())
    assert report_of(done, "again.hl7")["outcome"] == "duplicate"
    assert await count_on(broker, topology_of(rabbit_project).inbound) == 50


async def test_a_file_still_being_written_is_not_taken_early(
        rabbit_project: Project, broker: Broker, inbox: Path, gateways: Callable[..., Any]) -> None:
    await gateways(min_age=1.0)
    path = inbox / "slow.hl7"
    path.write_bytes(b"BHS|^~\\&|EHR\r")
    for n in range(1, 9):  # a message every 0.3 s: the size keeps changing for 2.4 s
        await asyncio.sleep(0.3)
        assert path.exists(), f"taken after {n - 1} of 8 messages were written"
        with path.open("ab") as out:
            out.write(adt(n))
    with path.open("ab") as out:
        out.write(b"BTS|8\r")
    await wait_for(lambda: (inbox / "done" / "slow.hl7.report.json").exists())
    report = report_of(inbox / "done", "slow.hl7")
    assert (report["published"], report["control_total"]) == (8, "ok")
    assert await count_on(broker, topology_of(rabbit_project).inbound) == 8


async def test_marker_mode_waits_for_the_done_file(
        rabbit_project: Project, broker: Broker, inbox: Path, gateways: Callable[..., Any]) -> None:
    await gateways(complete="marker", min_age=0.0)
    (inbox / "m.hl7").write_bytes(batch(3))
    await asyncio.sleep(0.5)
    assert (inbox / "m.hl7").exists()  # no marker: not taken, however old
    (inbox / "m.hl7.done").write_bytes(b"")
    await wait_for(lambda: (inbox / "done" / "m.hl7.report.json").exists())
    assert not (inbox / "m.hl7.done").exists()
    assert await count_on(broker, topology_of(rabbit_project).inbound) == 3


async def test_a_broken_record_is_dead_lettered_alone_and_the_file_is_done_with_its_position(
        rabbit_project: Project, broker: Broker, inbox: Path, gateways: Callable[..., Any]) -> None:
    await gateways(min_age=0.0)
    body = b"BHS|^~\\&|EHR\rZZZ|not a message\r" + b"".join(adt(n) for n in range(1, 6)) + b"BTS|7\r"
    (inbox / "broken.hl7").write_bytes(body)
    await wait_for(lambda: (inbox / "done" / "broken.hl7.report.json").exists())
    report = report_of(inbox / "done", "broken.hl7")
    assert report["outcome"] == "done"
    assert (report["published"], report["dead_lettered"], report["dead_lettered_positions"]) == (5, 1, [1])
    assert "BTS-1 declares 7" in report["control_total"]
    topology = topology_of(rabbit_project)
    assert await count_on(broker, topology.inbound) == 5
    dead = await broker.get(topology.dead_letter)
    assert dead is not None
    assert dead.headers["x-mw-batch-position"] == 1
    await dead.reject(requeue=True)


async def test_two_gateways_on_one_folder_take_each_file_once(
        rabbit_project: Project, broker: Broker, inbox: Path, gateways: Callable[..., Any]) -> None:
    inbox.mkdir()
    files, per_file = 30, 40
    for index in range(files):
        (inbox / f"f{index:03}.hl7").write_bytes(batch(per_file, first=index * per_file + 1))
    first = await gateways(name="a", min_age=0.0, poll_interval=0.01)
    second = await gateways(name="b", min_age=0.0, poll_interval=0.01)
    done = inbox / "done"
    await wait_for(lambda: len(list(done.glob("*.report.json"))) >= files)
    await asyncio.sleep(0.3)  # a second take of any file would show up meanwhile
    names_a = {r.file for r in first.reports}
    names_b = {r.file for r in second.reports}
    assert not names_a & names_b
    assert len(names_a | names_b) == files
    assert names_a and names_b, "one gateway took every file: the race was not exercised"
    assert sorted(p.name for p in done.glob("*.report.json")) == [f"f{i:03}.hl7.report.json" for i in range(files)]
    assert await count_on(broker, topology_of(rabbit_project).inbound) == files * per_file


GATEWAY_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from middleware.broker import make_broker
    from middleware.ingest import FolderListener
    from middleware.ingest.folder import FolderGateway
    from middleware.project import load_project

    async def main(repo, inbox, ledger, files="1"):
        files = int(files)
        project = load_project(repo)
        broker = make_broker(project.settings.broker_url)
        await broker.connect()
        listener = FolderListener(name="drop", path=inbox, route="adt-inbound", min_age=0.0, poll_interval=0.05,
                                  ledger=ledger)
        gateway = FolderGateway(listener, broker, project.settings, project.routes["adt-inbound"])
        await gateway.start()
        print("started", flush=True)
        while len(gateway.reports) < files:
            await asyncio.sleep(0.05)
        await gateway.stop()
        await broker.close()
        print("finished", flush=True)

    asyncio.run(main(*sys.argv[1:]))
""")


async def positions_on(broker: Broker, queue: str, expected: int) -> list[int]:
    """The batch position of every message on ``queue`` (left unacked, then handed back)."""
    found: list[int] = []
    held: list[IncomingMessage] = []

    async def take(message: IncomingMessage) -> None:
        found.append(int(message.headers["x-mw-batch-position"]))
        held.append(message)

    consumer = await broker.consume(queue, take, prefetch=min(expected + 1000, 65_535))  # all held unacked
    deadline = asyncio.get_running_loop().time() + 60
    while len(found) < expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    await consumer.cancel()
    for message in held:
        await message.reject(requeue=True)
    return found


def as_unprivileged() -> list[str]:
    """The command prefix that runs a process as a user who cannot read another's 0600 file: ``nobody``
    when the tests run as root (CI does; root reads any file whatever its mode), else ourselves."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


async def test_a_file_that_cannot_be_opened_goes_to_failed_and_the_next_files_are_taken(
        rabbit_project: Project, rabbit_env: dict[str, str], broker: Broker) -> None:
    """The gateway runs in a process of a user the file's mode shuts out (``nobody`` under root): the
    open fails with EACCES as it would in production, the file goes to failed/ with its report, and the
    file behind it in the inbox is still published (an unreadable file does not block the folder)."""
    shared = Path(tempfile.mkdtemp(prefix="mw-folder-"))  # not tmp_path: pytest's is 0700, closed to nobody
    try:
        shared.chmod(0o777)
        inbox = shared / "inbox"
        inbox.mkdir(mode=0o777)
        inbox.chmod(0o777)
        locked = inbox / "a-locked.hl7"
        locked.write_bytes(batch(2))
        locked.chmod(0o200 if not as_unprivileged() else 0o600)  # root's own, readable by root only
        os.utime(locked, ns=(1, 1))  # the oldest: taken first
        readable = inbox / "b-fine.hl7"
        readable.write_bytes(batch(3))
        readable.chmod(0o666)
        ledger = shared / "ledger"
        ledger.mkdir(mode=0o777)
        ledger.chmod(0o777)
        command = [*as_unprivileged(), sys.executable, "-c", GATEWAY_SCRIPT, str(REPO), str(inbox), str(ledger), "2"]
        env = {**rabbit_env, "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(shared)}
        done = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        report = report_of(inbox / "failed", "a-locked.hl7")
        assert report["outcome"] == "failed"
        assert report["error"].startswith("PermissionError"), report
        assert (inbox / "failed" / "a-locked.hl7").exists() and not locked.exists()
        assert report_of(inbox / "done", "b-fine.hl7")["published"] == 3
        assert await count_on(broker, topology_of(rabbit_project).inbound) == 3
    finally:
        shutil.rmtree(shared, ignore_errors=True)


WATCHER_SCRIPT = textwrap.dedent("""
    import asyncio, json, pathlib, sys
    from middleware.broker import make_broker
    from middleware.ingest import FolderListener
    from middleware.ingest.folder import FolderGateway
    from middleware.project import load_project

    async def main(repo, inbox, ledger, name, files):
        project = load_project(repo)
        broker = make_broker(project.settings.broker_url)
        await broker.connect()
        listener = FolderListener(name=name, path=inbox, route="adt-inbound", min_age=0.0, poll_interval=0.01,
                                  ledger=ledger)
        gateway = FolderGateway(listener, broker, project.settings, project.routes["adt-inbound"])
        await gateway.start()
        print("watching", flush=True)
        done = pathlib.Path(inbox) / "done"
        while len(list(done.glob("*.report.json"))) < int(files):
            await asyncio.sleep(0.05)
        await gateway.stop()
        await broker.close()
        print(json.dumps([r.file for r in gateway.reports]), flush=True)

    asyncio.run(main(*sys.argv[1:]))
""")


async def batch_keys_on(broker: Broker, queue: str, expected: int) -> list[tuple[str, int]]:
    """(``x-mw-batch-id``, ``x-mw-batch-position``) of every message on ``queue`` (held, then handed back)."""
    found: list[tuple[str, int]] = []
    held: list[IncomingMessage] = []

    async def take(message: IncomingMessage) -> None:
        found.append((str(message.headers["x-mw-batch-id"]), int(message.headers["x-mw-batch-position"])))
        held.append(message)

    consumer = await broker.consume(queue, take, prefetch=min(expected + 1000, 65_535))
    await wait_for(lambda: len(found) >= expected)
    await asyncio.sleep(0.3)  # one more would show up meanwhile
    await consumer.cancel()
    for message in held:
        await message.reject(requeue=True)
    return found


async def test_two_engine_processes_on_one_folder_claim_each_file_once_and_publish_each_record_once(
        rabbit_project: Project, rabbit_env: dict[str, str], broker: Broker, inbox: Path, tmp_path: Path) -> None:
    """Two separate processes (their own interpreters, broker connections and locks) race for 30 files."""
    inbox.mkdir()
    staging = tmp_path / "staging"  # written here, renamed into the inbox once both engines watch it
    staging.mkdir()
    files, per_file = 30, 40
    for index in range(files):
        (staging / f"f{index:03}.hl7").write_bytes(batch(per_file, first=index * per_file + 1))
    await declare(broker, topology_of(rabbit_project), rabbit_project.settings.delivery_limit)
    command = [sys.executable, "-c", WATCHER_SCRIPT, str(REPO), str(inbox), str(tmp_path / "ledger")]
    engines = [subprocess.Popen([*command, name, str(files)], env=rabbit_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE) for name in ("a", "b")]
    try:
        for engine in engines:
            assert engine.stdout is not None
            assert await asyncio.to_thread(engine.stdout.readline) == b"watching\n", engine.stderr
        for path in sorted(staging.iterdir()):
            path.rename(inbox / path.name)
        outputs = [await asyncio.to_thread(engine.communicate, timeout=90) for engine in engines]
    finally:
        for engine in engines:
            if engine.poll() is None:
                engine.kill()
    assert [engine.returncode for engine in engines] == [0, 0], [err.decode()[-2000:] for _, err in outputs]
    taken = [set(orjson.loads(out.splitlines()[-1])) for out, _ in outputs]
    assert not taken[0] & taken[1], "a file was claimed by both engines"
    assert taken[0] | taken[1] == {f"f{i:03}.hl7" for i in range(files)}
    assert taken[0] and taken[1], "one engine took every file: the race was not exercised"
    queue = topology_of(rabbit_project).inbound
    assert await count_on(broker, queue) == files * per_file
    keys = await batch_keys_on(broker, queue, files * per_file)
    assert len(keys) == len(set(keys)) == files * per_file  # every record of every file, once


@pytest.mark.timeout(240)
async def test_sigkill_mid_file_then_restart_publishes_every_record(
        rabbit_project: Project, rabbit_env: dict[str, str], broker: Broker, inbox: Path, tmp_path: Path) -> None:
    total = 20_000
    inbox.mkdir()
    (inbox / "big.hl7").write_bytes(batch(total))
    command = [sys.executable, "-c", GATEWAY_SCRIPT, str(REPO), str(inbox), str(tmp_path / "ledger")]
    queue = topology_of(rabbit_project).inbound
    await declare(broker, topology_of(rabbit_project), rabbit_project.settings.delivery_limit)
    first = subprocess.Popen(command, env=rabbit_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while await count_on(broker, queue) < 2_000:
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    published_before = await count_on(broker, queue)
    assert published_before < total, "the file finished before the kill: make it bigger"
    assert (inbox / "processing" / "big.hl7").exists()
    second = subprocess.run(command, env=rabbit_env, capture_output=True, timeout=120)
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    report = report_of(inbox / "done", "big.hl7")
    assert report["resumed_from"] is not None and report["resumed_from"] > 1
    on_queue = await count_on(broker, queue)
    assert on_queue >= total, (on_queue, published_before, report)
    positions = await positions_on(broker, queue, on_queue)
    assert set(positions) == set(range(1, total + 1))  # every record present
    duplicates = len(positions) - total
    assert 0 <= duplicates <= 256  # only the in-flight window is published twice


async def test_the_engine_starts_configured_folders_and_counts_their_files_in_metrics(
        rabbit_project: Project, broker: Broker, inbox: Path, tmp_path: Path) -> None:
    listener = FolderListener(name="drops", path=str(inbox), queue="ehr.adt", min_age=0.2, poll_interval=0.05,
                              ledger=str(tmp_path / "ledger"))
    settings = dataclasses.replace(rabbit_project.settings, ingest={"folder": (listener,)})
    engine = Engine(dataclasses.replace(rabbit_project, settings=settings))
    await engine.start()
    try:
        assert [type(g) for g in engine.gateways] == [FolderGateway]
        (inbox / "adt.hl7").write_bytes(batch(4))
        await wait_for(lambda: (inbox / "done" / "adt.hl7.report.json").exists())
        assert report_of(inbox / "done", "adt.hl7")["published"] == 4
        assert engine.metrics.value("middleware_folder_files_finished", folder="drops", outcome="done") == 1
        await wait_for(lambda: engine.metrics.value("middleware_messages_received", route=ROUTE) == 4)
    finally:
        await engine.stop()
