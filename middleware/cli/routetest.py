"""``middleware test [ROUTE...]``: run the route test cases kept beside the routes.

A case is ``routes/tests/<route>/<case>.yaml``: an input (a file path relative to the case, or inline
``input_text``), optional transport context, and one expectation: ``events`` (a subset match: every key
given must match, lists match item by item and must have the same length), ``filtered: true``, or
``error: {stage, message}`` (``message`` is a substring of the error). Cases run the pure pipeline:
no broker. ``--update`` rewrites ``expect`` of the selected cases from what the route produces now.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
import yaml

from middleware.cli.common import JsonOption, ProjectOption, fail, open_project, print_json
from middleware.errors import PipelineError, Problem
from middleware.formats.hl7batch import iter_batch
from middleware.project import Project
from middleware.route import MessageContext, Outcome, Route, transform_split
from middleware.yamlfile import YamlDoc, load_yaml

CASES_DIR = Path("routes") / "tests"
CASE_KEYS = {"description", "input", "input_text", "batch_position", "context", "expect"}
CONTEXT_KEYS = {"correlation_id", "header_correlation_id", "message_id", "received_at"}
EXPECT_KEYS = {"events", "filtered", "error"}
STAGES = ("parse", "filter", "map", "validate")
UPDATED_EVENT_KEYS = ("type", "subject", "data")  # what --update writes (plus keys a case already checked)
MAX_DIFFS = 8
_MISSING = object()


@dataclass
class Difference:
    """One path where the actual output does not match the expectation."""

    path: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        return f"{self.path}: expected {_show(self.expected)}, got {_show(self.actual)}"


@dataclass
class CaseResult:
    """The outcome of one case file."""

    file: str  # relative to the project, as printed
    route: str
    problems: list[Problem] = field(default_factory=list)  # the case file itself is broken
    differences: list[Difference] = field(default_factory=list)
    updated: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and not self.differences


# -- comparison ----------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(missing)"
    if isinstance(value, dt.date):
        return repr(value.isoformat())
    if isinstance(value, (dict, list)):
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
        return text if len(text) <= 120 else text[:117] + "..."
    return repr(value)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _scalar_equal(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dt.datetime):  # YAML reads an unquoted timestamp as a datetime
        if not isinstance(actual, str):
            return False
        try:
            parsed = dt.datetime.fromisoformat(actual.replace("Z", "+00:00"))
        except ValueError:
            return False
        return (parsed.tzinfo is None) == (expected.tzinfo is None) and parsed == expected
    if isinstance(expected, dt.date):  # ... and an unquoted date as a date
        return isinstance(actual, str) and actual == expected.isoformat()
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    same: bool = expected == actual
    return same


def subset_diff(expected: Any, actual: Any, path: str = "") -> list[Difference]:
    """Where ``actual`` does not match ``expected``: dict keys not given are ignored, lists match item
    by item (same length), scalars must be equal."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [Difference(path or "(top)", expected, actual)]
        found: list[Difference] = []
        for key, value in expected.items():
            child = _join(path, str(key))
            if str(key) not in actual:
                found.append(Difference(child, value, _MISSING))
            else:
                found += subset_diff(value, actual[str(key)], child)
        return found
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [Difference(path or "(top)", expected, actual)]
        found = []
        for index, (want, got) in enumerate(zip(expected, actual, strict=False)):
            found += subset_diff(want, got, _join(path, index))
        if len(expected) != len(actual):
            found.append(Difference(f"{path or '(top)'} length", len(expected), len(actual)))
        return found
    return [] if _scalar_equal(expected, actual) else [Difference(path or "(top)", expected, actual)]


# -- case files ----------------------------------------------------------------------------------------


@dataclass
class Case:
    """A parsed case file."""

    path: Path
    doc: YamlDoc
    route: str
    raw: bytes = b""
    context: MessageContext = field(default_factory=MessageContext)
    expect: dict[str, Any] | None = None


def _context(doc: YamlDoc, spec: Any) -> MessageContext:
    if spec is None:
        return MessageContext()
    if not isinstance(spec, dict):
        doc.problem(("context",), "context: expected a mapping of correlation_id, header_correlation_id, "
                                  "message_id, received_at")
        return MessageContext()
    values: dict[str, Any] = {}
    for key, value in spec.items():
        if key not in CONTEXT_KEYS:
            doc.problem(("context", key), f"context: unknown key {key!r} (allowed: {', '.join(sorted(CONTEXT_KEYS))})")
        elif key == "received_at":
            when = value if isinstance(value, dt.datetime) else None
            if isinstance(value, str):
                try:
                    when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
                except ValueError:
                    when = None
            if when is None:
                doc.problem(("context", key), f"context.received_at: {value!r} is not an ISO 8601 time")
            else:
                values[key] = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
        elif value is not None:
            values[key] = str(value)
    return MessageContext(**values)


def _input(doc: YamlDoc, data: dict[str, Any], folder: Path) -> bytes:
    if ("input" in data) == ("input_text" in data):
        doc.problem((), "give exactly one of input (a file path relative to this case) or input_text")
        return b""
    if "input_text" in data:
        if not isinstance(data["input_text"], str):
            doc.problem(("input_text",), "input_text: expected text")
            return b""
        raw = data["input_text"].encode()
    else:
        if not isinstance(data["input"], str):
            doc.problem(("input",), "input: expected a file path relative to this case")
            return b""
        source = folder / data["input"]
        try:
            raw = source.read_bytes()
        except OSError as exc:
            doc.problem(("input",), f"cannot read input {data['input']}: {exc.strerror or exc}")
            return b""
    position = data.get("batch_position")
    if position is None:
        return raw
    if not isinstance(position, int) or isinstance(position, bool) or position < 1:
        doc.problem(("batch_position",), "batch_position: expected a message number (1 for the first)")
        return b""
    for item in iter_batch(io.BytesIO(raw)):
        if item.position == position:
            return item.raw
    doc.problem(("batch_position",), f"batch_position: the input has no message {position}")
    return b""


def _expectation(doc: YamlDoc, spec: Any, *, required: bool) -> dict[str, Any] | None:
    if spec is None:
        if required:
            doc.problem((), "missing key: expect (events, filtered: true or error; "
                            "or run with --update to record what the route produces)")
        return None
    if not isinstance(spec, dict) or len(set(spec) & EXPECT_KEYS) != 1:
        doc.problem(("expect",), "expect: give exactly one of events, filtered: true, or error: {stage, message}")
        return None
    for key in set(spec) - EXPECT_KEYS:
        doc.problem(("expect", key), f"expect: unknown key {key!r} (allowed: events, filtered, error)")
    if "events" in spec:
        events = spec["events"]
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            doc.problem(("expect", "events"), "expect.events: expected a list of events (mappings)")
    elif "filtered" in spec:
        if spec["filtered"] is not True:
            doc.problem(("expect", "filtered"), "expect.filtered: only `filtered: true` is meaningful")
    else:
        error = spec["error"]
        if not isinstance(error, dict) or error.get("stage") not in STAGES:
            doc.problem(("expect", "error"), f"expect.error: needs stage: one of {', '.join(STAGES)}")
        else:
            for key in set(error) - {"stage", "message"}:
                doc.problem(("expect", "error", key), f"expect.error: unknown key {key!r} (allowed: stage, message)")
            if "message" in error and not isinstance(error["message"], str):
                doc.problem(("expect", "error", "message"), "expect.error.message: expected text")
    return spec


def load_case(path: Path, root: Path, *, update: bool = False) -> Case:
    """Read and check one case file; problems are recorded on ``case.doc``."""
    display = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    doc = load_yaml(path, display)
    case = Case(path, doc, route=path.parent.name)
    if doc.problems:
        return case
    data = doc.data
    if not isinstance(data, dict):
        doc.problem((), "a test case is a mapping with input (or input_text) and expect")
        return case
    for key in sorted(set(data) - CASE_KEYS, key=str):
        doc.problem((key,), f"unknown key {key!r} (allowed: {', '.join(sorted(CASE_KEYS))})")
    case.raw = _input(doc, data, path.parent)
    case.context = _context(doc, data.get("context"))
    case.expect = _expectation(doc, data.get("expect"), required=not update)
    return case


def find_cases(project: Project, selected: list[str]) -> list[Path]:
    """Case files for the selected routes (names, case files or folders), or every case of the project."""
    base = project.root / CASES_DIR
    if not selected:
        return sorted(base.glob("*/*.yaml"))
    found: list[Path] = []
    for item in selected:
        if item in project.routes:
            cases = sorted((base / item).glob("*.yaml"))
            if not cases:
                fail(f"no test cases for route {item!r} (add {CASES_DIR / item}/<case>.yaml)")
            found += cases
            continue
        path = Path(item)
        if path.is_dir():
            found += sorted(path.glob("*.yaml")) or sorted(path.glob("*/*.yaml"))
        elif path.is_file():
            found.append(path)
        else:
            fail(f"no route or case file {item!r} (routes: {', '.join(sorted(project.routes))})")
    return list(dict.fromkeys(p.resolve() for p in found))


# -- running -------------------------------------------------------------------------------------------


def _run(route: Route, case: Case, project: Project) -> Outcome | PipelineError | Exception:
    """The route on the case's input, split as publishing splits it (a FHIR Bundle: every entry's
    events in order; the first entry that fails is the outcome)."""
    try:
        return transform_split(route, case.raw, case.context, tz=project.settings.tz)
    except PipelineError as exc:
        return exc
    except Exception as exc:  # a bug in the pipeline: the case fails, the run goes on
        return exc


def _actual_summary(actual: Outcome | Exception) -> str:
    if isinstance(actual, PipelineError):
        return f"error at stage {actual.stage}: {' '.join(str(actual).split())}"
    if isinstance(actual, Exception):
        return f"crash: {type(actual).__name__}: {actual}"
    if actual.filtered:
        return "filtered"
    return f"{len(actual.events)} event(s)"


def check(case: Case, actual: Outcome | Exception) -> list[Difference]:
    """Compare what the route did with the case's expectation."""
    expect = case.expect or {}
    if "events" in expect:
        if not isinstance(actual, Outcome) or actual.filtered:
            return [Difference("outcome", f"{len(expect['events'])} event(s)", _Plain(_actual_summary(actual)))]
        return subset_diff(expect["events"], actual.events, "events")
    if "filtered" in expect:
        if isinstance(actual, Outcome) and actual.filtered:
            return []
        return [Difference("outcome", _Plain("filtered"), _Plain(_actual_summary(actual)))]
    error = expect.get("error") or {}
    if not isinstance(actual, PipelineError):
        return [Difference("outcome", _Plain(f"error at stage {error.get('stage')}"), _Plain(_actual_summary(actual)))]
    found = []
    if actual.stage != error.get("stage"):
        found.append(Difference("error.stage", error.get("stage"), actual.stage))
    message = error.get("message")
    if message and message not in str(actual):
        found.append(Difference("error.message", _Plain(f"contains {message!r}"), " ".join(str(actual).split())))
    return found


class _Plain(str):
    """A value shown as is (not quoted) in a difference."""

    def __repr__(self) -> str:
        return str(self)


def run_case(case: Case, project: Project, *, update: bool) -> CaseResult:
    result = CaseResult(case.doc.file, case.route)
    if not case.doc.problems and case.route not in project.routes:
        case.doc.problem((), f"no route {case.route!r}: a case lives in {CASES_DIR}/<route>/ "
                             f"(routes: {', '.join(sorted(project.routes))})")
    if case.doc.problems:
        result.problems = list(case.doc.problems)
        return result
    actual = _run(project.routes[case.route], case, project)
    if update and (case.expect is None or "events" in case.expect):
        new = _recorded_expectation(case, actual)
        if new is not None:
            _rewrite_expect(case, new)
            case.expect = new
            result.updated = True
    result.differences = check(case, actual) if case.expect is not None else [
        Difference("outcome", _Plain("an expectation"), _Plain(_actual_summary(actual)))]
    return result


def _recorded_expectation(case: Case, actual: Outcome | Exception) -> dict[str, Any] | None:
    """What ``--update`` writes: the events as produced now (type, subject, full data, and any other
    attribute the case already checked); for a new case also ``filtered`` or ``error``."""
    if isinstance(actual, Outcome) and not actual.filtered:
        old = (case.expect or {}).get("events") or []
        events = []
        for index, event in enumerate(actual.events):
            checked = old[index] if index < len(old) and isinstance(old[index], dict) else {}
            keys = [*UPDATED_EVENT_KEYS, *(k for k in checked if k not in UPDATED_EVENT_KEYS)]
            events.append({k: event[k] for k in keys if k in event})
        return {"events": events}
    if case.expect is not None:
        return None  # an events case that no longer yields events: fix the mapping or the case by hand
    if isinstance(actual, Outcome):
        return {"filtered": True}
    if isinstance(actual, PipelineError):
        return {"error": {"stage": actual.stage, "message": _short(str(actual))}}
    return None


def _short(message: str) -> str:
    """A distinctive start of an error message, to match as a substring."""
    text = " ".join(message.split()).split(" (")[0]
    return text if len(text) <= 60 else text[:60].rsplit(" ", 1)[0]


def _rewrite_expect(case: Case, expect: dict[str, Any]) -> None:
    """Replace the ``expect:`` block of the case file, keeping every other line (and comment) as written."""
    text = case.path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    block = yaml.safe_dump({"expect": expect}, sort_keys=False, allow_unicode=True, default_flow_style=False,
                           width=120)
    top = sorted(line for path, line in case.doc.lines.items() if len(path) == 1)
    start = case.doc.lines.get(("expect",))
    if start is None:
        new = text + ("" if not text or text.endswith("\n") else "\n") + block
    else:
        after = [line for line in top if line > start]
        end = after[0] - 1 if after else len(lines)
        while after and end > start and lines[end - 1].lstrip().startswith("#"):
            end -= 1  # a comment just above the next key belongs to that key
        new = "".join(lines[:start - 1]) + block + "".join(lines[end:])
    case.path.write_text(new, encoding="utf-8")


# -- command -------------------------------------------------------------------------------------------


def route_test(
    routes: list[str] | None = typer.Argument(None, metavar="[ROUTE...]",
                                              help="Routes (or case files / folders) to test; default: all."),
    project: Path = ProjectOption,
    as_json: bool = JsonOption,
    update: bool = typer.Option(False, "--update", help="Rewrite expect.events of the selected cases from the "
                                                        "route's actual output (for an intended mapping change)."),
) -> None:
    """Run the route test cases in routes/tests/<route>/*.yaml (input + expected events; no broker).
    Prints ok/FAIL per case with the first differing paths; exit 1 if any case fails."""
    loaded = open_project(project, offline=True)  # delivers nothing: connector secrets not needed
    paths = find_cases(loaded, routes or [])
    if not paths:
        fail(f"no test cases found under {loaded.root / CASES_DIR} (add <route>/<case>.yaml; see docs/routes.md)")
    root = loaded.root.resolve()
    results = [run_case(load_case(path, root, update=update), loaded, update=update) for path in paths]
    failed = sum(not r.ok for r in results)
    updated = sum(r.updated for r in results)
    if as_json:
        print_json({"ok": not failed, "passed": len(results) - failed, "failed": failed, "updated": updated,
                    "cases": [{"case": r.file, "route": r.route, "ok": r.ok, "updated": r.updated,
                               "problems": [str(p) for p in r.problems],
                               "differences": [{"path": d.path, "expected": _jsonable(d.expected),
                                                "actual": _jsonable(d.actual)} for d in r.differences]}
                              for r in results]})
    else:
        for r in results:
            typer.echo(f"{'ok  ' if r.ok else 'FAIL'}  {r.file}{'  (updated)' if r.updated else ''}")
            for problem in r.problems:
                typer.echo(f"      {problem}")
            for difference in r.differences[:MAX_DIFFS]:
                typer.echo(f"      {difference}")
            if len(r.differences) > MAX_DIFFS:
                typer.echo(f"      ... and {len(r.differences) - MAX_DIFFS} more difference(s)")
        summary = f"{len(results)} case(s): {len(results) - failed} passed, {failed} failed"
        typer.echo(summary + (f", {updated} updated" if updated else ""))
    if failed:
        raise typer.Exit(1)


def _jsonable(value: Any) -> Any:
    if value is _MISSING:
        return None
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def register(app: typer.Typer) -> None:
    app.command("test")(route_test)
