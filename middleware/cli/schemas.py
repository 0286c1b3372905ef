"""``middleware schemas list/check``: the event schema catalogue and its compatibility check.

``check`` compares every ``schemas/<type>/<major>.json`` with a baseline (a git revision of the
project, or a folder holding a published copy of ``schemas/``) and reports every change that is not
backward compatible within a major version (see :func:`middleware.schemas.compatibility_problems`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from middleware.cli.common import JsonOption, ProjectOption, fail, open_project, print_json
from middleware.mapping import Condition
from middleware.project import Project
from middleware.schemas import compatibility_problems, required_paths

schemas_app = typer.Typer(
    name="schemas", help="Event schema catalogue and backward-compatibility check.", no_args_is_help=True,
)

AgainstOption = typer.Option(None, "--against", metavar="REF",
                             help="Compare with this git revision of the project (default: HEAD).")
AgainstDirOption = typer.Option(None, "--against-dir", metavar="DIR", file_okay=False,
                                help="Compare with the baseline schemas in DIR (DIR/schemas/ or DIR itself "
                                     "holding <type>/<major>.json) instead of git.")

SchemaKey = tuple[str, int]


# -- list ---------------------------------------------------------------------------------------------

def _describe_condition(condition: Condition | None) -> str:
    if condition is None:
        return ""
    parts: list[str] = []
    if condition.message_types is not None:
        parts.append("/".join(sorted(condition.message_types)))
    parts += [f"{accessor.expr}={'|'.join(sorted(values))}" for accessor, values in condition.equals]
    parts += [f"exists {accessor.expr}" for accessor in condition.exists]
    parts += [f"missing {accessor.expr}" for accessor in condition.missing]
    return ", ".join(parts)


def catalogue(project: Project) -> list[dict[str, Any]]:
    """One entry per schema file: type, major, file, title, description, required paths, producers."""
    producers: dict[SchemaKey, list[dict[str, Any]]] = {}
    for route in sorted(project.routes.values(), key=lambda r: r.name):
        for rule in route.events:
            when = rule.when
            producers.setdefault((rule.type, rule.version), []).append({
                "route": route.name,
                "message_types": sorted(when.message_types) if when and when.message_types is not None else None,
                "when": _describe_condition(when) or None,
            })
    entries: list[dict[str, Any]] = []
    known = project.schemas.keys()  # a method of SchemaRegistry, not a dict
    for event_type, major in known:
        schema = project.schemas.get(event_type, major)
        assert schema is not None
        document: dict[str, Any] = schema.validator.schema if isinstance(schema.validator.schema, dict) else {}
        produced_by = producers.get((event_type, major), [])
        entries.append({
            "type": event_type, "major": major,
            "file": str(schema.path.relative_to(project.root)) if schema.path.is_relative_to(project.root)
            else str(schema.path),
            "title": document.get("title"), "description": document.get("description"),
            "required": required_paths(document),
            "produced_by": produced_by, "unused": not produced_by,
        })
    return entries


def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=220)  # pipes and CI logs: no truncation


@schemas_app.command("list")
def list_(project: Path = ProjectOption, as_json: bool = JsonOption) -> None:
    """List every event type and major version: title, required fields and the routes that produce it
    (schemas no route produces are marked unused)."""
    entries = catalogue(open_project(project))
    if as_json:
        print_json(entries)
        return
    if not entries:
        typer.echo("no schemas in schemas/")
        return
    table = Table(title=f"event schemas ({len(entries)})")
    for column in ("type", "major", "description", "produced by", "required fields"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        producers = "\n".join(p["route"] + (f" ({p['when']})" if p["when"] else "") for p in entry["produced_by"])
        table.add_row(escape(entry["type"]), f"v{entry['major']}",
                      escape(entry["description"] or entry["title"] or ""),
                      escape(producers or "unused: no route produces it"),
                      escape(", ".join(entry["required"]) or "(none)"))
    _console().print(table)
    unused = [e for e in entries if e["unused"]]
    if unused:
        typer.echo(f"{len(unused)} unused schema(s): " + ", ".join(e["file"] for e in unused))


# -- check --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """One incompatible change (or unreadable file) in one schema file."""

    file: str
    message: str
    action: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message} ({self.action})"


def _key(relative: str) -> SchemaKey | None:
    """``<type>/<major>.json`` -> (type, major); None for anything else."""
    parts = relative.split("/")
    if len(parts) != 2 or not parts[1].endswith(".json") or not parts[1][:-5].isdigit():
        return None
    return parts[0], int(parts[1][:-5])


def _read_folder(folder: Path) -> dict[SchemaKey, str]:
    files: dict[SchemaKey, str] = {}
    for path in sorted(folder.glob("*/*.json")):
        key = _key(f"{path.parent.name}/{path.name}")
        if key is not None:
            try:
                files[key] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                fail(f"cannot read {path}: {exc}", 2)
    return files


def _git(project: Path, *args: str) -> str:
    try:
        result = subprocess.run(["git", "-C", str(project), *args], capture_output=True, check=False)
    except FileNotFoundError:
        fail("git is not installed: install it or compare with --against-dir DIR", 2)
    if result.returncode != 0:
        raise _GitError(result.stderr.decode(errors="replace").strip())
    return result.stdout.decode("utf-8", errors="replace")


class _GitError(Exception):
    pass


def _read_git(project: Path, ref: str) -> dict[SchemaKey, str]:
    """The project's ``schemas/*/*.json`` at git revision ``ref``."""
    if shutil.which("git") is None:
        fail("git is not installed: install it or compare with --against-dir DIR", 2)
    try:
        prefix = _git(project, "rev-parse", "--show-prefix").strip()
    except _GitError:
        fail(f"{project} is not in a git repository: compare with --against-dir DIR instead", 2)
    try:
        _git(project, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except _GitError:
        fail(f"unknown git revision {ref!r} in the repository of {project}", 2)
    folder = f"{prefix}schemas/"
    try:
        listing = _git(project, "ls-tree", "-r", "--name-only", "--full-tree", ref, "--", folder)
    except _GitError as exc:
        fail(f"cannot list {folder} at {ref}: {exc}", 2)
    files: dict[SchemaKey, str] = {}
    for name in listing.splitlines():
        key = _key(name[len(folder):]) if name.startswith(folder) else None
        if key is not None:
            try:
                files[key] = _git(project, "show", f"{ref}:{name}")
            except _GitError as exc:
                fail(f"cannot read {name} at {ref}: {exc}", 2)
    return files


def _parse(text: str, shown: str, findings: list[Finding], *, check_schema: bool) -> Any:
    try:
        document = json.loads(text)
        if check_schema:
            Draft202012Validator.check_schema(document)
    except json.JSONDecodeError as exc:
        findings.append(Finding(shown, f"invalid JSON at line {exc.lineno}: {exc.msg}", "fix the file"))
        return None
    except SchemaError as exc:
        findings.append(Finding(shown, f"invalid JSON Schema: {exc.message}", "fix the file"))
        return None
    return document


def compare(baseline: dict[SchemaKey, str], current: dict[SchemaKey, str]) -> tuple[list[Finding], dict[str, Any]]:
    """Every incompatible change from ``baseline`` to ``current``, and counts for the summary."""
    findings: list[Finding] = []
    new: list[str] = []
    compared = 0
    for key in sorted(set(baseline) | set(current)):
        event_type, major = key
        shown = f"schemas/{event_type}/{major}.json"
        next_major = f"add a new major version schemas/{event_type}/{major + 1}.json"
        if key not in current:
            findings.append(Finding(shown, "schema removed", f"restore it; producers and consumers of "
                                    f"{event_type}.v{major} rely on it"))
            continue
        document = _parse(current[key], shown, findings, check_schema=True)
        if key not in baseline:
            new.append(shown)
            continue
        if document is None:
            continue
        old = _parse(baseline[key], f"{shown} (baseline)", [], check_schema=False)
        if old is None:
            typer.echo(f"warning: {shown}: the baseline copy is not valid JSON; not compared", err=True)
            continue
        compared += 1
        findings += [Finding(shown, problem, next_major) for problem in compatibility_problems(old, document)]
    return findings, {"compared": compared, "new": new}


@schemas_app.command("check")
def check(
    against: str | None = AgainstOption, against_dir: Path | None = AgainstDirOption,
    project: Path = ProjectOption, as_json: bool = JsonOption,
) -> None:
    """Report every backward-incompatible change to a schema within its major version, as
    `schemas/<type>/<major>.json: <path>: <change> (<what to do>)`, and exit 1; else print a summary.
    The baseline is the git revision REF of the project (default HEAD) or --against-dir DIR."""
    if against is not None and against_dir is not None:
        fail("use either --against REF or --against-dir DIR, not both", 2)
    folder = project / "schemas"
    if not folder.is_dir():
        fail(f"no schemas/ folder in {project}", 2)
    if against_dir is not None:
        if not against_dir.is_dir():
            fail(f"baseline folder {against_dir} does not exist", 2)
        base_folder = against_dir / "schemas" if (against_dir / "schemas").is_dir() else against_dir
        baseline, described = _read_folder(base_folder), str(against_dir)
    else:
        ref = against or "HEAD"
        baseline, described = _read_git(project, ref), f"git {ref}"
    findings, counts = compare(baseline, _read_folder(folder))
    if as_json:
        print_json({"ok": not findings, "baseline": described, "compared": counts["compared"], "new": counts["new"],
                    "problems": [{"file": f.file, "message": f.message, "action": f.action} for f in findings]})
    else:
        for finding in findings:
            typer.echo(str(finding))
    if findings:
        if not as_json:
            typer.echo(f"{len(findings)} incompatible change(s) against {described}", err=True)
        raise typer.Exit(1)
    if not as_json:
        typer.echo(f"ok: {counts['compared']} schema(s) compatible with {described}, {len(counts['new'])} new")


def register(app: typer.Typer) -> None:
    app.add_typer(schemas_app, name="schemas")
