"""``middleware publish FILE... --queue Q``: how source systems (and operators) put messages on a queue."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import typer

from middleware.broker import OutgoingMessage, make_broker
from middleware.cli.common import JsonOption, ProjectOption, fail, open_project, print_json
from middleware.engine import declare_route_topology
from middleware.errors import BrokerError
from middleware.formats.hl7batch import BatchSummary, iter_batch
from middleware.project import Project

log = logging.getLogger("middleware.publish")
CONTENT_TYPES = {"hl7v2": "x-application/hl7-v2+er7", "json": "application/json", "fhir": "application/fhir+json"}


@dataclass(frozen=True)
class Published:
    """One message put on a queue: where it came from and its correlation id."""

    file: Path
    correlation_id: str
    position: int | None = None  # 1-based message number inside a batch file

    @property
    def source(self) -> str:
        return f"{self.file}#{self.position}" if self.position is not None else str(self.file)


def _messages(path: Path, split: bool) -> Iterator[tuple[int | None, bytes, dict[str, object]]]:
    """(position, bytes, headers) of each message in ``path``: HL7 batches are split, streaming."""
    if not split:
        yield None, path.read_bytes(), {}
        return
    summary = BatchSummary()
    with path.open("rb") as stream:
        items = iter_batch(stream, summary)
        first = next(items, None)
        second = next(items, None)
        if second is None and not summary.enveloped:
            yield None, path.read_bytes(), {}  # one plain message (or one malformed): byte for byte
            return
        for item in (first, second, *items):
            if item is None:
                continue
            headers: dict[str, object] = {"x-mw-source-file": path.name, "x-mw-batch-position": item.position}
            if summary.batch_id:
                headers["x-mw-batch-id"] = summary.batch_id
            yield item.position, item.raw, headers
    for problem in summary.problems:
        log.warning("batch envelope mismatch", extra={"file": path.name, "problem": problem})


async def publish_files(project: Project, files: list[Path], queue: str,
                        correlation_id: str | None = None) -> list[Published]:
    """Publish each file to the route queue ``queue``: one message per file, or per message of an
    HL7 batch file (FHS/BHS...BTS/FTS or messages one after another), read as a stream."""
    route = next((r for r in project.routes.values() if r.source_queue == queue), None)
    if route is None:
        raise BrokerError(f"no route consumes queue {queue!r}",
                          hint=f"routes consume: {', '.join(sorted(r.source_queue for r in project.routes.values()))}")
    broker = make_broker(project.settings.broker_url, project.settings.broker_tls)
    await broker.connect()
    content_type = CONTENT_TYPES.get(route.format.name, "application/octet-stream")
    try:
        await declare_route_topology(broker, route, project.settings)
        target = project.settings.queue_prefix + queue
        published = []
        for path in files:
            for position, body, headers in _messages(path, split=route.format.name == "hl7v2"):
                cid = correlation_id or str(uuid.uuid4())
                await broker.publish(OutgoingMessage(body=body, headers=headers, correlation_id=cid,
                                                     message_id=str(uuid.uuid4()), content_type=content_type),
                                     queue=target)
                published.append(Published(path, cid, position))
        return published
    finally:
        await broker.close()


def publish(
    files: list[Path] = typer.Argument(..., help="Message files to publish, one message each.", exists=True,
                                       dir_okay=False),
    queue: str = typer.Option(..., "--queue", "-q", help="The route source queue to publish to."),
    correlation_id: str | None = typer.Option(None, "--correlation-id",
                                              help="Use this correlation id instead of a new UUID per message."),
    project: Path = ProjectOption,
    as_json: bool = JsonOption,
) -> None:
    """Publish files to a route's queue (broker-confirmed); HL7 batch files are split into their
    messages. Prints one correlation id per message."""
    loaded = open_project(project)
    try:
        published = asyncio.run(publish_files(loaded, files, queue, correlation_id))
    except BrokerError as exc:
        fail(str(exc))
    for item in published:
        if as_json:
            print_json({"file": str(item.file), "position": item.position, "queue": queue,
                        "correlation_id": item.correlation_id})
        else:
            typer.echo(f"{item.correlation_id}  {item.source}")


def register(app: typer.Typer) -> None:
    app.command()(publish)
