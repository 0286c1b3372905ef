"""``middleware publish FILE... --queue Q``: how source systems (and operators) put messages on a queue.

A thin skin over :mod:`middleware.ingest.publisher`: this module draws the progress bar, prints the
correlation ids, the summary and, when stopped early, where to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from middleware.broker import make_broker
from middleware.cli.common import JsonOption, ProjectOption, fail, open_project, print_json
from middleware.errors import BrokerError
from middleware.ingest.ledger import Ledger
from middleware.ingest.publisher import FileResult, FilesProgress, Publisher
from middleware.ingest.publisher import Published as Record
from middleware.ingest.publisher import publish_files as publish_paths
from middleware.project import Project

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


@dataclass(frozen=True)
class Published:
    """One message put on a queue: where it came from and its correlation id."""

    file: Path
    correlation_id: str
    position: int | None = None  # 1-based message number inside a batch file
    dead_lettered: bool = False  # could not be framed: put on the route's dead-letter queue instead

    @property
    def source(self) -> str:
        return f"{self.file}#{self.position}" if self.position is not None else str(self.file)


@dataclass
class PublishRun:
    """What one ``publish`` did, file by file."""

    queue: str
    files: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def published(self) -> int:
        return sum(f.result.published for f in self.files)

    @property
    def dead_lettered(self) -> int:
        return sum(f.result.dead_lettered for f in self.files)

    @property
    def stopped(self) -> FileResult | None:
        """The file that stopped early, if one did."""
        return next((f for f in self.files if not f.result.complete), None)


def _publisher(project: Project, queue: str) -> Publisher:
    route = next((r for r in project.routes.values() if r.source_queue == queue), None)
    if route is None:
        raise BrokerError(f"no route consumes queue {queue!r}",
                          hint=f"routes consume: {', '.join(sorted(r.source_queue for r in project.routes.values()))}")
    return Publisher(make_broker(project.settings.broker_url, project.settings.broker_tls), route, project.settings)


async def run_publish(project: Project, files: list[Path], queue: str, *, correlation_id: str | None = None,
                      start: int = 1, stop: asyncio.Event | None = None,
                      on_published: Callable[[Path, Record], None] | None = None,
                      progress: FilesProgress | None = None, ledger: Ledger | None = None,
                      force: bool = False) -> PublishRun:
    """Publish ``files`` to the route queue ``queue``: one message per file, or per record of a
    batch file (HL7 FHS/BHS...BTS/FTS, CSV rows...), read as a stream. With a ``ledger``, files
    already published are skipped (unless ``force``) and interrupted ones resume at their checkpoint."""
    publisher = _publisher(project, queue)
    run = PublishRun(queue)
    started = time.perf_counter()
    await publisher.broker.connect()
    try:
        await publisher.declare()
        run.files = await publish_paths(publisher, files, start=start, correlation_id=correlation_id, stop=stop,
                                        on_published=on_published, progress=progress, ledger=ledger, force=force)
    finally:
        await publisher.broker.close()
        run.seconds = time.perf_counter() - started
    return run


async def publish_files(project: Project, files: list[Path], queue: str,
                        correlation_id: str | None = None) -> list[Published]:
    """Publish every file (see :func:`run_publish`); each message published, in order.

    Raises :class:`BrokerError` when the broker fails part way.
    """
    published: list[Published] = []

    def keep(path: Path, item: Record) -> None:
        published.append(Published(path, item.correlation_id, item.position, item.dead_lettered))

    run = await run_publish(project, files, queue, correlation_id=correlation_id, on_published=keep)
    stopped = run.stopped
    if stopped is not None and stopped.result.error is not None:
        raise stopped.result.error
    return published


def _resume_hint(run: PublishRun, files: list[Path], queue: str, project: Path) -> str | None:
    """Where a stopped publish starts again, as a command line (None: nothing is left to publish)."""
    stopped = run.stopped
    if stopped is not None:
        assert stopped.result.resume_from is not None
        index, position = files.index(stopped.path), stopped.result.resume_from
        done = f"{position - 1:,} record(s) of {stopped.path} confirmed"
    elif len(run.files) < len(files):  # stopped between files
        index, position = len(run.files), 1
        done = f"{len(run.files)} of {len(files)} file(s) published"
    else:
        return None
    args = ["middleware", "publish", *map(str, files[index:]), "--queue", queue]
    if project != Path("."):
        args += ["--project", str(project)]
    if position > 1:
        args += ["--from", str(position)]
    return f"{done}; resume with: {shlex.join(args)}"


def _summary(run: PublishRun) -> str:
    files = len(run.files)
    rate = run.published / run.seconds if run.seconds > 0 else 0.0
    return (f"published {run.published:,} message(s) from {files} file(s) to {run.queue}, "
            f"{run.dead_lettered:,} dead-lettered at framing, in {run.seconds:.1f} s ({rate:,.0f}/s)")


def _file_summary(file: FileResult) -> str:
    """One line per file: its id, what happened to its records, and the control-total check."""
    if file.duplicate is not None:
        return (f"{file.path}: already published to this route at {file.duplicate.at} ({file.digest}, "
                f"{file.duplicate.records:,} records): nothing published (--force publishes it again)")
    result = file.result
    resumed = f", resumed after record {file.resumed_from - 1:,} (checkpoint)" if file.resumed_from else ""
    return (f"{file.path}: {result.info.records:,} records, {result.published:,} published, "
            f"{result.dead_lettered:,} dead-lettered{resumed}; control total: {file.control_total}")


def publish(
    files: list[Path] = typer.Argument(..., help="Message files to publish, one message each.", exists=True,
                                       dir_okay=False),
    queue: str = typer.Option(..., "--queue", "-q", help="The route source queue to publish to."),
    correlation_id: str | None = typer.Option(None, "--correlation-id",
                                              help="Use this correlation id instead of a new UUID per message."),
    start: int = typer.Option(1, "--from", min=1, metavar="N",
                              help="Start the first file at record N (resume a stopped batch where it said)."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Print a line per message of a batch on a terminal too."),
    force: bool = typer.Option(False, "--force",
                               help="Publish a file again although the ledger says it was published (same SHA-256)."),
    project: Path = ProjectOption,
    as_json: bool = JsonOption,
) -> None:
    """Publish files to a route's queue (broker-confirmed), split by the route's format (an HL7 batch
    per message, a FHIR Bundle per entry, NDJSON per line). Prints one correlation id per message on
    stdout (for a batch on a terminal only with --verbose: a progress bar instead), a summary on stderr,
    and on Ctrl-C where to resume.
    A file already published to the route (same SHA-256, var/ingest-ledger.jsonl) is reported and
    skipped unless --force; a file cut short (crash, Ctrl-C) resumes after its last confirmed record."""
    loaded = open_project(project)
    ledger = Ledger.of_project(loaded.root)
    err = Console(stderr=True, highlight=False)
    interactive = err.is_terminal and sys.stdout.isatty() and not as_json
    batch_lines = verbose or as_json or not sys.stdout.isatty()

    def show(path: Path, item: Record) -> None:
        if item.position is not None and not batch_lines:
            return
        if as_json:
            print_json({"file": str(path), "position": item.position, "queue": queue,
                        "correlation_id": item.correlation_id, "dead_lettered": item.dead_lettered})
        else:
            typer.echo(f"{item.correlation_id}  {Published(path, item.correlation_id, item.position).source}"
                       + ("  dead-lettered: " + (item.error or "") if item.dead_lettered else ""))

    stop = asyncio.Event()
    progress = FilesProgress()
    run: PublishRun | None = None

    async def main() -> PublishRun:
        loop = asyncio.get_running_loop()

        def interrupt() -> None:  # the first Ctrl-C: finish the confirms in flight; a second one: at once
            stop.set()
            loop.remove_signal_handler(signal.SIGINT)

        loop.add_signal_handler(signal.SIGINT, interrupt)
        with _progress_bar(err, progress, enabled=interactive) as tick:
            def published(path: Path, item: Record) -> None:
                show(path, item)
                tick()

            return await run_publish(loaded, files, queue, correlation_id=correlation_id, start=start,
                                     stop=stop, on_published=published, progress=progress, ledger=ledger,
                                     force=force)

    try:
        run = asyncio.run(main())
    except KeyboardInterrupt:
        current = progress.current
        where = f" (in {current.path})" if current is not None else ""
        typer.echo(f"interrupted twice: stopped without waiting for confirms{where}; resume after the "
                   "last message printed", err=True)
        raise typer.Exit(INTERRUPTED) from None
    except BrokerError as exc:
        fail(str(exc))
    sys.stdout.flush()
    typer.echo(_summary(run), err=True)
    for file in run.files:
        if file.result.batch or file.duplicate is not None or file.resumed_from:
            typer.echo(_file_summary(file), err=True)
        for problem in file.result.info.problems:
            typer.echo(f"warning: {file.path}: {problem}", err=True)
    hint = _resume_hint(run, files, queue, project)
    stopped = run.stopped
    if stopped is not None and stopped.result.error is not None:
        fail(f"{stopped.result.error}; {hint}")
    if stop.is_set():  # Ctrl-C: what is printed is confirmed
        typer.echo(f"interrupted: {hint or 'every message was published'}", err=True)
        raise typer.Exit(INTERRUPTED)


@contextlib.contextmanager
def _progress_bar(console: Console, progress: FilesProgress, *, enabled: bool) -> Iterator[Callable[[], None]]:
    """A rich progress bar (bytes read, messages, rate) on a terminal; a no-op tick elsewhere."""
    if not enabled:
        yield lambda: None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[messages]:>10,} messages  {task.fields[rate]:>8,.0f} msg/s"),
                   TimeElapsedColumn(), console=console, transient=True)
    task = bar.add_task("publishing", total=None, messages=0, rate=0.0)
    count, started, last = 0, time.perf_counter(), 0.0

    def tick() -> None:
        nonlocal count, last
        count += 1
        now = time.perf_counter()
        if now - last >= 0.1:
            last = now
            current = progress.current
            bar.update(task, description=current.path.name if current else "publishing",
                       total=current.size if current else None, completed=progress.bytes_read,
                       messages=count, rate=count / max(now - started, 1e-9))

    with bar:
        yield tick


def register(app: typer.Typer) -> None:
    app.command()(publish)
