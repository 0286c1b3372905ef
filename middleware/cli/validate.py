"""``middleware validate``: lint config, routes, connectors and schemas."""

from __future__ import annotations

from pathlib import Path

import typer

from middleware.cli.common import JsonOption, ProjectOption, print_json
from middleware.project import check_project


def validate(project: Path = ProjectOption, as_json: bool = JsonOption) -> None:
    """Report every problem as `file:line: message` and exit 1, or print a summary and exit 0."""
    loaded, problems = check_project(project)
    if as_json:
        print_json({"ok": not problems, "problems": [{"file": p.file, "line": p.line, "message": p.message}
                                                     for p in problems]})
    else:
        for problem in problems:
            typer.echo(str(problem))
    if problems or loaded is None:
        if not as_json:
            typer.echo(f"{len(problems)} problem(s) found", err=True)
        raise typer.Exit(1)
    if not as_json:
        typer.echo(f"ok: {len(loaded.routes)} route(s), {len(loaded.connectors)} connector(s), "
                   f"{len(loaded.schemas)} schema(s), {len(loaded.lookups)} lookup table(s)")


def register(app: typer.Typer) -> None:
    app.command()(validate)
