"""``middleware inspect FILE``: a message field by field with the paths a route's map uses."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from middleware.cli.common import JsonOption, ProjectOption, fail, open_project, print_json
from middleware.errors import ParseError
from middleware.inspect import FORMATS, as_json, inspect_input, render_text


def inspect(
    input_file: Path = typer.Argument(..., metavar="FILE", help="A message or batch file ('-' for stdin).",
                                      allow_dash=True),
    fmt: str | None = typer.Option(None, "--format", help=f"{' or '.join(FORMATS)} (default: from the content)."),
    route: str | None = typer.Option(None, "--route", help="Read FILE with this route's source format."),
    project: Path = ProjectOption,
    as_json_output: bool = JsonOption,
) -> None:
    """Print every value of FILE beside its path (`PID-3[2].1 = ...`, `Patient.name[0].family = ...`):
    paste the path into a route's map. One block per message of a batch; values decoded. Exit 1 if a
    message does not parse. Values go to this terminal only: nothing is logged."""
    if fmt is not None and fmt not in FORMATS:
        fail(f"--format {fmt}: inspect reads {', '.join(FORMATS)}")
    if route is not None:
        loaded = open_project(project)
        try:
            fmt = fmt or loaded.route(route).format.name
        except KeyError:
            fail(f"no route {route!r} (routes: {', '.join(sorted(loaded.routes))})")
        if fmt not in FORMATS:
            fail(f"route {route} reads {fmt}: inspect reads {', '.join(FORMATS)}")
    source = "stdin" if str(input_file) == "-" else str(input_file)
    try:
        raw = sys.stdin.buffer.read() if source == "stdin" else input_file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {input_file}: {exc.strerror}")
    try:
        name, messages = inspect_input(raw, fmt)
    except ParseError as exc:
        fail(f"{source}: {exc}")
    if as_json_output:
        print_json(as_json(source, name, messages))
    else:
        for line in render_text(source, name, messages):
            typer.echo(line)
    if any(m.error is not None for m in messages):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(inspect)
