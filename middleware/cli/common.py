"""Options and helpers shared by every command."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from middleware.errors import ConfigError, MiddlewareError
from middleware.observe import mask_secrets
from middleware.project import Project, load_project

ProjectOption = typer.Option(
    Path("."), "--project", "-p", help="Folder holding config/, routes/, connectors/, schemas/.",
    file_okay=False,
)
JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table.")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr (URLs in it masked) and exit."""
    typer.echo(f"error: {' '.join(mask_secrets(message).split())}", err=True)
    raise typer.Exit(code)


def open_project(folder: Path, *, offline: bool = False) -> Project:
    """Load the project or exit with its first problem (``offline``: see :func:`load_project`)."""
    try:
        return load_project(folder, offline=offline)
    except ConfigError as exc:
        fail(f"invalid project: {exc}")
    except MiddlewareError as exc:
        fail(str(exc))


def print_json(value: Any) -> None:
    """One JSON document (or line) on stdout."""
    sys.stdout.write(json.dumps(value, default=str) + "\n")
