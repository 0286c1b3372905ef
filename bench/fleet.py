"""Shared pieces of the scale benchmarks (bench/engines.py, bench/cluster.py): ``middleware run`` engine
processes of the shipped project on a broker (a per-run queue prefix), a local aiohttp sink standing in for
the case-management system that counts the CloudEvents it receives, and ADT A01 messages with a unique
MSH-10 each (one ``patient.admitted`` event per message at the sink).

Each engine is a separate ``middleware run --project <repo>`` process; its file deliveries (bed board, event
archive) go to a folder on /dev/shm, so the HTTP sink is the one downstream system that is measured.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from bench/: tests.local_http is found from the checkout

from tests.local_http import LocalHttpServer  # noqa: E402

ROUTE = "adt-inbound"
SAMPLE = REPO / "samples" / "adt-inbound" / "a01-admit.hl7"


def adt_messages(count: int, tag: str) -> list[bytes]:
    """``count`` copies of the A01 sample with MSH-10 ``<tag>-<n>`` (distinct events at the sink)."""
    lines = SAMPLE.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\r").split(b"\r")
    msh = lines[0].split(b"|")
    out = []
    for n in range(count):
        msh[9] = f"{tag}-{n}".encode()
        out.append(b"\r".join([b"|".join(msh), *lines[1:]]) + b"\r")
    return out


class CountingSink(LocalHttpServer):
    """A local HTTP server answering 200 to every CloudEvent; counts each event id and when it first came."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()
        self.first_at: dict[str, float] = {}

    async def handle(self, request: web.Request) -> web.Response:
        event = orjson.loads(await request.read())
        event_id = str(event.get("id"))
        self.seen[event_id] += 1
        self.first_at.setdefault(event_id, time.monotonic())
        return web.Response(text="ok")

    @property
    def unique(self) -> int:
        return len(self.seen)

    @property
    def duplicates(self) -> int:
        return sum(self.seen.values()) - len(self.seen)

    def rate(self) -> float:
        """Distinct events per second from the first to the last one received."""
        times = sorted(self.first_at.values())
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0

    def longest_gap(self) -> float:
        """The longest pause, in seconds, between two new events (a failover shows here)."""
        times = sorted(self.first_at.values())
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    async def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.unique < count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.unique >= count


class Fleet:
    """``middleware run`` processes of the shipped project on ``url`` under a fresh queue prefix."""

    def __init__(self, url: str, sink: CountingSink, *, prefix: str | None = None) -> None:
        self.url = url
        self.sink = sink
        self.prefix = prefix or f"bench-{uuid.uuid4().hex[:8]}."
        self.out = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp") / f"mw-fleet-{uuid.uuid4().hex[:8]}"
        self.out.mkdir()
        self.engines: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, "MIDDLEWARE_BROKER_URL": self.url, "MIDDLEWARE_QUEUE_PREFIX": self.prefix,
                "CASE_MANAGEMENT_URL": self.sink.url, "CDR_URL": self.sink.url,
                "MLLP_PORT": "0", "METRICS_PORT": "0", "HTTP_INGEST_PORT": "0", "HTTP_INGEST_TOKEN": "bench",
                "BED_BOARD_PATH": str(self.out / "bed-board.jsonl"),
                "EVENT_ARCHIVE_PATH": str(self.out / "event-archive.jsonl"),
                "AUDIT_LOG": str(self.out / "audit.log"), "MIDDLEWARE_INGEST_LEDGER": str(self.out / "ingest")}

    def start(self, count: int) -> None:
        for n in range(count):
            log = (self.out / f"engine-{len(self.engines) + n}.log").open("wb")
            self.engines.append(subprocess.Popen(
                [sys.executable, "-m", "middleware", "run", "--project", str(REPO)], env=self.env(),
                stdout=subprocess.DEVNULL, stderr=log, cwd=self.out))

    async def wait_consuming(self, publisher: Any, timeout: float = 120.0) -> None:
        """Until every engine consumes the route's inbound and delivery queues (its start is over)."""
        topology = publisher.topology
        queues = [topology.inbound, *topology.deliveries.values()]
        deadline = time.monotonic() + timeout
        while True:
            infos = [await publisher.broker.queue_info(queue) for queue in queues]
            if all(info.consumers >= len(self.engines) for info in infos):
                return
            if time.monotonic() > deadline or not self.alive():
                raise SystemExit(f"engines did not start consuming:\n{self.tail()}")
            await asyncio.sleep(0.2)

    def kill(self, index: int) -> None:
        """SIGKILL one engine (what a crash or an OOM kill does)."""
        self.engines[index].send_signal(signal.SIGKILL)
        self.engines[index].wait(10)

    def alive(self) -> int:
        return sum(engine.poll() is None for engine in self.engines)

    def stop(self) -> None:
        """SIGTERM (drain) every engine still running; SIGKILL what does not exit in 30 s."""
        for engine in self.engines:
            if engine.poll() is None:
                engine.send_signal(signal.SIGTERM)
        for engine in self.engines:
            try:
                engine.wait(30)
            except subprocess.TimeoutExpired:
                engine.kill()
                engine.wait(10)
        self.engines.clear()

    def tail(self, lines: int = 20) -> str:
        """The end of each engine's stderr (for a failed run)."""
        return "\n".join(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                         for path in sorted(self.out.glob("engine-*.log")))

    async def publisher(self) -> Any:
        """A connected :class:`~middleware.ingest.publisher.Publisher` of the route, its queues declared."""
        from middleware.broker import make_broker
        from middleware.ingest.publisher import Publisher
        from middleware.project import load_project

        project = load_project(REPO, self.env())
        broker = make_broker(self.url)
        await broker.connect()
        publisher = Publisher(broker, project.routes[ROUTE], project.settings)
        await publisher.declare()
        return publisher

    async def delete_queues(self) -> None:
        """Delete every queue and exchange of the project under this run's prefix."""
        from middleware import topology
        from middleware.broker import make_broker
        from middleware.project import load_project
        from middleware.topology import Topology

        project = load_project(REPO, self.env())
        broker = make_broker(self.url)
        await broker.connect()
        try:
            await topology.delete(broker, Topology.of(project.routes.values(), self.prefix))
        finally:
            await broker.close()

    def remove_outputs(self) -> None:
        for path in sorted(self.out.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        self.out.rmdir()


async def publish_all(publisher: Any, messages: list[bytes], *, window: int = 64) -> None:
    """Publish every message with confirms, ``window`` at a time."""
    for start in range(0, len(messages), window):
        await asyncio.gather(*(publisher.publish(raw, source="bench") for raw in messages[start:start + window]))
