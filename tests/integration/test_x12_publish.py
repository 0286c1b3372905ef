"""``middleware publish`` of X12 834 files on the real RabbitMQ: one event per member, a member that cannot be
framed dead-lettered alone naming its file and position, control-total mismatches reported on the file."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

from middleware.broker import naming
from middleware.broker.base import Broker
from middleware.deadletter import DeadLetter
from middleware.engine import Engine
from middleware.project import Project
from tests.x12_files import file_834

Cli = Callable[..., subprocess.CompletedProcess[str]]
MEMBERS = 20
BROKEN = 7


async def archived(path: Path, expected: int, timeout: float = 30.0) -> list[dict[str, object]]:
    """The events in the event-archive file once it holds ``expected`` of them (and a moment later)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not path.exists() or len(path.read_text().splitlines()) < expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{path} has {len(path.read_text().splitlines()) if path.exists() else 0} events, "
                                 f"want {expected}")
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # any extra would arrive meanwhile
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_an_834_with_a_broken_member_gives_n_minus_1_events_and_one_dead_letter_at_its_position(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "834-enrolment.x12"
    control = random.randrange(10**8, 10**9)  # a file never published before, whatever remembers files
    path.write_bytes(file_834(MEMBERS, garbled={BROKEN}, control=control))
    result = await asyncio.to_thread(cli, "publish", str(path), "--queue", "x12.enrolment")
    assert "warning" not in result.stderr  # the SE/GE/IEA counts agree

    events = await archived(tmp_path / "event-archive.jsonl", MEMBERS - 1)
    assert len(events) == MEMBERS - 1
    members = sorted(e["data"]["coverage"]["member_id"] for e in events)  # type: ignore[index]
    expected = sorted(f"{'D' if n % 3 == 2 else 'M'}{n:07d}" for n in range(1, MEMBERS + 1) if n != BROKEN)
    assert members == expected
    assert {e["type"] for e in events} == {"coverage.enrolled.v1"}

    queue = naming.dead_letter_queue("enrolment-x12", rabbit_project.settings.queue_prefix)
    message = await broker.get(queue)
    assert message is not None
    letter = DeadLetter.from_message(message)
    await message.ack()
    assert await broker.get(queue) is None  # that one alone
    assert letter.stage == "parse" and letter.route == "enrolment-x12"
    assert "has no valid segment id" in letter.error
    assert message.headers["x-mw-batch-position"] == BROKEN and message.headers["x-mw-source-file"] == path.name
    assert message.headers["x-mw-x12-isa13"] == str(control) and message.headers["x-mw-x12-st02"] == "0001"
    assert b"ZZ*M0000007" in letter.body and b"M0000008" not in letter.body  # the broken member's own segments


async def test_control_totals_that_disagree_are_reported_and_every_member_still_goes_on(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "834-bad-counts.x12"
    control = random.randrange(10**8, 10**9)
    path.write_bytes(file_834(3, se_count=99, iea_count=2, control=control))
    result = await asyncio.to_thread(cli, "publish", str(path), "--queue", "x12.enrolment")
    assert f"warning: {path}: transaction set ST-2 0001: SE-1 declares 99 segment(s), it holds 37" in result.stderr
    assert (f"warning: {path}: interchange ISA-13 {control}: IEA-1 declares 2 functional group(s), it holds 1"
            in result.stderr)
    events = await archived(tmp_path / "event-archive.jsonl", 3)
    assert len(events) == 3
    queue = naming.dead_letter_queue("enrolment-x12", rabbit_project.settings.queue_prefix)
    assert (await broker.queue_info(queue)).messages == 0
