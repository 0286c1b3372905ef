"""Watched folder gateway (``ingest.folder[]``): files dropped into an inbox, published record by record.

Every ``poll_interval`` seconds the inbox is listed (``os.scandir``). A file whose name matches
``pattern`` is taken once it is complete: its size and modification time unchanged for ``min_age``
seconds (``complete: stable``), or a ``<name>.done`` marker beside it (``complete: marker``).

Claiming, so that several engines can watch one folder: the file is opened and locked
(``flock``, exclusive, non-blocking), then hard-linked into ``processing/`` (a link never replaces
an existing name) and unlinked from the inbox. An engine that loses the race fails the lock or the
link and leaves the file alone. The lock is held while the file is published, so a file in
``processing/`` whose lock can be taken belongs to an engine that is gone (killed, or stopped
mid-file): any engine watching the folder resumes it.

Publishing goes through :func:`middleware.ingest.publisher.publish_files` with the project's ingest
ledger: records split by the route's format, each confirmed by the broker, one that does not frame
dead-lettered alone with its position; the confirmed position is checkpointed, so a resumed file
starts after its last confirmed record (only the records in flight when the engine died are
published twice). A file already published to the end (same SHA-256, same route) is not published
again. The file then moves to ``done/`` (dead-lettered records included) or, when it cannot be read
at all, to ``failed/``, with ``<name>.report.json`` beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import fnmatch
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from middleware import project_schema
from middleware.broker.base import Broker
from middleware.errors import ParseError
from middleware.ingest import FolderListener, GatewayContext, register
from middleware.ingest.ledger import Ledger, fsync_dir
from middleware.ingest.publisher import FileResult, Published, Publisher, publish_files
from middleware.observe import Metrics
from middleware.project import Settings
from middleware.route import Route

log = logging.getLogger("middleware.ingest.folder")

PROCESSING = "processing"
MARKER_SUFFIX = ".done"
REPORT_SUFFIX = ".report.json"
MAX_DEAD_LETTER_POSITIONS = 1000  # positions listed in a report (the count is always exact)


@dataclass
class _Seen:
    """A file of the inbox as last listed: its size and mtime, and since when they are unchanged."""

    size: int
    mtime_ns: int
    since: float


@dataclass
class FileReport:
    """What happened to one file (written as ``<name>.report.json`` beside it in done/ or failed/)."""

    file: str
    folder: str
    route: str
    outcome: str = "done"  # done, failed, duplicate
    digest: str | None = None
    size: int = 0
    records: int = 0
    published: int = 0
    dead_lettered: int = 0
    dead_lettered_positions: list[int] = field(default_factory=list)
    declared_total: int | None = None
    control_total: str = "not declared"
    resumed_from: int | None = None
    error: str | None = None
    claimed_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__, option=orjson.OPT_INDENT_2)


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class FolderGateway:
    """Watches one inbox and publishes each complete file to one route (see the module docstring)."""

    port = 0  # no listening socket

    def __init__(self, listener: FolderListener, broker: Broker, settings: Settings, route: Route,
                 metrics: Metrics | None = None) -> None:
        self.listener = listener
        self.route = route
        self.metrics = metrics
        self.inbox = Path(listener.path)
        self.processing = self.inbox / PROCESSING
        self.done = Path(listener.done) if listener.done else self.inbox / "done"
        self.failed = Path(listener.failed) if listener.failed else self.inbox / "failed"
        self.publisher = Publisher(broker, route, settings)
        self.ledger = Ledger(Path(listener.ledger)) if listener.ledger else Ledger.of_project(Path.cwd())
        self.source = f"folder:{listener.name}"
        self.reports: list[FileReport] = []  # files finished by this gateway, oldest first
        self._seen: dict[str, _Seen] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()

    async def start(self, *, declare: bool = True) -> None:
        """Create the folders, declare the route's queues unless ``declare`` is False, start polling."""
        for folder in (self.inbox, self.processing, self.done, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        if declare:
            await self.publisher.declare()
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name=f"folder:{self.listener.name}")
        log.info("watching folder", extra={"folder": self.listener.name, "route": self.route.name,
                                           "pattern": self.listener.pattern})

    async def stop(self) -> None:
        """Stop taking files; a file being published stops after its confirms in flight (resumed later)."""
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task

    async def poll_once(self) -> int:
        """Resume orphaned files, then take every complete inbox file; returns how many files finished."""
        finished = 0
        for path in await asyncio.to_thread(self._orphans):
            if self._stop.is_set():
                return finished
            finished += await self._take(path, claimed=True)
        for path in await asyncio.to_thread(self._ready):
            if self._stop.is_set():
                return finished
            finished += await self._take(path, claimed=False)
        return finished

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.poll_once()
            except OSError as exc:  # the inbox vanished, a full disk...: say so and look again later
                log.error("watched folder cannot be read", extra={"folder": self.listener.name,
                                                                  "error": f"{type(exc).__name__}: {exc.strerror}"})
            except Exception as exc:  # never let one bad look stop the watch; the file is taken again later
                log.exception("watched folder poll failed", extra={"folder": self.listener.name,
                                                                   "error": type(exc).__name__})
            self._idle.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.listener.poll_interval)
            self._idle.clear()

    # -- finding files ------------------------------------------------------------------------

    def _ready(self) -> list[Path]:
        """Inbox files that are complete, oldest first; updates the ``waiting`` gauge."""
        now = time.monotonic()
        names: dict[str, os.stat_result] = {}
        markers: set[str] = set()
        with os.scandir(self.inbox) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name.endswith(MARKER_SUFFIX):
                    markers.add(entry.name.removesuffix(MARKER_SUFFIX))
                elif fnmatch.fnmatchcase(entry.name, self.listener.pattern):
                    names[entry.name] = entry.stat(follow_symlinks=False)
        ready: list[tuple[int, str]] = []
        for name, stat in names.items():
            seen = self._seen.get(name)
            if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                seen = self._seen[name] = _Seen(stat.st_size, stat.st_mtime_ns, now)
            if name in markers if self.listener.complete == "marker" else now - seen.since >= self.listener.min_age:
                ready.append((stat.st_mtime_ns, name))
        for gone in set(self._seen) - set(names):
            del self._seen[gone]
        if self.metrics is not None:
            self.metrics.folder_files.labels(self.listener.name, "waiting").set(len(names))
        return [self.inbox / name for _, name in sorted(ready)]

    def _orphans(self) -> list[Path]:
        """Files in ``processing/`` whose engine is gone (nobody holds their lock)."""
        with os.scandir(self.processing) as entries:
            return sorted(self.processing / e.name for e in entries
                          if e.is_file(follow_symlinks=False) and not e.name.startswith("."))

    # -- claiming -----------------------------------------------------------------------------

    def _claim(self, path: Path, *, claimed: bool) -> tuple[int, Path] | None:
        """Lock the file and (from the inbox) link it into ``processing/``: the locked descriptor and the
        claimed path, or None when another engine has it (or it is gone)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the name may have moved on (finished, or claimed and finished) while we opened it
            if os.fstat(fd).st_ino != os.stat(path, follow_symlinks=False).st_ino:
                raise FileNotFoundError(path)
            if claimed:
                return fd, path
            target = self.processing / path.name
            os.link(path, target)  # never replaces: a same-named file still in processing/ makes it wait
            os.unlink(path)
            marker = path.with_name(path.name + MARKER_SUFFIX)
            marker.unlink(missing_ok=True)
            return fd, target
        except OSError as exc:
            os.close(fd)
            if isinstance(exc, FileNotFoundError) or exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EEXIST):
                return None
            raise

    # -- publishing ---------------------------------------------------------------------------

    async def _take(self, path: Path, *, claimed: bool) -> int:
        try:
            taken = await asyncio.to_thread(self._claim, path, claimed=claimed)
        except OSError as exc:  # cannot even be opened (its mode, ...): it would block the inbox at every poll
            return await self._unreadable(path, exc)
        if taken is None:
            return 0
        fd, target = taken
        self._seen.pop(path.name, None)
        try:
            return await self._publish(target, resumed=claimed)
        finally:
            os.close(fd)  # releases the lock

    async def _publish(self, path: Path, *, resumed: bool) -> int:
        name = self.listener.name
        started, wall = time.monotonic(), time.time()
        report = FileReport(file=path.name, folder=name, route=self.route.name, claimed_at=_utc(wall))
        log.info("folder file taken", extra={"folder": name, "file": path.name, "route": self.route.name,
                                             "resumed": resumed})
        if self.metrics is not None:
            self.metrics.folder_files.labels(name, "in_progress").inc()

        def count(item: Published) -> None:
            if item.dead_lettered:
                report.dead_lettered += 1
                if item.position is not None and len(report.dead_lettered_positions) < MAX_DEAD_LETTER_POSITIONS:
                    report.dead_lettered_positions.append(item.position)
            if self.metrics is not None:
                self.metrics.folder_records.labels(name, "dead_lettered" if item.dead_lettered else "published").inc()

        result: FileResult | None = None
        try:
            files = await publish_files(self.publisher, [path], stop=self._stop, ledger=self.ledger,
                                        source=self.source, on_published=lambda _, item: count(item))
            result = files[0] if files else None
        except (OSError, ValueError, ParseError) as exc:  # the file cannot be read at all
            report.outcome, report.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("folder file cannot be read", extra={"folder": name, "file": path.name,
                                                           "error": type(exc).__name__})
        finally:
            if self.metrics is not None:
                self.metrics.folder_files.labels(name, "in_progress").dec()
        if report.error is None and (result is None or not result.result.complete):
            # stopped (the engine stops) or the broker failed: left in processing/, resumed from its checkpoint
            log.warning("folder file interrupted; it resumes from its checkpoint", extra={
                "folder": name, "file": path.name,
                "resume_from": result.result.resume_from if result is not None else None,
                "error": type(result.result.error).__name__ if result is not None and result.result.error else None})
            return 0
        if result is not None:
            report.digest, report.size, report.resumed_from = result.digest, result.size, result.resumed_from
            report.declared_total, report.control_total = result.total, result.control_total
            if result.duplicate is not None:
                report.outcome = "duplicate"
                report.records, report.published = result.duplicate.records, 0
            else:
                report.records = result.result.info.records or (result.result.published + result.result.dead_lettered)
                report.published = result.result.published
                report.dead_lettered = result.result.dead_lettered
        report.finished_at, report.seconds = _utc(time.time()), round(time.monotonic() - started, 3)
        await asyncio.to_thread(self._finish, path, report)
        self.reports.append(report)
        if self.metrics is not None:
            self.metrics.folder_finished.labels(name, report.outcome).inc()
        log.info("folder file finished", extra={
            "folder": name, "file": path.name, "outcome": report.outcome, "records": report.records,
            "published": report.published, "dead_lettered": report.dead_lettered, "seconds": report.seconds})
        return 1

    async def _unreadable(self, path: Path, exc: OSError) -> int:
        """Move a file this engine cannot open to failed/ with its report (another engine that took it
        first wins: the file is then gone and nothing happens)."""
        name, wall = self.listener.name, time.time()
        report = FileReport(file=path.name, folder=name, route=self.route.name, outcome="failed",
                            error=f"{type(exc).__name__}: {exc.strerror or exc}", claimed_at=_utc(wall),
                            finished_at=_utc(wall))
        log.error("folder file cannot be read", extra={"folder": name, "file": path.name,
                                                       "error": type(exc).__name__})
        self._seen.pop(path.name, None)
        try:
            await asyncio.to_thread(self._finish, path, report)
        except FileNotFoundError:
            return 0
        path.with_name(path.name + MARKER_SUFFIX).unlink(missing_ok=True)
        self.reports.append(report)
        if self.metrics is not None:
            self.metrics.folder_finished.labels(name, report.outcome).inc()
        return 1

    def _finish(self, path: Path, report: FileReport) -> None:
        """Move the file to done/ or failed/ (a free name) and write its report beside it."""
        folder = self.failed if report.outcome == "failed" else self.done
        target = _free_name(folder / path.name)
        report.file = target.name
        os.replace(path, target)
        report_path = target.with_name(target.name + REPORT_SUFFIX)
        tmp = report_path.with_name("." + report_path.name + ".tmp")
        with tmp.open("wb") as out:
            out.write(report.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, report_path)
        fsync_dir(folder)  # the file and its report are there after a power loss, and gone from where they were
        fsync_dir(path.parent)


def folder_status(listener: FolderListener) -> dict[str, Any]:
    """Files of a watched folder by state, read from its folders (``middleware status``): ``waiting``
    (matching files in the inbox), ``in_progress`` (in ``processing/``), ``done`` (of which
    ``with_dead_letters``) and ``failed`` (reports in ``done/`` and ``failed/``)."""
    inbox = Path(listener.path)

    def names(folder: Path) -> list[str]:
        try:
            with os.scandir(folder) as entries:
                return [e.name for e in entries if e.is_file(follow_symlinks=False) and not e.name.startswith(".")]
        except FileNotFoundError:
            return []

    done_reports = [n for n in names(Path(listener.done or inbox / "done")) if n.endswith(REPORT_SUFFIX)]
    with_dead_letters = 0
    for name in done_reports:
        try:
            with_dead_letters += bool(orjson.loads((Path(listener.done or inbox / "done") / name).read_bytes())
                                      .get("dead_lettered"))
        except (OSError, orjson.JSONDecodeError, AttributeError):
            continue
    return {"folder": listener.name, "path": str(inbox),
            "waiting": sum(fnmatch.fnmatchcase(n, listener.pattern) and not n.endswith(MARKER_SUFFIX)
                           for n in names(inbox)),
            "in_progress": len(names(inbox / PROCESSING)), "done": len(done_reports),
            "with_dead_letters": with_dead_letters,
            "failed": sum(n.endswith(REPORT_SUFFIX) for n in names(Path(listener.failed or inbox / "failed")))}


def _free_name(path: Path) -> Path:
    """``path``, or ``<stem>.<n><suffix>`` when a file of that name is already there."""
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    return candidate


def folder_route(listener: FolderListener, routes: dict[str, Route] | Any) -> Route:
    """The route an ``ingest.folder[]`` entry publishes to (by ``route:`` or by its source ``queue:``)."""
    if listener.route:
        route: Route = routes[listener.route]
        return route
    return next(r for r in routes.values() if r.source_queue == listener.queue)  # checked by the loader


SPEC: dict[str, Any] = {  # the keys of one ingest.folder[] entry (docs/ingest.md, "Watched folder")
    "type": "object",
    "additionalProperties": False,
    "required": ["path"],
    "oneOf": [{"required": ["queue"]}, {"required": ["route"]}],
    "properties": {
        "name": {**project_schema.NAME,
                 "description": "in logs, metrics and the `x-mw-ingest` header (`folder:<name>`); "
                                "default `folder-<n>`"},
        "path": {"type": "string", "minLength": 1,
                 "description": "the inbox (relative: to the project folder); `processing/` is made inside it"},
        "queue": {"type": "string", "minLength": 1, "description": "a route's `source.queue` (or `route`)"},
        "route": {**project_schema.NAME, "description": "the route its files are published to (or `queue`)"},
        "pattern": {"type": "string", "minLength": 1, "default": "*", "description": "glob a file name must match"},
        "complete": {"enum": ["stable", "marker"], "default": "stable",
                     "description": "`stable`: size and mtime unchanged for `min_age`; `marker`: a `<name>.done` "
                                    "file beside it"},
        "min_age": {"type": "number", "minimum": 0, "default": 2,
                    "description": "seconds a file must stay unchanged (`complete: stable`)"},
        "poll_interval": {"type": "number", "exclusiveMinimum": 0, "default": 1,
                          "description": "seconds between looks at the inbox"},
        "done": {"type": "string", "minLength": 1, "default": "<path>/done",
                 "description": "where files read to the end go, with their report"},
        "failed": {"type": "string", "minLength": 1, "default": "<path>/failed",
                   "description": "where files that cannot be read go, with their report"},
    },
}


@register("folder", SPEC)
def _folder_gateway(listener: FolderListener, context: GatewayContext) -> FolderGateway:
    """The gateway of one ``ingest.folder[]`` entry."""
    return FolderGateway(listener, context.broker, context.settings, folder_route(listener, context.routes),
                         context.metrics)
