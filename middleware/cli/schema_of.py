"""``middleware schema-of route|connector|config|fragment|lookup``: the JSON Schema editors check our YAML with."""

from __future__ import annotations

import sys

import typer

from middleware.cli.common import fail
from middleware.editor_schema import KINDS, render


def schema_of(
    kind: str = typer.Argument(..., metavar="KIND", help=f"{' | '.join(KINDS)}"),
) -> None:
    """Print the JSON Schema (draft-07) of a route, connector, config/middleware.yaml, fragment or lookup file,
    generated from the component specs: point your editor at it, e.g. with the line
    `# yaml-language-server: $schema=<file>` in the YAML file (the shipped files carry one)."""
    if kind not in KINDS:
        fail(f"unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
    sys.stdout.write(render(kind))


def register(app: typer.Typer) -> None:
    app.command("schema-of")(schema_of)
