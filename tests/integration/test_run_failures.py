"""``middleware run`` failing cleanly on the real RabbitMQ: a taken port is one error line and exit 1
before anything is consumed; every stderr line is JSON, broker connection losses included."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from middleware.broker import naming
from middleware.broker.base import Broker, OutgoingMessage
from middleware.engine import declare_route_topology
from middleware.project import Project

from .conftest import REPO

pytestmark = pytest.mark.rabbitmq
A01 = (REPO / "samples" / "adt-inbound" / "a01-admit.hl7").read_bytes()


@contextmanager
def taken_port() -> Iterator[int]:
    """A port some other program is listening on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])


def run_command(*options: str) -> list[str]:
    return [sys.executable, "-m", "middleware", "run", "--project", str(REPO), *options]


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line as JSON (fails the test on the first line that is not)."""
    entries = []
    for line in stderr.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"stderr line is not JSON: {line!r}")
    return entries


@pytest.fixture
async def waiting(broker: Broker, rabbit_project: Project) -> AsyncIterator[str]:
    """The project's queues declared and one ADT message waiting on the adt-inbound queue."""
    settings = rabbit_project.settings
    for route in rabbit_project.routes.values():
        await declare_route_topology(broker, route, settings)
    queue = naming.inbound_queue(rabbit_project.routes["adt-inbound"].source_queue, settings.queue_prefix)
    await broker.publish(OutgoingMessage(A01, correlation_id="waiting-1"), queue=queue)
    yield queue


async def assert_untouched(broker: Broker, project: Project, queue: str) -> None:
    """The waiting message is still there, never delivered to a consumer; nothing was dead-lettered."""
    assert (await broker.queue_info(queue)).messages == 1
    message = await broker.get(queue)
    assert message is not None and message.correlation_id == "waiting-1"
    assert not message.redelivered and message.delivery_count == 0
    await message.ack()
    for route in project.routes:
        assert (await broker.queue_info(naming.dead_letter_queue(route, project.settings.queue_prefix))).messages == 0


def run_until_exit(env: dict[str, str], cwd: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(run_command(*options), env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=90)


async def test_a_taken_metrics_port_is_one_error_line_before_anything_is_consumed(
        broker: Broker, rabbit_project: Project, rabbit_env: dict[str, str], waiting: str, tmp_path: Path) -> None:
    with taken_port() as port:
        result = await asyncio.to_thread(run_until_exit, {**rabbit_env, "METRICS_PORT": str(port)}, tmp_path)
    assert result.returncode == 1, result.stderr
    [error] = [entry for entry in json_lines(result.stderr) if entry["level"] == "error"]
    assert error["event"].startswith(f"metrics.port {port}: cannot listen on 127.0.0.1:{port}")
    assert error["exit_code"] == 1
    await assert_untouched(broker, rabbit_project, waiting)


async def test_a_taken_mllp_port_is_one_error_line_before_anything_is_consumed(
        broker: Broker, rabbit_project: Project, rabbit_env: dict[str, str], waiting: str, tmp_path: Path) -> None:
    with taken_port() as port:
        result = await asyncio.to_thread(run_until_exit, {**rabbit_env, "MLLP_PORT": str(port)}, tmp_path)
    assert result.returncode == 1, result.stderr
    entries = json_lines(result.stderr)
    [error] = [entry for entry in entries if entry["level"] == "error"]
    assert "ingest.mllp ehr-adt" in error["event"] and f"127.0.0.1:{port}" in error["event"]
    assert not any(entry["event"] == "engine started" for entry in entries)
    await assert_untouched(broker, rabbit_project, waiting)


async def test_with_text_logs_a_taken_port_is_one_plain_error_line(
        broker: Broker, rabbit_project: Project, rabbit_env: dict[str, str], waiting: str, tmp_path: Path) -> None:
    with taken_port() as port:
        result = await asyncio.to_thread(run_until_exit, {**rabbit_env, "METRICS_PORT": str(port)}, tmp_path,
                                         "--log-format", "text")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: metrics.port {port}: cannot listen on 127.0.0.1:{port}: Address already in use (is another "
        "engine running on this host? give each its own metrics.port (METRICS_PORT), or 0 for any free port)"]
    await assert_untouched(broker, rabbit_project, waiting)


class Running:
    """``middleware run`` as a process, its stderr collected line by line as it comes."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen(run_command(), env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    async def wait_for(self, event: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """The first log entry ``event`` whose fields include ``fields``."""
        for _ in range(int(timeout / 0.1)):
            for line in list(self.lines):
                if event in line:
                    entry: dict[str, Any] = json.loads(line)
                    if entry["event"] == event and all(entry.get(k) == v for k, v in fields.items()):
                        return entry
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {event!r} log line; stderr so far: {self.lines}")

    async def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.process.wait, 60)
        await asyncio.to_thread(self._reader.join, 10)
        return code


async def close_connections_of(pid: int) -> int:
    """``rabbitmqctl close_connection`` every connection of process ``pid``; how many were closed."""
    listed = await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "list_connections", "-q", "pid",
                                                      "client_properties"], capture_output=True, text=True, timeout=60)
    mine = [line.split("\t")[0] for line in listed.stdout.splitlines() if f" pid {pid} #" in line]
    for connection in mine:
        closed = await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "close_connection", connection,
                                                          "fault injection"], capture_output=True, text=True,
                                         timeout=60)
        assert closed.returncode == 0, closed.stderr
    return len(mine)


async def test_lost_and_restored_connections_are_logged_with_counts_and_every_line_is_json(
        broker: Broker, rabbit_env: dict[str, str], tmp_path: Path) -> None:
    running = Running(rabbit_env, tmp_path)
    try:
        await running.wait_for("engine started")
        for cut in (1, 2):
            assert await close_connections_of(running.process.pid) == 1
            lost = await running.wait_for("broker connection lost", losses=cut)
            restored = await running.wait_for("broker connection restored", restores=cut)
            assert lost["level"] == "warning" and lost["broker"] == "amqp://***@127.0.0.1:5672/"
            assert restored["losses"] == cut and restored["down_seconds"] >= 0
        assert sum("broker connection lost" in line for line in running.lines) == 2  # once per outage
    finally:
        code = await running.stop()
    assert code == 0, running.lines
    json_lines("\n".join(running.lines))  # the libraries' lines (aiormq, aio_pika) too
