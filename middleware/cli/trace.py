"""``middleware trace ID``: where one message went, read from the journal (middleware/journal/)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from middleware.cli.common import JsonOption, ProjectOption, fail, print_json
from middleware.errors import ConfigError
from middleware.journal import JournalError, MessagePath, format_age, open_store
from middleware.journal import trace as find_paths
from middleware.observe import safe_url
from middleware.project import load_settings


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _since(seconds: float, start: float | None) -> str:
    return "" if start is None else "+" + format_age(max(0.0, seconds - start))


def render(path: MessagePath, console: Console) -> None:
    """One message: a summary line, then its hops in order with the time since it came in."""
    start = path.received_at or (path.hops[0].at if path.hops else None)
    console.print(f"[bold]{escape(path.route)}[/] correlation id {escape(path.correlation_id)}"
                  + (f", MSH-10 / id {escape(path.source_id)}" if path.source_id else "")
                  + (f", from {escape(path.source)}" if path.source else "")
                  + f": [bold]{path.outcome}[/], received {_when(start)}")
    table = Table(show_edge=False, pad_edge=False)
    for column in ("time (UTC)", "since received", "stage", "outcome", "event / connector", "attempt", "detail"):
        table.add_column(column, no_wrap=True)
    for hop in path.hops:
        what = hop.connector or hop.event_type or hop.source or ""
        if hop.event_id and hop.stage != "ingest":
            what = f"{hop.event_id[:8]} {what}".strip()
        detail = " ".join(x for x in (hop.error_class, hop.detail) if x)
        table.add_row(_when(hop.at)[11:-1], _since(hop.at, start), hop.stage, hop.outcome, escape(what),
                      str(hop.attempt or ""), escape(detail))
    console.print(table)
    for event in path.events:
        for delivery in event.deliveries:
            notes = [f"{delivery.attempts} attempt(s)"]
            notes += [f"{delivery.retries} retried"] if delivery.retries else []
            notes += [f"parked {delivery.parked}x"] if delivery.parked else []
            notes += [f"{delivery.error_class}"] if delivery.error_class else []
            took = f" in {format_age(delivery.seconds)}" if delivery.seconds is not None else ""
            console.print(f"  event {escape(event.event_id)} ({escape(event.event_type or '?')}) -> "
                          f"{escape(delivery.connector)}: [bold]{delivery.outcome}[/]{took}, {', '.join(notes)}")
    for letter in path.dead_letters:
        console.print(f"  dead letter: stage {letter.detail if letter.stage != 'deliver' else 'deliver'}"
                      + (f", connector {escape(letter.connector)}" if letter.connector else "")
                      + f", {escape(letter.error_class or '?')} at {_when(letter.at)} "
                      f"(middleware dlq list --route {escape(path.route)})")
    console.print()


def trace(
    message: str = typer.Argument(..., metavar="ID", help="A correlation id, message id, MSH-10 / resource id "
                                                          "or event id."),
    project: Path = ProjectOption,
    as_json: bool = JsonOption,
    limit: int = typer.Option(20, "--limit", min=1, help="At most this many messages (MSH-10s get reused)."),
) -> None:
    """Where one message went: received -> routed (events) -> each delivery (attempts, retries, parking)
    -> dead letters, with times; from the journal (journal: in config/middleware.yaml)."""
    try:
        settings = load_settings(project)  # config/middleware.yaml only: routes are not needed here
    except ConfigError as exc:
        fail(f"invalid project: {exc}")
    if not settings.journal.enabled:
        fail("the journal is off (journal.enabled: false in config/middleware.yaml): nothing to trace")
    try:
        store = open_store(settings.journal.url, create=False)
        try:
            paths = find_paths(store, message, limit)
        finally:
            store.close()
    except JournalError as exc:
        fail(str(exc))
    except Exception as exc:  # a database that is down or not ours: one line, never a traceback
        fail(f"cannot read the journal at {safe_url(settings.journal.url)}: {type(exc).__name__}: {exc}")
    if not paths:
        fail(f"nothing in the journal for {message!r} (a correlation id, message id, MSH-10 or event id; records "
             f"are kept {format_age(settings.journal.retention)})")
    if as_json:
        print_json({"id": message, "messages": [p.to_dict() for p in paths]})
        return
    console = Console(highlight=False, soft_wrap=True, width=None if Console().is_terminal else 160)
    for path in paths:
        render(path, console)


def register(app: typer.Typer) -> None:
    app.command()(trace)
