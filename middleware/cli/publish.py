"""``middleware publish FILE... --queue Q``: how source systems (and operators) put messages on a queue."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import typer

from middleware.broker import OutgoingMessage, make_broker
from middleware.cli.common import JsonOption, ProjectOption, fail, open_project, print_json
from middleware.engine import declare_route_topology
from middleware.errors import BrokerError
from middleware.project import Project

CONTENT_TYPES = {"hl7v2": "x-application/hl7-v2+er7", "json": "application/json"}


async def publish_files(project: Project, files: list[Path], queue: str,
                        correlation_id: str | None = None) -> list[tuple[Path, str]]:
    """Publish each file as one message to the route queue ``queue``; returns (file, correlation id)."""
    route = next((r for r in project.routes.values() if r.source_queue == queue), None)
    if route is None:
        raise BrokerError(f"no route consumes queue {queue!r}",
                          hint=f"routes consume: {', '.join(sorted(r.source_queue for r in project.routes.values()))}")
    broker = make_broker(project.settings.broker_url)
    await broker.connect()
    try:
        await declare_route_topology(broker, route, project.settings)
        target = project.settings.queue_prefix + queue
        published = []
        for path in files:
            cid = correlation_id or str(uuid.uuid4())
            await broker.publish(OutgoingMessage(body=path.read_bytes(), correlation_id=cid,
                                                 message_id=str(uuid.uuid4()),
                                                 content_type=CONTENT_TYPES.get(route.format.name,
                                                                                "application/octet-stream")),
                                 queue=target)
            published.append((path, cid))
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
    """Publish files to a route's queue (broker-confirmed); prints one correlation id per message."""
    loaded = open_project(project)
    try:
        published = asyncio.run(publish_files(loaded, files, queue, correlation_id))
    except BrokerError as exc:
        fail(str(exc))
    for path, cid in published:
        if as_json:
            print_json({"file": str(path), "queue": queue, "correlation_id": cid})
        else:
            typer.echo(f"{cid}  {path}")


def register(app: typer.Typer) -> None:
    app.command()(publish)
