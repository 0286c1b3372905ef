"""``middleware status``: queue depths, consumers, oldest message age, dead letters and engine rates.

Per route it shows the inbound queue, each delivery queue (with its parked deliveries: the sum of
its delay queues' depths) and the dead-letter queue, then, if a running engine's ``/metrics``
answers, per-route rates, dead-letter totals by stage and each connector's breaker state.

Where the numbers come from:

- **RabbitMQ**: a passive queue declare gives ready messages and consumers (a queue that does not
  exist yet is "not declared"). The oldest message's age is **n/a**: AMQP 0-9-1 has no way to look at
  a queue's head without taking the message, and a ``basic.get`` + reject would count as a delivery
  on quorum queues (moving the message closer to its delivery limit and the dead-letter queue).
  The management plugin's HTTP API is not assumed to be there.
- **Embedded spool broker** (``filesystem://<dir>``): status reads ``<dir>/queues`` directly, read
  only (it creates nothing and takes no lock). Each ready message is one file named
  ``<20-digit wall-clock ns>_<uuid>.<queue>.msg``, so the depth is the number of files for the queue
  and the oldest age is "now" minus the stamp of the first file name in sort order (the head of the
  FIFO). A requeued message is written again with a new stamp, so its age restarts. Consumers: the
  engine holds ``<dir>/consumer.lock`` while it consumes every inbound and delivery queue; status
  looks the lock up in ``/proc/locks`` (no lock is taken, so it cannot get in an engine's way) and
  shows 1 consumer per work queue when it is held, "n/a" where ``/proc/locks`` does not exist.
- **Any other kombu URL** (``memory://``): the broker port; consumers and age are per process there.

Engine rates: the middleware_* counters of ``http://<metrics.host>:<metrics.port>/metrics``, read twice
one second apart (with ``--watch``, between two refreshes). No answer is not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from middleware.broker import make_broker
from middleware.broker.base import Broker
from middleware.cli.common import JsonOption, ProjectOption, fail, open_project, print_json
from middleware.cli.status_sla import journal_view, render_sla
from middleware.errors import BrokerError
from middleware.ingest.folder import folder_status
from middleware.observe import safe_url
from middleware.project import Project
from middleware.tls import TlsOptions
from middleware.topology import Topology

CONNECT_TIMEOUT = 15.0
METRICS_TIMEOUT = 2.0
RATE_WINDOW = 1.0
SPOOL_STAMP_DIGITS = 20
AGE_NOT_AVAILABLE = {
    "amqp": "AMQP cannot read a queue's head without taking the message (a get + reject would count a "
            "delivery on quorum queues)",
    "kombu": "this broker keeps no message times",
}


@dataclass
class QueueStatus:
    """One queue as status sees it; ``None`` means the broker cannot tell."""

    queue: str
    role: str  # inbound | delivery | delay | dead-letter
    connector: str | None = None
    declared: bool = True
    messages: int | None = None
    consumers: int | None = None
    oldest_age_seconds: float | None = None


@dataclass
class RouteStatus:
    route: str
    queues: list[QueueStatus] = field(default_factory=list)

    @property
    def dead_letters(self) -> int | None:
        dlq = next(q for q in self.queues if q.role == "dead-letter")
        return dlq.messages if dlq.declared else 0

    def parked(self, connector: str) -> int | None:
        """Deliveries to ``connector`` waiting in its delay queues (None if the broker cannot tell)."""
        depths = [q.messages if q.declared else 0 for q in self.queues
                  if q.role == "delay" and q.connector == connector]
        return None if None in depths else sum(d or 0 for d in depths)


@dataclass
class Counters:
    """The engine's middleware_* counters, per route, at one moment."""

    at: float
    received: dict[str, float] = field(default_factory=dict)
    filtered: dict[str, float] = field(default_factory=dict)
    events: dict[str, float] = field(default_factory=dict)
    delivered: dict[str, float] = field(default_factory=dict)
    dead_lettered: dict[str, dict[str, float]] = field(default_factory=dict)  # route -> stage -> total
    breakers: dict[str, float] = field(default_factory=dict)  # connector -> middleware_breaker_open (1: open)


# -- queues ------------------------------------------------------------------------------------------


def route_queues(project: Project) -> list[RouteStatus]:
    """Every queue of every route, in the order status shows them (no numbers yet)."""
    result = []
    for route in Topology.of(project.routes.values(), project.settings.queue_prefix):
        queues = [QueueStatus(route.inbound, "inbound")]
        for connector, queue in route.deliveries.items():
            queues.append(QueueStatus(queue, "delivery", connector))
            queues += [QueueStatus(delay, "delay", connector) for _, delay in route.delay_queues(connector)]
        for connector in route.ordered:  # an ordered delivery: its partition queues, no delivery queue
            queues += [QueueStatus(queue, "delivery", connector) for queue in route.partition_queues(connector)]
        queues.append(QueueStatus(route.dead_letter, "dead-letter"))
        result.append(RouteStatus(route.route, queues))
    return result


def spool_folder(url: str) -> Path | None:
    """The folder of an embedded ``filesystem://`` broker URL, else None."""
    parts = urlsplit(url)
    return Path(parts.netloc + parts.path) if parts.scheme == "filesystem" else None


def spool_queues(folder: Path, now_ns: int | None = None) -> dict[str, tuple[int, float | None]]:
    """(ready messages, oldest age in seconds) per queue, from the spool's ``queues/`` file names.

    The layout belongs to :mod:`middleware.broker.kombu_broker`: one file per ready message named
    ``<20-digit ns stamp>_<uuid>.<queue>.msg`` (temporary files start with a dot). Raises
    FileNotFoundError if the spool was never created.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    counts: dict[str, int] = {}
    oldest: dict[str, int] = {}
    for name in os.listdir(folder / "queues"):
        if name.startswith(".") or not name.endswith(".msg"):
            continue
        stamp_part, _, rest = name.partition(".")
        queue = rest[: -len(".msg")]
        stamp_text = stamp_part.split("_", 1)[0]
        counts[queue] = counts.get(queue, 0) + 1
        if len(stamp_text) == SPOOL_STAMP_DIGITS and stamp_text.isdigit():
            stamp = int(stamp_text)
            oldest[queue] = min(oldest.get(queue, stamp), stamp)
    return {queue: (count, round(max(0.0, (now_ns - oldest[queue]) / 1e9), 3) if queue in oldest else None)
            for queue, count in counts.items()}


def engine_holds_spool(folder: Path) -> bool | None:
    """True if a process holds the spool's consumer lock (an engine is consuming), None if unknowable.

    Read from ``/proc/locks`` rather than by trying the lock: trying it, even briefly, could make an
    engine that starts at that moment fail to get it.
    """
    try:
        inode = (folder / "consumer.lock").stat().st_ino
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in table.splitlines():
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields and any(f.rsplit(":", 1)[-1] == str(inode)
                                                              for f in fields if f.count(":") == 2):
            return True
    return False


def _held(folder: Path) -> dict[str, int]:
    """Messages an engine holds now (``processing/``), per queue, named like ready ones."""
    counts: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder / "processing"):
            if name.endswith(".msg"):
                queue = name.partition(".")[2][: -len(".msg")]
                counts[queue] = counts.get(queue, 0) + 1
    return counts


def fill_from_spool(routes: list[RouteStatus], folder: Path) -> None:
    """Depths, ages and consumers of the embedded broker, read from its folder."""
    try:
        found = spool_queues(folder)
    except FileNotFoundError:  # nothing was ever published or run here
        for route in routes:
            for queue in route.queues:
                queue.declared = False
        return
    engine = engine_holds_spool(folder)
    held = _held(folder)
    for route in routes:
        for queue in route.queues:
            queue.messages, queue.oldest_age_seconds = found.get(queue.queue, (0, None))
            if queue.role == "delay":  # the engine holds each delay queue's oldest message until it is due
                queue.messages += held.get(queue.queue, 0)
            if queue.role in ("dead-letter", "delay"):
                queue.consumers = 0  # dead letters are only read by `middleware dlq`; delay queues by nobody
            else:
                queue.consumers = None if engine is None else int(engine)


async def fill_from_broker(routes: list[RouteStatus], broker: Broker) -> None:
    """Depths and consumers through the broker port; a missing queue is 'not declared'."""
    for route in routes:
        for queue in route.queues:
            try:
                info = await broker.queue_info(queue.queue)
            except BrokerError:
                queue.declared = False
                continue
            queue.messages, queue.consumers = info.messages, info.consumers


async def connect(url: str, tls: TlsOptions | None = None) -> Broker:
    broker = make_broker(url, tls)
    try:
        await asyncio.wait_for(broker.connect(), CONNECT_TIMEOUT)
    except TimeoutError:
        raise BrokerError(f"cannot connect to the broker: no answer within {CONNECT_TIMEOUT:.0f} s") from None
    return broker


# -- engine metrics ----------------------------------------------------------------------------------


def metrics_url(project: Project) -> str | None:
    """Where a running engine serves /metrics, or None if that is not known (no port, or port 0)."""
    port = project.settings.metrics_port
    if not port:
        return None
    host = project.settings.metrics_host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "*") else ("[::1]" if host == "::" else host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def parse_counters(text: str, at: float) -> Counters:
    """The middleware_* counters of a Prometheus text page, summed per route."""
    from prometheus_client.parser import text_string_to_metric_families

    counters = Counters(at)
    simple = {"middleware_messages_received": counters.received, "middleware_messages_filtered": counters.filtered,
              "middleware_events_published": counters.events, "middleware_events_delivered": counters.delivered}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "middleware_breaker_open":
                counters.breakers[sample.labels.get("connector", "")] = sample.value
            if not sample.name.endswith("_total"):
                continue
            name = sample.name[: -len("_total")]
            route = sample.labels.get("route", "")
            if name in simple:
                simple[name][route] = simple[name].get(route, 0.0) + sample.value
            elif name == "middleware_dead_lettered":
                stages = counters.dead_lettered.setdefault(route, {})
                stage = sample.labels.get("stage", "?")
                stages[stage] = stages.get(stage, 0.0) + sample.value
    return counters


async def scrape(url: str) -> Counters | None:
    """Read the engine's counters once; None if nothing answers there."""
    import aiohttp

    try:
        timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    try:
        return parse_counters(text, time.monotonic())
    except ValueError:
        return None


def rates(before: Counters, after: Counters, routes: list[str]) -> dict[str, dict[str, Any]]:
    """Per route: received/s, events/s, delivered/s over the window, and totals that matter now."""
    elapsed = max(after.at - before.at, 1e-6)

    def per_second(series: str, route: str) -> float:
        now: float = getattr(after, series).get(route, 0.0)
        then: float = getattr(before, series).get(route, 0.0)
        return round(max(now - then, 0.0) / elapsed, 2)  # < 0: the engine restarted

    return {route: {"received_per_s": per_second("received", route), "events_per_s": per_second("events", route),
                    "delivered_per_s": per_second("delivered", route),
                    "received_total": int(after.received.get(route, 0.0)),
                    "filtered_total": int(after.filtered.get(route, 0.0)),
                    "dead_lettered_total": {stage: int(v) for stage, v in
                                            sorted(after.dead_lettered.get(route, {}).items()) if v}}
            for route in routes}


# -- one round ---------------------------------------------------------------------------------------


@dataclass
class Report:
    broker: str
    routes: list[RouteStatus]
    oldest_age_note: str | None
    metrics_url: str | None
    metrics: dict[str, dict[str, Any]] | None  # None: not reachable / not configured
    window_seconds: float | None = None
    folders: list[dict[str, Any]] = field(default_factory=list)  # ingest.folder[]: files by state
    breakers: dict[str, str] | None = None  # connector -> "open" / "closed", from the engine's /metrics

    def as_json(self) -> dict[str, Any]:
        return {
            "folders": self.folders,
            "broker": self.broker,
            "breakers": self.breakers,
            "routes": [{"route": r.route, "dead_letters": r.dead_letters,
                        "parked": {q.connector: r.parked(q.connector) for q in r.queues
                                   if q.role == "delivery" and q.connector},
                        "queues": [asdict(q) for q in r.queues],
                        "engine": (self.metrics or {}).get(r.route)} for r in self.routes],
            "oldest_age": self.oldest_age_note or "from the embedded broker's spool file names",
            "engine_metrics": {"url": self.metrics_url, "reachable": self.metrics is not None,
                               "window_seconds": self.window_seconds},
        }


class Status:
    """Collects reports; keeps the broker connection and the last metrics scrape between rounds."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.url = project.settings.broker_url
        self.spool = spool_folder(self.url)
        self.broker: Broker | None = None
        self.metrics_url = metrics_url(project)
        self.last: Counters | None = None

    async def open(self) -> None:
        if self.spool is None:
            self.broker = await connect(self.url, self.project.settings.broker_tls)
        elif (self.spool / "queues").exists() and not os.access(self.spool / "queues", os.R_OK | os.X_OK):
            raise BrokerError(f"cannot read the embedded broker at {self.spool}", hint="check the folder's permissions")

    async def close(self) -> None:
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.close()

    async def report(self) -> Report:
        routes = route_queues(self.project)
        if self.spool is not None:
            try:
                fill_from_spool(routes, self.spool)
            except OSError as exc:
                raise BrokerError(f"cannot read the embedded broker at {self.spool}: {exc.strerror or exc}") from None
            note = None
        else:
            assert self.broker is not None
            await fill_from_broker(routes, self.broker)
            note = AGE_NOT_AVAILABLE["amqp" if self.url.startswith(("amqp://", "amqps://")) else "kombu"]
        metrics, window = await self._metrics()
        folders = [folder_status(listener) for listener in self.project.settings.ingest.get("folder", ())]
        breakers = None if metrics is None or self.last is None else {
            connector: "open" if value else "closed" for connector, value in sorted(self.last.breakers.items())}
        return Report(safe_url(self.url), routes, note, self.metrics_url, metrics, window, folders, breakers)

    async def _metrics(self) -> tuple[dict[str, dict[str, Any]] | None, float | None]:
        if self.metrics_url is None:
            return None, None
        before = self.last
        if before is None:
            before = await scrape(self.metrics_url)
            if before is None:
                return None, None
            await asyncio.sleep(RATE_WINDOW)
        after = await scrape(self.metrics_url)
        self.last = after
        if after is None:
            return None, None
        return rates(before, after, sorted(self.project.routes)), round(after.at - before.at, 2)


# -- output ------------------------------------------------------------------------------------------


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    value = int(seconds)
    if value < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{value}s"
    if value < 3600:
        return f"{value // 60}m{value % 60:02d}s"
    if value < 86400:
        return f"{value // 3600}h{value % 3600 // 60:02d}m"
    return f"{value // 86400}d{value % 86400 // 3600:02d}h"


def _cell(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def render(report: Report, console: Console) -> None:
    table = Table(title=f"middleware status — broker {escape(report.broker)}", caption=(
        f"oldest: n/a — {escape(report.oldest_age_note)}" if report.oldest_age_note else None))
    for column, justify in (("route", "left"), ("queue", "left"), ("role", "left"), ("messages", "right"),
                            ("parked", "right"), ("consumers", "right"), ("oldest", "right")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for route in report.routes:
        shown = [q for q in route.queues if q.role != "delay"]  # delay queues: the delivery's parked count
        for index, queue in enumerate(shown):
            role = f"delivery → {queue.connector}" if queue.role == "delivery" else queue.role
            breaker = (report.breakers or {}).get(queue.connector or "") if queue.role == "delivery" else None
            if breaker == "open":
                role += " (breaker open)"
            parked = _cell(route.parked(queue.connector)) if queue.role == "delivery" and queue.connector else ""
            if not queue.declared:
                cells = ["not declared", "", "", ""]
            else:
                unknown = report.oldest_age_note and queue.oldest_age_seconds is None and queue.messages != 0
                age = "n/a" if unknown else format_age(queue.oldest_age_seconds)  # the journal may know
                cells = [_cell(queue.messages), parked, _cell(queue.consumers), age]
            table.add_row(escape(route.route) if index == 0 else "", escape(queue.queue), escape(role), *cells,
                          end_section=index == len(shown) - 1)
    console.print(table)
    if report.folders:
        folders = Table(title="watched folders")
        for column in ("folder", "waiting", "in progress", "done", "with dead letters", "failed"):
            folders.add_column(column, justify="left" if column == "folder" else "right")
        states = ("waiting", "in_progress", "done", "with_dead_letters", "failed")
        for item in report.folders:
            folders.add_row(escape(item["folder"]), *(str(item[state]) for state in states))
        console.print(folders)
    if report.metrics is None:
        where = report.metrics_url or "metrics.port is not set (or 0: any free port, unknown to status)"
        console.print(f"engine metrics: not reachable ({escape(where)})")
        return
    engine = Table(title=f"engine metrics — {escape(report.metrics_url or '')}, rates over {report.window_seconds}s")
    for column in ("route", "received/s", "events/s", "delivered/s", "received", "filtered", "dead-lettered"):
        engine.add_column(column, justify="left" if column in ("route", "dead-lettered") else "right")
    for name, values in report.metrics.items():
        dead = ", ".join(f"{stage} {count}" for stage, count in values["dead_lettered_total"].items()) or "0"
        engine.add_row(escape(name), f"{values['received_per_s']:g}", f"{values['events_per_s']:g}",
                       f"{values['delivered_per_s']:g}", str(values["received_total"]),
                       str(values["filtered_total"]), escape(dead))
    console.print(engine)


# -- command -----------------------------------------------------------------------------------------


async def _main(project: Project, as_json: bool, watch: float | None) -> None:
    status = Status(project)
    await status.open()
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        while True:
            started = time.monotonic()
            report = await status.report()
            journal = journal_view(project, report)  # SLA, feeds, oldest age where the broker cannot tell
            if as_json:
                print_json({**report.as_json(), "sla": journal.as_json()})
                sys.stdout.flush()
            else:
                if watch and console.is_terminal:
                    console.clear()
                render(report, console)
                render_sla(journal, console)
            if not watch:
                return
            await asyncio.sleep(max(watch - (time.monotonic() - started), 0.0))
    finally:
        await status.close()


def status(
    project: Path = ProjectOption,
    as_json: bool = JsonOption,
    watch: float | None = typer.Option(None, "--watch", min=0.5, metavar="SECONDS",
                                       help="Refresh every SECONDS until Ctrl-C (with --json: one line each)."),
) -> None:
    """Per route: queue depths and consumers (inbound, deliveries, dead letters), oldest message age where
    the broker can tell, and a running engine's rates from its /metrics. Exit 1 if the broker is unreachable."""
    loaded = open_project(project)
    for library in ("aio_pika", "aiormq"):  # a failed connect is reported as one `error:` line, not logged too
        logging.getLogger(library).addHandler(logging.NullHandler())
    try:
        asyncio.run(_main(loaded, as_json, watch))
    except BrokerError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        return


def register(app: typer.Typer) -> None:
    app.command()(status)
