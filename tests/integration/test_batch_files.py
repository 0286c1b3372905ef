"""Batch files on the real RabbitMQ through ``middleware publish``: a CSV roster's broken row dead-letters
alone with its position, the same file again is recognised, a trailer that disagrees is reported, and a
publish SIGKILLed mid-file resumes at its checkpoint (every record present, repeats only from the window)."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from middleware.broker import IncomingMessage
from middleware.broker.base import Broker
from middleware.deadletter import DeadLetter
from middleware.ingest.publisher import DEFAULT_WINDOW
from middleware.project import Project
from middleware.topology import RouteTopology, declare

REPO = Path(__file__).resolve().parents[2]
ROSTER = REPO / "samples" / "eligibility-batch" / "payer-roster-2026-11.csv"
QUEUE = "payer.roster"
HEADER = "member_id,mrn,payer,status\n"
Cli = Callable[..., subprocess.CompletedProcess[str]]


def names(project: Project) -> RouteTopology:
    return RouteTopology.of(project.routes["eligibility-batch"], project.settings.queue_prefix)


async def take_all(broker: Broker, queue: str, expected: int, *, settle: float = 1.0) -> list[IncomingMessage]:
    """Every message on ``queue`` (waits for ``expected``, then ``settle`` seconds for extras), each
    acked as it comes (the queue is emptied)."""
    found: list[IncomingMessage] = []

    async def take(message: IncomingMessage) -> None:
        found.append(message)
        await message.ack()

    consumer = await broker.consume(queue, take, prefetch=2000)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while len(found) < expected and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(settle)
    await consumer.cancel()
    return found


async def test_a_roster_row_that_does_not_frame_dead_letters_alone_with_its_position(
        cli: Cli, broker: Broker, rabbit_project: Project) -> None:
    result = await asyncio.to_thread(cli, "publish", str(ROSTER), "--queue", QUEUE)
    assert f"{ROSTER}: 12 records, 11 published, 1 dead-lettered; control total: ok" in result.stderr.splitlines()
    topology = names(rabbit_project)
    queued = await take_all(broker, topology.inbound, 11)
    digest = "sha256:" + hashlib.sha256(ROSTER.read_bytes()).hexdigest()
    assert [m.headers["x-mw-batch-position"] for m in queued] == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]
    assert {(m.headers["x-mw-batch-id"], m.headers["x-mw-batch-total"]) for m in queued} == {(digest, 12)}
    [letter_message] = await take_all(broker, topology.dead_letter, 1, settle=0.2)
    letter = DeadLetter.from_message(letter_message)
    assert letter.stage == "parse" and "CSV row 7 (line 8) has 12 fields, expected 13" in letter.error
    assert letter_message.headers["x-mw-batch-position"] == 7 and letter_message.headers["x-mw-csv-line"] == 8
    assert letter.body.startswith(b"MBR700142,DEMO-MRN-4106,Quispe")


async def test_the_same_file_again_is_reported_and_publishes_nothing_unless_forced(
        cli: Cli, broker: Broker, rabbit_project: Project, tmp_path: Path) -> None:
    path = tmp_path / "roster.csv"
    path.write_text(HEADER + "".join(f"M{n},MRN{n},Acme,active\n" for n in range(1, 6)) + "TRAILER,5\n")
    inbound = names(rabbit_project).inbound
    await asyncio.to_thread(cli, "publish", str(path), "--queue", QUEUE)
    again = await asyncio.to_thread(cli, "publish", str(path), "--queue", QUEUE)
    assert "published 0 message(s)" in again.stderr and f"{path}: already published to this route" in again.stderr
    assert len(await take_all(broker, inbound, 5)) == 5  # once, not twice
    forced = await asyncio.to_thread(cli, "publish", str(path), "--queue", QUEUE, "--force")
    assert "published 5 message(s)" in forced.stderr
    assert len(await take_all(broker, inbound, 5)) == 5


async def test_a_csv_trailer_that_disagrees_is_reported_on_the_file(
        cli: Cli, broker: Broker, rabbit_project: Project, tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text(HEADER + "M1,MRN1,Acme,active\nM2,MRN2,Acme,active\nM3,MRN3,Acme,active\nTRAILER,5\n")
    result = await asyncio.to_thread(cli, "publish", str(path), "--queue", QUEUE)
    assert (f"{path}: 3 records, 3 published, 0 dead-lettered; control total: CSV trailer declares 5 rows, "
            "the file has 3") in result.stderr.splitlines()
    assert len(await take_all(broker, names(rabbit_project).inbound, 3)) == 3  # the records still go on


@pytest.mark.timeout(600)  # 100k confirmed publishes and a 100k drain on the shared 2-core machine
async def test_sigkill_mid_file_then_publish_again_resumes_at_the_checkpoint(
        rabbit_env: dict[str, str], broker: Broker, rabbit_project: Project, tmp_path: Path) -> None:
    total = 100_000
    path = tmp_path / "big-roster.csv"
    path.write_text(HEADER + "".join(f"M{n},MRN{n},Acme,active\n" for n in range(1, total + 1)) + f"TRAILER,{total}\n")
    topology = names(rabbit_project)
    await declare(broker, topology, rabbit_project.settings.delivery_limit)  # to watch it fill from the start
    inbound = topology.inbound
    command = [sys.executable, "-m", "middleware", "publish", str(path), "--queue", QUEUE, "--project", str(REPO)]
    process = subprocess.Popen(command, env=rabbit_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (await broker.queue_info(inbound)).messages < 20_000 and process.poll() is None:
        assert time.monotonic() < deadline, "publish made no progress"
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    before = (await broker.queue_info(inbound)).messages
    assert 0 < before < total  # killed mid-file
    resumed = await asyncio.to_thread(subprocess.run, command, env=rabbit_env, capture_output=True, text=True,
                                      timeout=500)
    assert resumed.returncode == 0, resumed.stderr
    assert ", resumed after record " in resumed.stderr and "control total: ok" in resumed.stderr
    positions = Counter(int(m.headers["x-mw-batch-position"]) for m in await take_all(broker, inbound, total))
    print(f"killed at {before} on the queue; resumed: {resumed.stderr.splitlines()[-1]}")
    assert set(positions) == set(range(1, total + 1))  # every record present
    repeated = sum(count - 1 for count in positions.values())
    assert repeated <= DEFAULT_WINDOW  # only what was in flight when it was killed
