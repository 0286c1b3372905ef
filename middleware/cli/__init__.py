"""The ``middleware`` command line: one module per command, registered on one typer app."""

from __future__ import annotations

import typer

from middleware import __version__
from middleware.cli import (
    demo,
    dlq,
    inspect,
    new,
    publish,
    routetest,
    run,
    schema_of,
    schemas,
    status,
    trace,
    transform,
    validate,
)

app = typer.Typer(
    name="middleware",
    help="Healthcare integration middleware: HL7 v2, FHIR, batch and REST in; versioned CloudEvents out.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
)
for module in (run, demo, publish, validate, transform, routetest, inspect, dlq, status, trace, schemas, schema_of,
               new):
    module.register(app)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"middleware {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Healthcare integration middleware: HL7 v2, FHIR, batch and REST in; versioned CloudEvents out."""


def main() -> None:
    """Console-script entry point."""
    app()
