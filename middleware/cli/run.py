"""``middleware run``: the main job, until SIGTERM/SIGINT (which drain, then exit 0)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import typer

from middleware.cli.common import ProjectOption, fail, open_project
from middleware.engine import Engine
from middleware.errors import MiddlewareError
from middleware.observe import configure_logging, serve_metrics
from middleware.project import Project


async def run_engine(project: Project) -> None:
    """Start the engine and serve metrics; return after a drained stop on SIGTERM or SIGINT."""
    engine = Engine(project)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await engine.start()
    except BaseException:
        await engine.stop()  # release what did start (consumers, connections) before reporting
        raise
    settings = project.settings
    server = None
    if settings.metrics_port is not None:
        server = await serve_metrics(engine.metrics, settings.metrics_host, settings.metrics_port)
    try:
        await stop.wait()
    finally:
        if server is not None:
            await server.cleanup()
        await engine.stop()


def run(project: Path = ProjectOption,
        log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR.")) -> None:
    """Run route workers and delivery workers until SIGTERM (drains in-flight messages, exits 0)."""
    configure_logging(log_level.upper())
    loaded = open_project(project)
    try:
        asyncio.run(run_engine(loaded))
    except MiddlewareError as exc:  # broker unreachable, listener port taken...
        fail(str(exc))


def register(app: typer.Typer) -> None:
    app.command()(run)
