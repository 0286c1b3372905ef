"""Benchmark: SIGTERM with thousands of deliveries in flight to a sink slower than the drain timeout.

A copy of the shipped project (``engine.prefetch`` and ``engine.drain_timeout`` set from the
options) runs as ``middleware run`` on the real RabbitMQ under a fresh queue prefix; ``--messages``
distinct ADT^A04 messages are published, the sink answers each request after ``--sink-delay``
seconds. Once ``--in-flight`` requests reached the sink the process gets SIGTERM. Printed: exit
status and seconds to exit, then what is left in the delivery queue (messages, distinct ids, by
``x-delivery-count``) and in the dead-letter queue. Everything declared is deleted afterwards.

Run: .venv/bin/python bench/drain.py [--messages 2500] [--in-flight 2000] [--sink-delay 10] [--drain-timeout 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from middleware import topology  # noqa: E402
from middleware.broker import make_broker, naming  # noqa: E402
from middleware.cli.publish import publish_files  # noqa: E402
from middleware.project import Project, load_project  # noqa: E402
from middleware.topology import Topology  # noqa: E402

A04 = (REPO / "samples" / "adt-inbound" / "a04-register.hl7").read_bytes()
AMQP_URL = os.environ.get("MIDDLEWARE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def project_copy(folder: Path, prefetch: int, drain_timeout: float) -> Path:
    """The shipped project under ``folder`` with ``engine.prefetch`` and ``engine.drain_timeout`` replaced."""
    for name in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / name, folder / name)
    config = folder / "config" / "middleware.yaml"
    text = re.sub(r"(?m)^(\s+prefetch:)\s*\d+", rf"\1 {prefetch}", config.read_text())
    config.write_text(re.sub(r"(?m)^(\s+drain_timeout:)\s*[\d.]+", rf"\1 {drain_timeout}", text))
    return folder


async def delete_topology(project: Project) -> None:
    client = make_broker(project.settings.broker_url)
    await client.connect()
    await topology.delete(client, Topology.of(project.routes.values(), project.settings.queue_prefix))
    await client.close()


async def main(args: argparse.Namespace) -> None:
    received: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        received.append(request.headers.get("Idempotency-Key", ""))
        await request.read()
        await asyncio.sleep(args.sink_delay)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/events"
    with tempfile.TemporaryDirectory() as tmp:
        folder = project_copy(Path(tmp), args.in_flight, args.drain_timeout)
        env = {**os.environ, "MIDDLEWARE_BROKER_URL": AMQP_URL,
               "MIDDLEWARE_QUEUE_PREFIX": f"bench{uuid.uuid4().hex[:6]}.",
               "CASE_MANAGEMENT_URL": url, "CDR_URL": url, "MLLP_PORT": "0", "METRICS_PORT": "0",
               "BED_BOARD_PATH": f"{tmp}/bed-board.jsonl", "EVENT_ARCHIVE_PATH": f"{tmp}/archive.jsonl"}
        project = load_project(folder, env)
        batch = Path(tmp, "batch.hl7")
        batch.write_bytes(b"".join(A04.replace(b"DEMO-A04-0001", f"B-{n:06d}".encode()).rstrip(b"\r\n") + b"\r\n"
                                   for n in range(args.messages)))
        try:
            await publish_files(project, [batch], "ehr.adt")
            with Path(tmp, "run.log").open("wb") as log:
                process = subprocess.Popen([sys.executable, "-m", "middleware", "run", "--project", str(folder)],
                                           env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp)
                deadline = time.monotonic() + 180
                while len(received) < args.in_flight and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                in_flight = len(received)
                started = time.monotonic()
                process.send_signal(signal.SIGTERM)
                try:
                    code: int | str = await asyncio.to_thread(process.wait, args.drain_timeout + 120)
                except subprocess.TimeoutExpired:
                    code = "still running (killed)"
                    process.kill()
                seconds = time.monotonic() - started
            print(f"requests at the sink when SIGTERM was sent: {in_flight}")
            print(f"exit status {code} after {seconds:.1f} s (drain_timeout {args.drain_timeout} s)")
            client = make_broker(AMQP_URL)
            await client.connect()
            prefix = project.settings.queue_prefix
            queue = naming.delivery_queue("adt-inbound", "case-management", prefix)
            ids: list[str | None] = []
            counts: dict[int, int] = {}
            while (message := await client.get(queue)) is not None:
                ids.append(message.message_id)
                counts[message.delivery_count] = counts.get(message.delivery_count, 0) + 1
                await message.ack()
            dead = (await client.queue_info(naming.dead_letter_queue("adt-inbound", prefix))).messages
            await client.close()
            print(f"left in the delivery queue: {len(ids)} messages, {len(set(ids))} distinct, "
                  f"by x-delivery-count {dict(sorted(counts.items()))}; dead letters: {dead}")
        finally:
            await delete_topology(project)
            await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2500)
    parser.add_argument("--in-flight", type=int, default=2000, help="also engine.prefetch")
    parser.add_argument("--sink-delay", type=float, default=10.0)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    asyncio.run(main(parser.parse_args()))
