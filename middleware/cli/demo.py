"""``middleware demo``: a first-run tour on the embedded broker.

Publishes every file of samples/<route>/ to that route's queue, runs the engine until idle and
prints what happened per route and where the outputs went. Nothing leaves the machine: every
http connector is pointed at a local sink the demo starts, and file connectors write under
var/demo/out/. With ``MIDDLEWARE_BROKER_URL`` it runs on that RabbitMQ under its own queue
prefix (``<queue_prefix>demo-<random>.``) and deletes every queue and exchange it declared when it
ends. URLs are printed masked (:func:`middleware.observe.safe_url`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import typer
from aiohttp import web
from rich.console import Console
from rich.table import Table

from middleware import topology
from middleware.broker import make_broker
from middleware.cli.common import JsonOption, ProjectOption, fail, open_project, print_json
from middleware.cli.publish import publish_files
from middleware.delivery.base import ConnectorSpec
from middleware.engine import Engine
from middleware.errors import BrokerError
from middleware.observe import configure_logging, safe_url
from middleware.project import Project
from middleware.topology import Topology


class LocalSink:
    """A local HTTP server standing in for every http connector; counts what each received."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def accept(request: web.Request) -> web.Response:
            await request.read()
            self.received[request.match_info["name"]] += 1
            return web.Response(status=202)

        app = web.Application()
        app.add_routes([web.post("/{name}", accept), web.put("/{name}", accept), web.patch("/{name}", accept)])
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _demo_connectors(project: Project, sink: LocalSink, out_dir: Path) -> dict[str, ConnectorSpec]:
    specs = {}
    for name, spec in project.connectors.items():
        options = dict(spec.options)
        if spec.type == "http":
            options["url"] = f"{sink.url}/{name}"
        elif spec.type == "file":
            options["path"] = str(out_dir / f"{name}.jsonl")
        specs[name] = dataclasses.replace(spec, options=options)
    return specs


async def _wait_until_idle(engine: Engine, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    calm = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        calm = calm + 1 if await engine.is_idle() else 0
        if calm >= 3:
            return True
    return False


def demo_topology(project: Project) -> tuple[list[str], list[str]]:
    """(queues, exchanges) the demo declares for ``project``: its :class:`Topology`."""
    names = Topology.of(project.routes.values(), project.settings.queue_prefix)
    return names.queues, names.exchanges


async def remove_topology(project: Project) -> list[str]:
    """Delete every queue and exchange of the project's topology (messages in them too); their names."""
    broker = make_broker(project.settings.broker_url)
    await broker.connect()
    try:
        return await topology.delete(broker, Topology.of(project.routes.values(), project.settings.queue_prefix))
    finally:
        await broker.close()


async def run_demo(project: Project, timeout: float) -> dict[str, object]:
    """Run the tour; returns per-route counts and where outputs went."""
    demo_dir = project.root / "var" / "demo"
    out_dir = demo_dir / "out"
    shared_broker = "MIDDLEWARE_BROKER_URL" in os.environ
    if shared_broker:  # a broker others use: our own names, all removed at the end
        prefix = f"{project.settings.queue_prefix}demo-{uuid.uuid4().hex[:6]}."
        settings = dataclasses.replace(project.settings, queue_prefix=prefix)
    else:
        shutil.rmtree(demo_dir, ignore_errors=True)
        settings = dataclasses.replace(project.settings, broker_url=f"filesystem://{(demo_dir / 'broker').resolve()}")
    project = dataclasses.replace(project, settings=settings)
    sink = LocalSink()
    await sink.start()
    engine = Engine(project, connector_specs=_demo_connectors(project, sink, out_dir), gateways=False)
    published: Counter[str] = Counter()
    removed: list[str] = []
    try:
        await engine.start()
        for route in project.routes.values():
            files = sorted(p for p in (project.root / "samples" / route.name).glob("*") if p.is_file())
            if files:
                published[route.name] = len(await publish_files(project, files, route.source_queue))
        idle = await _wait_until_idle(engine, timeout)
        dead_letters = {}
        for names in engine.topology:
            dead_letters[names.route] = (await engine.broker.queue_info(names.dead_letter)).messages
    finally:
        try:
            await engine.stop()
            await sink.close()
        finally:
            if shared_broker:
                removed = await remove_topology(project)
    m = engine.metrics
    routes = [{
        "route": name,
        "published": published[name],
        "received": int(m.total("middleware_messages_received", route=name)),
        "filtered": int(m.total("middleware_messages_filtered", route=name)),
        "events": int(m.total("middleware_events_published", route=name)),
        "delivered": int(m.total("middleware_events_delivered", route=name)),
        "dead_lettered": int(m.total("middleware_dead_lettered", route=name)),
        "dead_letter_queue": engine.topology.route(name).dead_letter,
        "dead_letters_waiting": dead_letters[name],
    } for name in sorted(project.routes)]
    outputs = []
    for name, connector in sorted(engine.connectors.items()):
        if connector.spec.type == "http":
            count = sink.received[name]
            where = f"local demo sink standing in for {safe_url(str(project.connectors[name].options.get('url')))}"
        else:
            count = _count_lines(Path(connector.spec.options["path"]))
            where = connector.describe()
        outputs.append({"connector": name, "type": connector.spec.type, "events": count, "where": where})
    return {"idle": idle, "routes": routes, "outputs": outputs, "broker": safe_url(settings.broker_url),
            "queue_prefix": settings.queue_prefix, "removed": removed}


def _count_lines(path: Path) -> int:
    return sum(1 for _ in path.open()) if path.exists() else 0


def demo(project: Path = ProjectOption, as_json: bool = JsonOption,
         timeout: float = typer.Option(60.0, help="Seconds to wait for the engine to go idle.")) -> None:
    """Publish samples/ on the embedded broker, run until idle, print per-route outcomes and outputs."""
    configure_logging("WARNING")
    loaded = open_project(project)
    try:
        report = asyncio.run(run_demo(loaded, timeout))
    except BrokerError as exc:
        fail(str(exc))
    if as_json:
        print_json(report)
    else:
        _print_report(report)
    if not report["idle"]:
        fail(f"the engine did not go idle within {timeout:.0f}s")


def _print_report(report: dict[str, object]) -> None:
    console = Console() if sys.stdout.isatty() else Console(width=120)  # pipes and CI logs: no truncation
    table = Table(title=f"middleware demo — broker {report['broker']}")
    for column in ("route", "published", "received", "filtered", "events", "delivered", "dead-lettered"):
        table.add_column(column, justify="left" if column == "route" else "right")
    routes = report["routes"]
    assert isinstance(routes, list)
    for row in routes:
        table.add_row(row["route"], *(str(row[k]) for k in
                                      ("published", "received", "filtered", "events", "delivered", "dead_lettered")))
    console.print(table)
    console.print("Where the outputs went:")
    outputs = report["outputs"]
    assert isinstance(outputs, list)
    for out in outputs:
        console.print(f"  {out['connector']} ({out['type']}): {out['events']} event(s) -> {out['where']}")
    removed = report["removed"]
    for row in routes:
        if row["dead_letters_waiting"] and not removed:
            console.print(f"  dead letters: {row['dead_letters_waiting']} in queue {row['dead_letter_queue']} "
                          f"(original bytes + reason headers)")
    if isinstance(removed, list) and removed:
        console.print(f"Removed the demo's {len(removed)} queues and exchanges (prefix {report['queue_prefix']}) "
                      "from RabbitMQ.")


def register(app: typer.Typer) -> None:
    app.command()(demo)
