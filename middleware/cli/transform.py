"""``middleware transform ROUTE INPUT``: the pure pipeline, no broker."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import typer

from middleware.cli.common import ProjectOption, fail, open_project
from middleware.errors import PipelineError


def transform(
    route: str = typer.Argument(..., help="Route name, or the path of its YAML file."),
    input_file: Path = typer.Argument(..., metavar="INPUT", help="Input message file ('-' for stdin).",
                                      allow_dash=True),
    project: Path = ProjectOption,
) -> None:
    """Print the canonical events for INPUT as JSON lines; on bad input exit 1 with `error: <stage>: <what>`.

    INPUT is split as `publish` splits it (a FHIR Bundle: the events of every entry, in order).
    """
    from middleware.route import transform_split as run_route

    loaded = open_project(project, offline=True)  # delivers nothing: connector secrets not needed
    try:
        selected = loaded.route(route)
    except KeyError:
        fail(f"no route {route!r} (routes: {', '.join(sorted(loaded.routes))})")
    try:
        raw = sys.stdin.buffer.read() if str(input_file) == "-" else input_file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {input_file}: {exc.strerror}")
    try:
        outcome = run_route(selected, raw, tz=loaded.settings.tz)
    except PipelineError as exc:
        fail(f"{exc.stage}: {exc}")
    if outcome.filtered:
        typer.echo(f"filtered: message type {outcome.message_type} does not pass route {selected.name}'s filter",
                   err=True)
        return
    out = sys.stdout.buffer
    for event in outcome.events:
        out.write(orjson.dumps(event) + b"\n")
    out.flush()


def register(app: typer.Typer) -> None:
    app.command()(transform)
