"""Hot reload for ``middleware run``: routes, connectors, schemas and lookups, on SIGHUP or ``--watch``.

A reload loads the whole project again (the same loader as ``validate``). An invalid project is
refused: its ``file:line`` problems are logged and the engine keeps running the last good version.
A valid one replaces the workers between messages, with the engine's own drain (DESIGN promise 6):

1. declare the new topology and start the new connectors (a failure here refuses the reload, nothing
   has stopped);
2. cancel every consumer, wait for the handlers in flight to finish and ack, close the old
   consumers and connectors (:meth:`Engine.cancel_consumers`, :meth:`Engine.drain`);
3. start consumers for the new routes (:meth:`Engine.start_workers`).

Unacked messages are never processed by two versions: after step 2 nothing is in flight, and what
RabbitMQ had not delivered waits in the queue for the new consumers. One mechanism serves every
change (a map, a new delivery, a new route, a connector URL); the price is a pause as long as the
slowest handler in flight. Broker, queue prefix, ingest listeners, metrics, journal and audit
settings need a restart: a reload keeps the running values and logs which ones changed. Ingest
listeners keep the routes they started with. Breakers start closed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path

from prometheus_client import Counter

from middleware import topology
from middleware.delivery.base import Connector, make_connector
from middleware.engine import Engine
from middleware.errors import Problem
from middleware.project import Project, Settings, check_project
from middleware.topology import Topology

log = logging.getLogger("middleware.reload")

WATCHED = ("routes", "connectors", "schemas", "config/lookups")  # folders whose files a reload reads
SETTINGS_FILE = "config/middleware.yaml"
RESTART_SETTINGS = ("broker_url", "broker_tls", "queue_prefix", "ingest", "metrics_host", "metrics_port",
                    "journal", "audit_path", "tracing")  # what a running engine cannot change without a restart
POLL_SECONDS = 1.0


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime in ns, size) of every file a reload reads; route test cases excluded."""
    found: dict[str, tuple[int, int]] = {}
    for folder in WATCHED:
        for path in (root / folder).rglob("*"):
            if path.is_file() and not path.is_relative_to(root / "routes" / "tests"):
                found[str(path.relative_to(root))] = _stamp(path)
    settings = root / SETTINGS_FILE
    if settings.is_file():
        found[SETTINGS_FILE] = _stamp(settings)
    return found


def _stamp(path: Path) -> tuple[int, int]:
    try:
        info = path.stat()
    except OSError:  # removed between listing and stat: the next poll sees it gone
        return (0, -1)
    return (info.st_mtime_ns, info.st_size)


class Reloader:
    """Reloads ``engine``'s project from ``root`` on :meth:`request` (SIGHUP) and, with ``watch``, when
    a watched file changes (polled every ``interval`` seconds; a change is applied once the files
    stop changing for one interval). Counts ``middleware_reloads_total{outcome=ok|refused|failed}``."""

    def __init__(self, engine: Engine, root: Path, *, watch: bool = False, interval: float = POLL_SECONDS) -> None:
        self.engine = engine
        self.root = root
        self.watch = watch
        self.interval = interval
        self.outcomes = Counter("middleware_reloads", "Project reloads by outcome (ok, refused, failed)",
                                ["outcome"], registry=engine.metrics.registry)
        self._requested = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin watching (with ``watch``) and answering :meth:`request`."""
        self._task = asyncio.create_task(self._run(), name="reloader")

    def request(self) -> None:
        """Ask for a reload (what SIGHUP does); it runs after any reload under way."""
        log.info("reload requested")
        self._requested.set()

    async def stop(self) -> None:
        """Let a reload under way finish, then stop watching."""
        async with self._lock:
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
                self._task = None

    async def _run(self) -> None:
        seen = await asyncio.to_thread(snapshot, self.root) if self.watch else {}
        while True:
            with contextlib.suppress(TimeoutError):  # a poll interval passed without a request
                await asyncio.wait_for(self._requested.wait(), self.interval if self.watch else None)
            trigger = "signal" if self._requested.is_set() else None
            if self.watch:
                now = await asyncio.to_thread(snapshot, self.root)
                while now != seen:  # editors write in steps: wait until the files settle
                    seen = now
                    trigger = trigger or "watch"
                    await asyncio.sleep(self.interval)
                    now = await asyncio.to_thread(snapshot, self.root)
            if trigger is not None:
                self._requested.clear()
                await self.reload(trigger)

    async def reload(self, trigger: str = "api") -> bool:
        """Load the project again and apply it; False when refused (the last good version keeps running)."""
        async with self._lock:
            started = time.monotonic()
            project, problems = await asyncio.to_thread(check_project, self.root)
            if project is None:
                self._refused(problems, trigger)
                return False
            project = self._running_settings(project)
            try:
                await self._apply(project)
            except Exception as exc:  # the broker refused a declare, a connector did not start...
                self.outcomes.labels("failed").inc()
                log.error("reload failed; the last good version keeps running",
                          extra={"trigger": trigger, "error": type(exc).__name__, "detail": str(exc)})
                return False
            self.outcomes.labels("ok").inc()
            log.info("reload ok", extra={"trigger": trigger, "routes": sorted(project.routes),
                                         "seconds": round(time.monotonic() - started, 3)})
            return True

    def _refused(self, problems: list[Problem], trigger: str) -> None:
        self.outcomes.labels("refused").inc()
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        log.error(f"reload refused: {problems[0] if problems else 'invalid project'}{more}; "
                  "the last good version keeps running",
                  extra={"trigger": trigger, "problems": [str(p) for p in problems]})

    def _running_settings(self, project: Project) -> Project:
        """``project`` with the running engine's broker, listener, metrics, journal and audit settings."""
        running: Settings = self.engine.settings
        changed = [key for key in RESTART_SETTINGS if getattr(project.settings, key) != getattr(running, key)]
        if changed:
            log.warning("settings changed that need a restart to apply; the running values are kept",
                        extra={"settings": changed})
        kept = replace(project.settings, **{key: getattr(running, key) for key in RESTART_SETTINGS})
        return replace(project, settings=kept)

    async def _apply(self, project: Project) -> None:
        engine = self.engine
        new_topology = Topology.of(project.routes.values(), project.settings.queue_prefix)
        for route_topology in new_topology:  # before anything stops: a refusal leaves the engine as it was
            await topology.declare(engine.broker, route_topology, project.settings.delivery_limit)
        connectors = await _start_connectors(project)
        old_sources = {name: (r.source_queue, r.format.name) for name, r in engine.project.routes.items()}
        new_sources = {name: (r.source_queue, r.format.name) for name, r in project.routes.items()}
        consumers = await engine.cancel_consumers()
        await engine.drain(consumers)  # in-flight handlers finish; old consumers and connectors close
        previous = engine.project
        engine.project, engine.settings, engine.topology = project, project.settings, new_topology
        engine.connectors, engine.gates = connectors, {}
        try:
            await engine.start_workers()
        except Exception:
            try:
                await self._restore(previous)
            except Exception as exc:
                log.critical("reload failed and the last good version did not restart: no messages are "
                             "consumed; restart the engine", extra={"error": type(exc).__name__})
            raise
        if engine.gateways and old_sources != new_sources:
            log.warning("ingest listeners keep the routes they started with; restart to apply route "
                        "additions, removals or source changes to them")

    async def _restore(self, previous: Project) -> None:
        """Put the last good version back after the new workers failed to start."""
        engine = self.engine
        await engine.drain(await engine.cancel_consumers())
        engine.project, engine.settings = previous, previous.settings
        engine.topology = Topology.of(previous.routes.values(), previous.settings.queue_prefix)
        engine.connectors, engine.gates = await _start_connectors(previous), {}
        await engine.start_workers()


async def _start_connectors(project: Project) -> dict[str, Connector]:
    """A started connector for every connector the project's routes deliver to."""
    used = sorted({rule.connector for route in project.routes.values() for rule in route.deliver})
    connectors = {name: make_connector(project.connectors[name]) for name in used}
    opened: list[Connector] = []
    try:
        for connector in connectors.values():
            await connector.start()
            opened.append(connector)
    except BaseException:
        for connector in opened:
            await connector.close()
        raise
    return connectors

