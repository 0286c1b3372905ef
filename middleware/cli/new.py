"""``middleware new route NAME --from SAMPLE``: scaffold a route from one real message (:mod:`middleware.scaffold`)."""

from __future__ import annotations

from pathlib import Path

import typer

from middleware.cli.common import ProjectOption, fail
from middleware.errors import MiddlewareError
from middleware.scaffold import plan, write

app = typer.Typer(help="Scaffold project files.", no_args_is_help=True)


@app.command("route")
def new_route(
    name: str = typer.Argument(..., help="The route name (file routes/NAME.yaml)."),
    sample: Path = typer.Option(..., "--from", help="One real message (HL7 v2, FHIR JSON, JSON, CSV or X12).",
                                exists=True, dir_okay=False),
    event_type: str | None = typer.Option(None, "--event-type", help="The event type (default: NAME.received); "
                                                                     "its schema must not exist yet."),
    queue: str | None = typer.Option(None, "--queue", help="The route's source queue (default: NAME)."),
    project: Path = ProjectOption,
) -> None:
    """Write routes/NAME.yaml (a map from the sample's real paths), schemas/<type>/1.json, a test case in
    routes/tests/NAME/ and the sample in samples/NAME/. Never overwrites: exit 1 if any of them exists."""
    root = project.resolve()
    try:
        made = plan(root, name, sample, event_type=event_type, queue=queue)
        written = write(root, made)
    except MiddlewareError as exc:
        fail(str(exc))
    typer.echo(f"{made.fmt} {made.message_type or ''}".rstrip() + f" sample: {len(made.entries)} field(s) mapped")
    for path in written:
        typer.echo(f"  wrote {path}")
    typer.echo(f"next: middleware inspect {made.sample_file}  (more paths), then middleware test {name}")


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="new")
