"""``middleware dlq list/show/replay/purge/export``: inspect and act on dead letters.

Dead letters live in one queue per route (``<prefix><route>.dlq``). Every command reads them
without losing any: it fetches them unacked, works, then gives back those it did not consume, in
place and unchanged. Bodies are never logged and are masked unless ``--reveal``; ``export`` always
writes them (the operator's explicit ask), to a new 0600 file. ``show --reveal``, ``export``,
``replay`` and ``purge`` append a record to the audit log (:mod:`middleware.audit`); if it cannot
be written, nothing is revealed or changed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from middleware.audit import AuditLog
from middleware.broker import make_broker
from middleware.broker.base import Broker
from middleware.cli.common import JsonOption, ProjectOption, fail, open_project, print_json
from middleware.deadletter import (
    DEFAULT_SCAN,
    REPLAY_COUNT,
    Browse,
    Held,
    browse,
    export_record,
    masked_headers,
    replay,
    replay_message,
    replay_target,
    write_private_file,
)
from middleware.errors import BrokerError, MiddlewareError
from middleware.observe import mask_secrets
from middleware.project import Project
from middleware.topology import Topology

T = TypeVar("T")

dlq_app = typer.Typer(
    name="dlq", help="Dead letters: list, show, replay, purge and export (per route, with filters).",
    no_args_is_help=True,
)

RouteOption = typer.Option(None, "--route", "-r", help="Only this route (repeatable); default: every route.")
STAGES = ("parse", "filter", "map", "validate", "deliver")  # the stages of errors.PipelineError


def _stage(value: str | None) -> str | None:
    """``--stage``: one of STAGES (any case), or a usage error naming them."""
    if value is None or value.lower() in STAGES:
        return value.lower() if value else None
    raise typer.BadParameter(f"{value!r} is not a stage; use one of {', '.join(STAGES)}")


StageOption = typer.Option(None, "--stage", callback=_stage, metavar="|".join(STAGES),
                           help="Only this stage: parse, filter, map, validate or deliver.")
ErrorOption = typer.Option(None, "--error", help="Only dead letters whose error class or message contains TEXT.")
SinceOption = typer.Option(None, "--since", help="Only dead letters whose last failure is at or after this "
                                                 "ISO 8601 time (UTC when no offset).")
CorrelationOption = typer.Option(None, "--correlation-id", help="Only this correlation id.")
LimitOption = typer.Option(100, "--limit", min=1, help="At most N dead letters.")
ScanOption = typer.Option(DEFAULT_SCAN, "--scan", min=1, hidden=True,
                          help="At most N dead letters read per queue while looking for matches.")
IdsArgument = typer.Argument(None, help="Dead-letter ids (as `dlq list` prints them; a unique prefix will do).")


@dataclass(frozen=True)
class Filters:
    """What selects a dead letter; every given criterion must hold."""

    stage: str | None = None
    error: str | None = None
    since: dt.datetime | None = None
    correlation_id: str | None = None
    ids: tuple[str, ...] = ()

    @property
    def narrowing(self) -> bool:
        """True if anything but the route selects."""
        return bool(self.stage or self.error or self.since or self.correlation_id or self.ids)

    def __call__(self, item: Held) -> bool:
        letter = item.letter
        if self.ids and not any(item.id == wanted or item.id.startswith(wanted) for wanted in self.ids):
            return False
        if self.stage and letter.stage != self.stage:
            return False
        if self.error and self.error.lower() not in f"{letter.error_class}\n{letter.error}".lower():
            return False
        if self.correlation_id and letter.correlation_id != self.correlation_id:
            return False
        if self.since:
            last = _parse_time(letter.last_failure)
            if last is None or last < self.since:
                return False
        return True


def _parse_time(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _filters(stage: str | None, error: str | None, since: str | None, correlation_id: str | None,
             ids: list[str] | None = None) -> Filters:
    when = None
    if since:
        when = _parse_time(since)
        if when is None:
            fail(f"--since {since!r} is not an ISO 8601 time (for example 2026-01-31T08:00:00Z)")
    return Filters(stage=stage, error=error, since=when, correlation_id=correlation_id, ids=tuple(ids or ()))


def _queues(project: Project, routes: list[str] | None) -> list[tuple[str, str]]:
    """(route, dead-letter queue) for the routes asked for, or every route of the project."""
    names = routes or sorted(project.routes)
    unknown = [name for name in names if name not in project.routes]
    if unknown:
        fail(f"unknown route {unknown[0]!r}; routes: {', '.join(sorted(project.routes))}")
    topology = Topology.of(project.routes.values(), project.settings.queue_prefix)
    return [(name, topology.route(name).dead_letter) for name in names]


async def _depth(broker: Broker, queue: str) -> int:
    """Ready messages in ``queue``; 0 if it does not exist (nothing dead-lettered yet)."""
    try:
        return (await broker.queue_info(queue)).messages
    except BrokerError:
        return 0


async def _with_letters(project: Project, queues: list[tuple[str, str]], filters: Filters, limit: int, scan: int,
                        work: Callable[[Broker, list[Browse]], Awaitable[T]]) -> T:
    """Hold up to ``limit`` matching dead letters over ``queues``, run ``work``, give back the rest."""
    broker = make_broker(project.settings.broker_url, project.settings.broker_tls)
    await broker.connect()
    browses: list[Browse] = []
    try:
        remaining = limit
        for route, queue in queues:
            if remaining <= 0:
                break
            if not await _depth(broker, queue):
                continue
            held = await browse(broker, queue, remaining, match=filters, scan=scan, route=route,
                                delivery_limit=project.settings.delivery_limit)  # for broker-dead-lettered ones
            browses.append(held)
            remaining -= len(held.matched)
        return await work(broker, browses)
    finally:
        try:
            for held in browses:
                with contextlib.suppress(Exception):  # if giving back fails, closing gives back all the same
                    await held.release()
        finally:
            await broker.close()


def _run(coroutine: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coroutine

    try:
        return asyncio.run(wrapper())
    except MiddlewareError as exc:  # the broker, or the audit log
        fail(str(exc))


def _audit_log(project: Project) -> AuditLog:
    """The project's audit log; exits with one ``error:`` line if a record could not be appended."""
    log = AuditLog(project.settings.audit_path)
    try:
        log.check()
    except MiddlewareError as exc:
        fail(str(exc))
    return log


def _record(audit: AuditLog, command: str, ids: list[str], **details: Any) -> None:
    """Append an audit record, or exit with one ``error:`` line."""
    try:
        audit.append(command, ids, **details)
    except MiddlewareError as exc:
        fail(str(exc))


def _routes_of(items: list[Held]) -> list[str]:
    return sorted({item.letter.route for item in items})


def _summary(item: Held) -> dict[str, Any]:
    letter = item.letter
    return {"id": item.id, "queue": item.queue, "route": letter.route, "stage": letter.stage,
            "connector": letter.connector, "error_class": letter.error_class, "attempts": letter.attempts,
            "first_failure": letter.first_failure, "last_failure": letter.last_failure,
            "correlation_id": letter.correlation_id, "replay_queue": replay_target(letter),
            "bytes": len(letter.body)}


def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=220)  # pipes and CI logs: no truncation


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    _console().print(table)


def _matched(browses: list[Browse]) -> list[Held]:
    return [item for held in browses for item in held.matched]


# -- list ---------------------------------------------------------------------------------------------

@dlq_app.command("list")
def list_(
    route: list[str] | None = RouteOption, stage: str | None = StageOption, error: str | None = ErrorOption,
    since: str | None = SinceOption, correlation_id: str | None = CorrelationOption, limit: int = LimitOption,
    scan: int = ScanOption, project: Path = ProjectOption, as_json: bool = JsonOption,
) -> None:
    """List dead letters (oldest first): id, route, stage, connector, error, attempts, last failure,
    correlation id. Never the body; the queues are left as they were."""
    loaded = open_project(project)
    filters = _filters(stage, error, since, correlation_id)
    queues = _queues(loaded, route)

    async def work(_: Broker, browses: list[Browse]) -> list[dict[str, Any]]:
        return [_summary(item) for item in _matched(browses)]

    rows = _run(_with_letters(loaded, queues, filters, limit, scan, work))
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no dead letters")
        return
    _table(f"dead letters ({len(rows)})",
           ["id", "route", "stage", "connector", "error class", "attempts", "last failure", "correlation id"],
           [[r["id"], r["route"], r["stage"], r["connector"] or "", r["error_class"], str(r["attempts"]),
             r["last_failure"], r["correlation_id"] or ""] for r in rows])


# -- show ---------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def render_body(body: bytes) -> str:
    """The body as text for a terminal: HL7 segments (CR-separated) on their own lines, undecodable
    bytes and control characters escaped (``\\xNN``)."""
    text = body.decode("utf-8", errors="backslashreplace")
    lines = re.split(r"\r\n|\r|\n", text)
    return "\n".join(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line) for line in lines)


def _masked(body: bytes) -> str:
    return f"<{len(body)} bytes, masked: use --reveal>"


def _body_fields(body: bytes) -> dict[str, Any]:
    fields: dict[str, Any] = {"body_base64": base64.b64encode(body).decode("ascii")}
    with contextlib.suppress(UnicodeDecodeError):
        fields["body_text"] = body.decode("utf-8")
    return fields


@dlq_app.command()
def show(
    ids: list[str] = typer.Argument(..., help="Dead-letter id(s) as `dlq list` prints them (a unique prefix will do)."),
    reveal: bool = typer.Option(False, "--reveal", help="Print the body (it may hold patient data)."),
    route: list[str] | None = RouteOption, scan: int = ScanOption,
    project: Path = ProjectOption, as_json: bool = JsonOption,
) -> None:
    """Show a dead letter's headers and error; the body is masked unless --reveal."""
    loaded = open_project(project)
    filters = Filters(ids=tuple(ids))
    queues = _queues(loaded, route)
    audit = _audit_log(loaded) if reveal else None

    async def work(_: Broker, browses: list[Browse]) -> list[Held]:
        return _matched(browses)

    found = _run(_with_letters(loaded, queues, filters, 1000, scan, work))
    missing = [wanted for wanted in ids if not any(i.id == wanted or i.id.startswith(wanted) for i in found)]
    if missing:
        fail(f"no dead letter with id {missing[0]!r} (see `middleware dlq list`)")
    if audit is not None:  # recorded before any body is shown
        _record(audit, "dlq show --reveal", [i.id for i in found], routes=_routes_of(found))
    for item in found:
        letter = item.letter
        error, headers = mask_secrets(letter.error), masked_headers(letter.headers)
        if as_json:
            record = {**_summary(item), "error": error, "content_type": item.message.content_type,
                      "message_id": item.message.message_id, "headers": headers}
            record.update(_body_fields(letter.body) if reveal else {"body": _masked(letter.body)})
            print_json(record)
            continue
        typer.echo(f"id:             {item.id}")
        typer.echo(f"queue:          {item.queue}")
        for key, value in (("route", letter.route), ("stage", letter.stage), ("connector", letter.connector),
                           ("error class", letter.error_class), ("error", error),
                           ("attempts", letter.attempts), ("first failure", letter.first_failure),
                           ("last failure", letter.last_failure), ("correlation id", letter.correlation_id),
                           ("message id", item.message.message_id), ("replay to", replay_target(letter)),
                           ("content type", item.message.content_type)):
            typer.echo(f"{key + ':':<16}{'' if value is None else value}")
        typer.echo("headers:")
        for key in sorted(headers):
            typer.echo(f"  {key}: {headers[key]}")
        if reveal:
            typer.echo(f"body ({len(letter.body)} bytes):")
            typer.echo(render_body(letter.body))
        else:
            typer.echo(f"body:           {_masked(letter.body)}")
        typer.echo("")


# -- replay -------------------------------------------------------------------------------------------

@dlq_app.command("replay")
def replay_(
    ids: list[str] | None = IdsArgument,
    all_: bool = typer.Option(False, "--all", help="Replay every dead letter the filters select (no ids)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be replayed; change nothing."),
    route: list[str] | None = RouteOption, stage: str | None = StageOption, error: str | None = ErrorOption,
    since: str | None = SinceOption, correlation_id: str | None = CorrelationOption, limit: int = LimitOption,
    scan: int = ScanOption, project: Path = ProjectOption, as_json: bool = JsonOption,
) -> None:
    """Send dead letters back where they failed (x-mw-replay-queue), body unchanged. Each dead letter
    is removed only after the broker confirmed its replay (a crash duplicates, never loses)."""
    if not ids and not all_:
        fail("give dead-letter ids, or --all (with filters) to replay everything they select")
    loaded = open_project(project)
    filters = _filters(stage, error, since, correlation_id, ids)
    queues = _queues(loaded, route)
    audit = None if dry_run else _audit_log(loaded)  # a dry run changes nothing and shows no body

    async def work(_: Broker, browses: list[Browse]) -> tuple[list[dict[str, Any]], list[str]]:
        done: list[dict[str, Any]] = []
        problems: list[str] = []
        try:
            for held in browses:
                for item in held.matched:
                    target = replay_target(item.letter)
                    if not target:
                        problems.append(f"{item.id}: no x-mw-replay-queue header; left in {item.queue}")
                        continue
                    outgoing = (replay_message(item.message, held.queue) if dry_run
                                else await replay(held, item, target))
                    done.append({**_summary(item), "to": target, "replay_count": outgoing.headers[REPLAY_COUNT],
                                 "dry_run": dry_run})
        finally:  # what was replayed is recorded even if a later replay failed
            if audit is not None:
                audit.append("dlq replay", [row["id"] for row in done], routes=sorted({r["route"] for r in done}),
                             to=sorted({r["to"] for r in done}))
        return done, problems

    done, problems = _run(_with_letters(loaded, queues, filters, limit, scan, work))
    if ids:
        missing = [w for w in ids if not any(d["id"] == w or d["id"].startswith(w) for d in done)]
        problems += [f"no dead letter with id {w!r}" for w in missing if not any(w in p for p in problems)]
    verb = "would replay" if dry_run else "replayed"
    if as_json:
        print_json(done)
    else:
        for row in done:
            typer.echo(f"{verb} {row['id']} ({row['route']}/{row['stage']}) -> {row['to']}"
                       f" (replay {row['replay_count']})")
        typer.echo(f"{verb} {len(done)} dead letter(s)")
    if problems:
        fail("; ".join(problems))


# -- purge --------------------------------------------------------------------------------------------

@dlq_app.command()
def purge(
    ids: list[str] | None = IdsArgument,
    all_: bool = typer.Option(False, "--all", help="Delete every dead letter of the routes (no filter needed)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    route: list[str] | None = RouteOption, stage: str | None = StageOption, error: str | None = ErrorOption,
    since: str | None = SinceOption, correlation_id: str | None = CorrelationOption,
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most N dead letters (default: all matching, "
                                                                   f"up to --scan {DEFAULT_SCAN} per queue)."),
    scan: int = ScanOption, project: Path = ProjectOption, as_json: bool = JsonOption,
) -> None:
    """Delete dead letters for good: those selected by ids or filters, or --all. Asks first unless --yes."""
    filters = _filters(stage, error, since, correlation_id, ids)
    if not filters.narrowing and not all_:
        fail("give ids or filters (--stage, --error, --since, --correlation-id), or --all")
    if not yes and not sys.stdin.isatty():
        fail("purge deletes dead letters for good: add --yes (or run it at a terminal to confirm)")
    loaded = open_project(project)
    queues = _queues(loaded, route)
    audit = _audit_log(loaded)
    routes = {queue: name for name, queue in queues}

    def confirm(counts: dict[str, int]) -> bool:
        if yes or not sum(counts.values()):
            return True
        detail = ", ".join(f"{n} in {q}" for q, n in counts.items() if n)
        return typer.confirm(f"Delete {sum(counts.values())} dead letter(s) ({detail}) for good?", err=True)

    async def purge_all() -> dict[str, int]:  # no filter: the broker purges whole queues
        broker = make_broker(loaded.settings.broker_url, loaded.settings.broker_tls)
        await broker.connect()
        try:
            counts = {queue: await _depth(broker, queue) for _, queue in queues}
            if not confirm(counts):
                raise typer.Abort()
            purged: dict[str, int] = {}
            try:
                for queue, n in counts.items():
                    purged[queue] = await broker.purge(queue) if n else 0
            finally:  # a whole-queue purge names no ids: the record says which queues and how many
                audit.append("dlq purge", [], count=sum(purged.values()), scope="all",
                             routes=sorted(routes[q] for q, n in purged.items() if n), queues=purged)
            return purged
        finally:
            await broker.close()

    async def work(_: Broker, browses: list[Browse]) -> dict[str, int]:
        counts = {queue: 0 for _, queue in queues}
        for held in browses:
            counts[held.queue] = len(held.matched)
        if not confirm(counts):
            raise typer.Abort()
        removed: list[Held] = []
        try:
            for held in browses:
                for item in held.matched:
                    await held.ack(item)
                    removed.append(item)
        finally:
            audit.append("dlq purge", [item.id for item in removed], routes=_routes_of(removed))
        return counts

    if not filters.narrowing and limit is None:
        counts = _run(purge_all())
    else:
        counts = _run(_with_letters(loaded, queues, filters, limit or scan * len(queues), scan, work))
    if as_json:
        print_json({"purged": {routes[q]: n for q, n in counts.items()}, "total": sum(counts.values())})
        return
    _table("purged dead letters", ["route", "queue", "purged"],
           [[routes[q], q, str(n)] for q, n in counts.items()])
    typer.echo(f"purged {sum(counts.values())} dead letter(s)")


# -- export -------------------------------------------------------------------------------------------

@dlq_app.command()
def export(
    out: Path | None = typer.Option(None, "--out", "-o", dir_okay=False,
                                    help="Write JSON lines to this file (default: stdout)."),
    remove: bool = typer.Option(False, "--remove", help="Delete the exported dead letters once written (fsynced)."),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists (never a symbolic link)."),
    route: list[str] | None = RouteOption, stage: str | None = StageOption, error: str | None = ErrorOption,
    since: str | None = SinceOption, correlation_id: str | None = CorrelationOption, limit: int = LimitOption,
    scan: int = ScanOption, project: Path = ProjectOption,
) -> None:
    """Write dead letters as JSON lines: headers and the body (base64, plus body_text when UTF-8).
    Bodies are always included; the dead letters stay in place unless --remove. --out creates a new
    file readable by its owner only (0600); an existing file needs --force, a symbolic link is refused."""
    if out is not None and out.is_symlink():  # checked again, race-free, when the file is created
        fail(f"cannot write {out}: it is a symbolic link (not followed)")
    if out is not None and out.exists() and not force:
        fail(f"cannot write {out}: it exists (add --force to replace it)")
    loaded = open_project(project)
    filters = _filters(stage, error, since, correlation_id)
    queues = _queues(loaded, route)
    audit = _audit_log(loaded)

    async def work(_: Broker, browses: list[Browse]) -> int:
        items = _matched(browses)
        text = "".join(json.dumps(export_record(item), default=str) + "\n" for item in items)
        # recorded before any body leaves
        audit.append("dlq export", [item.id for item in items], routes=_routes_of(items),
                     out=str(out.absolute()) if out is not None else "stdout", remove=remove)
        if out is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            try:
                write_private_file(out, text.encode("utf-8"), force=force)
            except OSError as exc:  # the dead letters stay where they were
                fail(f"cannot write {out}: {exc.strerror or exc}")
        if remove:
            for held in browses:
                for item in held.matched:
                    await held.ack(item)
        return len(items)

    count = _run(_with_letters(loaded, queues, filters, limit, scan, work))
    where = str(out) if out is not None else "stdout"
    typer.echo(f"exported {count} dead letter(s) to {where}{' and removed them' if remove else ''}", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(dlq_app, name="dlq")
