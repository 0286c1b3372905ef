"""The ``middleware`` command line: one module per command, registered on one typer app."""

from __future__ import annotations

import typer

from middleware.cli import demo, dlq, publish, routetest, run, schemas, status, transform, validate

app = typer.Typer(
    name="middleware",
    help="Healthcare integration middleware: HL7 v2, FHIR, batch and REST in; versioned CloudEvents out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for module in (run, demo, publish, validate, transform, routetest, dlq, status, schemas):
    module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
