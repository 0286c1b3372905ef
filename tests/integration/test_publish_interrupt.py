"""Ctrl-C while ``middleware publish`` sends a large batch to the real RabbitMQ: the confirms in flight
are awaited, the printed resume position is exact, and resuming there completes the batch once."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from middleware.broker import IncomingMessage, naming
from middleware.broker.base import Broker
from middleware.project import Project

REPO = Path(__file__).resolve().parents[2]
TOTAL = 8000


def adt(n: int) -> bytes:
    return (f"MSH|^~\\&|EHR|GHH|ADT|GHH|20260101120000||ADT^A01|MSG{n}|P|2.5\r"
            f"EVN|A01|20260101120000\rPID|1||{n}^^^GHH^MR||DOE^JOHN||19800101|M\rPV1|1|I\r").encode()


async def positions_on(broker: Broker, queue: str, expected: int) -> list[int]:
    """The batch positions of every message on ``queue`` (expects ``expected`` of them; waits a
    moment longer for any extra), left unacked so the queue keeps them."""
    found: list[int] = []
    held: list[IncomingMessage] = []

    async def take(message: IncomingMessage) -> None:
        found.append(int(message.headers["x-mw-batch-position"]))
        held.append(message)

    consumer = await broker.consume(queue, take, prefetch=TOTAL)
    deadline = asyncio.get_running_loop().time() + 30
    while len(found) < expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # anything beyond ``expected`` would arrive meanwhile
    await consumer.cancel()
    for message in held:
        await message.reject(requeue=True)
    return found


async def test_ctrl_c_prints_an_exact_resume_position(rabbit_env: dict[str, str], rabbit_project: Project,
                                                      broker: Broker, tmp_path: Path) -> None:
    path = tmp_path / "big-batch.hl7"
    path.write_bytes(b"BHS|^~\\&|EHR\r" + b"".join(adt(n) for n in range(1, TOTAL + 1)) + f"BTS|{TOTAL}\r".encode())
    command = [sys.executable, "-m", "middleware", "publish", str(path), "--queue", "ehr.adt", "--project", str(REPO)]
    process = subprocess.Popen(command, env=rabbit_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if len(lines) == 200:  # publishing is well under way, with confirms in flight
                started.set()
        started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert await asyncio.to_thread(started.wait, 60)
    process.send_signal(signal.SIGINT)
    stderr = await asyncio.to_thread(process.stderr.read)
    code = await asyncio.to_thread(process.wait, 60)
    await asyncio.to_thread(reader.join, 10)
    assert code == 130, stderr
    match = re.search(r"interrupted: ([\d,]+) record\(s\) of (\S+) confirmed; resume with: (.+) --from (\d+)$",
                      stderr, re.MULTILINE)
    assert match, stderr
    resume = int(match.group(4))
    assert 200 < resume <= TOTAL and int(match.group(1).replace(",", "")) == resume - 1
    assert match.group(3).endswith(f"publish {path} --queue ehr.adt --project {REPO}")
    assert "Traceback" not in stderr and "published" in stderr  # the summary is printed too
    # every message before the resume position was confirmed, printed and is on the queue; none after it
    assert [line.split()[1] for line in lines] == [f"{path}#{n}" for n in range(1, resume)]
    inbound = naming.inbound_queue("ehr.adt", rabbit_project.settings.queue_prefix)
    assert sorted(await positions_on(broker, inbound, resume - 1)) == list(range(1, resume))

    resumed = await asyncio.to_thread(subprocess.run, [*command, "--from", str(resume)], env=rabbit_env,
                                      capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"published {TOTAL - resume + 1:,} message(s)" in resumed.stderr
    assert sorted(await positions_on(broker, inbound, TOTAL)) == list(range(1, TOTAL + 1))
