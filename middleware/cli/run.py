"""``middleware run``: the main job, until SIGTERM/SIGINT (which drain, then exit 0).

Start-up order: the metrics listener binds first, then the engine connects, binds its MLLP
listeners and only then consumes; a port that is taken ends the start with one error line and
exit 1 before any message is taken. Every line on stderr is a log line (JSON by default).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

import typer

from middleware.cli.common import ProjectOption, fail
from middleware.engine import Engine
from middleware.errors import ConfigError, MiddlewareError
from middleware.observe import configure_logging, log_loop_exception, serve_metrics
from middleware.project import Project, load_project
from middleware.reload import Reloader

log = logging.getLogger("middleware.run")


class LogLevel(StrEnum):
    """``--log-level`` values."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(StrEnum):
    """``--log-format`` values: JSON lines for log collectors, text for a person at a terminal."""

    JSON = "json"
    TEXT = "text"


async def _serve_metrics(engine: Engine) -> Any:
    """Bind ``metrics.host:metrics.port`` (if set); the aiohttp runner to clean up, or None."""
    settings = engine.settings
    if settings.metrics_port is None:
        return None
    from middleware.console import DISABLED, console_extras, setup_console  # jinja2 only for `run`
    from middleware.depths import DepthSampler

    depths = DepthSampler(engine.project, engine.metrics, broker=engine.broker)  # middleware_queue_messages
    console: list[bool] = []

    def operations(app: Any) -> None:
        depths.attach(app)
        console.append(setup_console(app, engine.project, engine.metrics, extras=console_extras(engine),
                                     depths=depths))

    runner = await serve_metrics(engine.metrics, settings.metrics_host, settings.metrics_port, setup=operations)
    depths.start()
    port = runner.addresses[0][1] if runner.addresses else settings.metrics_port
    log.info("metrics listening", extra={"host": settings.metrics_host, "port": port, "console": all(console)})
    if not all(console):
        log.info(DISABLED)
    return runner


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    """First SIGTERM/SIGINT: drain. A second one: exit at once (128 + signal number), without
    draining; the broker gives back what was unacked (RabbitMQ when the connection drops, the
    embedded broker at the next start)."""
    if stop.is_set():
        log.warning("second signal: exiting without draining", extra={"signal": sig.name})
        os._exit(128 + sig.value)
    log.info("stopping: draining in-flight messages", extra={"signal": sig.name})
    stop.set()


async def run_engine(project: Project, *, watch: bool = False) -> None:
    """Bind the listeners, start the engine; return after a drained stop on SIGTERM or SIGINT.
    SIGHUP (and with ``watch`` a changed file) reloads the project (:mod:`middleware.reload`)."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(log_loop_exception)
    engine = Engine(project)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    reloader = Reloader(engine, project.root, watch=watch)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)  # taken from here on, acted on once started
    server = await _serve_metrics(engine)  # before anything connects or consumes
    try:
        try:
            await engine.start()  # connect, declare, MLLP listeners, then consumers
        except BaseException:
            await engine.stop()  # release what did start (listeners, connections) before reporting
            raise
        reloader.start()
        try:
            await stop.wait()
        finally:
            await reloader.stop()  # a reload under way finishes first
            await engine.stop()
    finally:
        if server is not None:
            await server.cleanup()


def _fail(message: str, log_format: LogFormat) -> NoReturn:
    """One error line and exit 1: a JSON log line, or ``error: ...`` with ``--log-format text``."""
    if log_format is LogFormat.TEXT:
        fail(message)
    log.error(" ".join(message.split()), extra={"exit_code": 1})
    raise typer.Exit(1)


def run(project: Path = ProjectOption,
        log_level: LogLevel = typer.Option(LogLevel.INFO, "--log-level", case_sensitive=False,
                                           help="Our loggers' level (libraries log warnings and up)."),
        log_format: LogFormat = typer.Option(LogFormat.JSON, "--log-format", case_sensitive=False,
                                             help="json: one JSON object per stderr line; text: for a terminal."),
        watch: bool = typer.Option(False, "--watch", help="Reload routes, connectors, schemas and lookups when "
                                                          "their files change (SIGHUP always reloads).")
        ) -> None:
    """Run route workers and delivery workers until SIGTERM (drains in-flight messages, exits 0).
    SIGHUP reloads the project; an invalid one is refused and the running version goes on."""
    configure_logging(log_level.value, json_lines=log_format is LogFormat.JSON)
    try:
        loaded = load_project(project)
        asyncio.run(run_engine(loaded, watch=watch))
    except ConfigError as exc:  # an invalid project, or an MLLP port that is taken
        _fail("; ".join(str(problem) for problem in exc.problems) or str(exc), log_format)
    except MiddlewareError as exc:  # broker unreachable, metrics port taken...
        _fail(str(exc), log_format)


def register(app: typer.Typer) -> None:
    app.command()(run)
