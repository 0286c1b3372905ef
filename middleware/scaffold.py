"""``middleware new route NAME --from SAMPLE``: a working route, schema stub, test case and sample from one message.

The format is detected as ``inspect`` detects it (plus CSV: a header line of a text file); the map
uses the paths ``inspect`` prints, chosen from what the first message of the sample actually holds
(HL7 v2 PID identifiers, name, birth date, sex, visit, order and observation codes; FHIR identifiers,
names, codes, subjects; X12 member, payer and dates; CSV and JSON identifiers and the first columns).
Files are written only if none exists yet; the project is then loaded and the route run on the
sample, and the test case records the events it produces (as ``middleware test --update`` would).
A project that does not load with the new files gets them removed again.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from middleware.errors import MiddlewareError, ParseError, PipelineError
from middleware.formats import SplitInfo, get_format
from middleware.inspect import detect_format, fhir_fields, json_fields
from middleware.project import check_project
from middleware.route import MessageContext, transform_split

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # a route name (project_schema.NAME)
EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")  # an event type (project_schema)
MAX_FIELDS = 14  # an engineer's starting map, not every value of the message
_DATE = r"^\d{4}(-\d{2}(-\d{2})?)?$"


class ScaffoldError(MiddlewareError):
    """The route cannot be scaffolded (a file exists, the sample does not parse, a name is taken)."""


@dataclass(frozen=True)
class Entry:
    """One map entry: target, source paths (first with a value wins), conversion, required."""

    target: str
    paths: tuple[str, ...]
    convert: str = "string"
    required: bool = False

    def yaml_value(self) -> str:
        path = self.paths[0] if len(self.paths) == 1 else "[" + ", ".join(_q(p) for p in self.paths) + "]"
        if self.convert == "string" and not self.required:
            return _q(path) if len(self.paths) == 1 else f"{{path: {path}}}"
        options = [f"path: {_q(path) if len(self.paths) == 1 else path}"]
        if self.convert != "string":
            options.append(f"as: {self.convert}")
        if self.required:
            options.append("required: true")
        return "{" + ", ".join(options) + "}"


@dataclass
class Plan:
    """What will be written, relative to the project folder."""

    name: str
    fmt: str
    event_type: str
    queue: str
    message_type: str | None
    entries: list[Entry]
    sample: Path
    source_options: dict[str, str] = field(default_factory=dict)

    @property
    def route_file(self) -> Path:
        return Path("routes") / f"{self.name}.yaml"

    @property
    def schema_file(self) -> Path:
        return Path("schemas") / self.event_type / "1.json"

    @property
    def sample_file(self) -> Path:
        return Path("samples") / self.name / self.sample.name

    @property
    def case_file(self) -> Path:
        return Path("routes") / "tests" / self.name / f"{_slug(self.sample.stem)}.yaml"

    @property
    def files(self) -> list[Path]:
        return [self.route_file, self.schema_file, self.case_file, self.sample_file]


def _q(text: str) -> str:
    """A YAML flow scalar: quoted when plain YAML would read it otherwise."""
    plain = re.fullmatch(r"[A-Za-z_][\w.\-\[\]=]*", text) and not re.search(r"[\[\]]", text)
    return text if plain else json.dumps(text)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "sample"


def _key(text: str) -> str:
    """A map target step from a column or key name (``Member ID`` -> ``member_id``)."""
    key = re.sub(r"[^a-z0-9]+", "_", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text).lower()).strip("_")
    return key if key and key[0].isalpha() else f"f_{key}"


# -- format and the first message -----------------------------------------------------------------


def detect(raw: bytes) -> tuple[str, dict[str, str]]:
    """(format, source options): ``inspect``'s detection, else CSV when the first line splits into columns."""
    try:
        return detect_format(raw), {}
    except ParseError:
        pass
    try:
        text = raw.lstrip(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("not HL7 v2, X12, JSON nor UTF-8 CSV", hint="give one message as sent by the source") from None
    head = text.splitlines()[0] if text.strip() else ""
    delimiter = max(",;|\t", key=head.count)
    if head.count(delimiter) == 0:
        raise ParseError("neither an HL7 v2 message (MSH first), X12 (ISA first), JSON nor CSV with a header line")
    return "csv", ({} if delimiter == "," else {"delimiter": delimiter})


def _first_document(fmt_name: str, options: dict[str, str], raw: bytes) -> Any:
    fmt = get_format(fmt_name, options)
    for record in fmt.split(io.BytesIO(raw), SplitInfo()):
        if record.error is None:
            return fmt, fmt.parse(record.raw)
    raise ParseError("the sample holds no message that parses", hint=f"check it with `middleware inspect {fmt_name}`")


# -- candidate fields per format ------------------------------------------------------------------

# (target, paths, conversion, identifier) tried in order; kept when the sample has a value there
_HL7: list[tuple[str, tuple[str, ...], str, bool]] = [
    ("patient.mrn", ("PID-3[5=MR].1", "PID-3.1"), "string", True),
    ("patient.name.family", ("PID-5.1",), "string", False),
    ("patient.name.given", ("PID-5.2",), "string", False),
    ("patient.birth_date", ("PID-7",), "date", False),
    ("patient.sex", ("PID-8",), "string", False),
    ("merged_mrn", ("MRG-1.1",), "string", True),
    ("encounter.visit_number", ("PV1-19.1",), "string", False),
    ("encounter.class", ("PV1-2",), "string", False),
    ("encounter.location.point_of_care", ("PV1-3.1",), "string", False),
    ("encounter.location.room", ("PV1-3.2",), "string", False),
    ("encounter.location.bed", ("PV1-3.3",), "string", False),
    ("order.id", ("ORC-2.1", "OBR-2.1", "ORC-3.1", "OBR-3.1"), "string", True),
    ("order.code", ("OBR-4.1",), "string", False),
    ("order.name", ("OBR-4.2",), "string", False),
    ("observation.code", ("OBX-3.1",), "string", False),
    ("observation.value", ("OBX-5",), "string", False),
    ("appointment.id", ("SCH-1.1", "SCH-2.1"), "string", True),
    ("message.control_id", ("MSH-10",), "string", True),
]

_X12: list[tuple[str, tuple[str, ...], str, bool]] = [
    ("member.id", ("NM1[IL]-9", "REF[0F]-2"), "string", True),
    ("member.subscriber_id", ("REF[0F]-2",), "string", False),
    ("member.name.family", ("NM1[IL]-3",), "string", False),
    ("member.name.given", ("NM1[IL]-4",), "string", False),
    ("member.birth_date", ("DMG-2",), "date", False),
    ("member.sex", ("DMG-3",), "string", False),
    ("coverage.payer", ("N1[IN]-2", "NM1[PR]-3"), "string", False),
    ("coverage.payer_id", ("N1[IN]-4", "NM1[PR]-9"), "string", False),
    ("coverage.plan", ("HD-4",), "string", False),
    ("coverage.start", ("DTP[348]-3",), "date", False),
    ("coverage.end", ("DTP[349]-3",), "date", False),
    ("transaction.reference", ("BGN-2", "BHT-3", "ST-2"), "string", True),
]

_FHIR_COMMON = [("id", "id", True), ("identifier", "identifier[0].value", True), ("status", "status", False),
                ("code", "code.coding[0].code", False), ("code_text", "code.text", False),
                ("subject", "subject.reference", False), ("patient", "patient.reference", False)]
_FHIR_NOISE = re.compile(r"\.(resourceType|meta|text|use|system|id)$|\.meta\.|\.text\.div")
_FHIR_PATIENT = [("name.family", "name[0].family", False), ("name.given", "name[0].given[0]", False),
                 ("birth_date", "birthDate", False), ("sex", "gender", False)]


def _has_value(fmt: Any, doc: Any, path: str) -> bool:
    try:
        return bool(fmt.compile_path(path).read(doc))
    except ValueError:
        return False


def _candidates(fmt_name: str, fmt: Any, doc: Any) -> Iterator[tuple[str, tuple[str, ...], str, bool]]:
    if fmt_name in ("hl7v2", "x12"):
        table = _HL7 if fmt_name == "hl7v2" else _X12
        for target, paths, convert, ident in table:
            found = tuple(p for p in paths if _has_value(fmt, doc, p))
            if found:
                if target == "patient.mrn" and not _has_value(fmt, doc, paths[0]):
                    found = paths[1:]  # no MR-typed identifier in the sample: the first repetition
                elif target == "patient.mrn":
                    found = paths  # the MR-typed identifier, else the first repetition
                yield target, found, convert, ident
        return
    if fmt_name == "fhir":
        kind = str(doc.root.get("resourceType"))
        entity = _key(kind)
        rows = _FHIR_COMMON + (_FHIR_PATIENT if kind == "Patient" else [])
        for step, rel, ident in rows:
            path = f"{kind}.{rel}"
            if _has_value(fmt, doc, path):
                convert = "date" if step == "birth_date" else "string"
                yield f"{entity}.{step}", (path,), convert, ident
        for item in fhir_fields(doc):  # then the first other values, as inspect lists them
            if item.addressable and isinstance(item.value, str) and not _FHIR_NOISE.search(item.path):
                yield f"{entity}.{_key(item.path.split('.', 1)[1])}", (item.path,), "string", False
        return
    if fmt_name == "csv":
        columns = list(doc.data) if hasattr(doc, "data") else []
        ids = [c for c in columns if re.search(r"(^|[^a-z])(id|mrn|number|no)$|_id$", c.lower())]
        for column in [*ids, *(c for c in columns if c not in ids)]:
            if _has_value(fmt, doc, column):
                yield f"record.{_key(column)}", (column,), "string", column in ids
        return
    for item in json_fields(doc):  # other JSON: identifiers first, then the first values
        if item.addressable and isinstance(item.value, str | int | float) and not isinstance(item.value, bool):
            ident = bool(re.search(r"(^|[._])(id|mrn|identifier)$", item.path.lower()))
            yield "record." + ".".join(_key(s) for s in re.sub(r"\[\d+\]", "", item.path).split(".")), \
                (item.path,), "string", ident


def choose_entries(fmt_name: str, fmt: Any, doc: Any) -> list[Entry]:
    """The starting map: identifiers first (the first one required), then the other values, no target inside another."""
    chosen: list[Entry] = []
    seen: set[str] = set()
    used: set[str] = set()  # a path mapped once is enough
    for target, paths, convert, ident in sorted(_candidates(fmt_name, fmt, doc), key=lambda c: not c[3]):
        nested = any(target.startswith(t + ".") or t.startswith(target + ".") for t in seen)
        if target in seen or paths[0] in used or nested:
            continue
        if ident and target == "message.control_id" and chosen:
            continue  # MSH-10 only when the message has no business identifier
        seen.add(target)
        used.add(paths[0])
        chosen.append(Entry(target, paths, convert, required=ident and not any(e.required for e in chosen)))
        if len(chosen) >= MAX_FIELDS:
            break
    if not chosen:
        raise ScaffoldError("the sample's first message has no value a map could read",
                            hint="check it with `middleware inspect`")
    return chosen


# -- the files --------------------------------------------------------------------------------------


def plan(root: Path, name: str, sample: Path, *, event_type: str | None = None, queue: str | None = None) -> Plan:
    """Read the sample and decide what to write; raises :class:`ScaffoldError` (or ParseError) before any write."""
    if not NAME.match(name):
        raise ScaffoldError(f"route name {name!r}: use lower-case letters, digits, - and _ (e.g. lab-results)")
    event_type = event_type or f"{_key(name)}.received"
    if not EVENT_TYPE.match(event_type):
        raise ScaffoldError(f"--event-type {event_type!r}: use dotted lower-case words (e.g. lab.result_reported)")
    try:
        raw = sample.read_bytes()
    except OSError as exc:
        raise ScaffoldError(f"cannot read {sample}: {exc.strerror or exc}") from None
    fmt_name, options = detect(raw)
    fmt, doc = _first_document(fmt_name, options, raw)
    made = Plan(name, fmt_name, event_type, queue or name, doc.message_type if fmt_name in ("hl7v2", "fhir", "x12")
                else None, choose_entries(fmt_name, fmt, doc), sample, options)
    for path in made.files:
        if (root / path).exists():
            raise ScaffoldError(f"{path} exists: new route never overwrites",
                                hint="pick another NAME or --event-type, or remove the file")
    _check_names(root, made)
    return made


def _check_names(root: Path, made: Plan) -> None:
    """Refuse a route name or source queue another route file already uses."""
    for path in sorted((root / "routes").glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue  # validate reports it
        if not isinstance(data, dict):
            continue
        source = data["source"] if isinstance(data.get("source"), dict) else {}
        if data.get("route") == made.name:
            raise ScaffoldError(f"routes/{path.name} already defines route {made.name!r}")
        if source.get("queue") == made.queue:
            raise ScaffoldError(f"routes/{path.name} already consumes queue {made.queue!r}", hint="give --queue")


def route_yaml(made: Plan) -> str:
    """The route file's text."""
    source = {"queue": made.queue, "format": made.fmt, **made.source_options}
    lines = [f"route: {made.name}",
             f"description: scaffolded from {made.sample.name} by `middleware new route`; edit the map, then "
             "add deliveries",
             "source: {" + ", ".join(f"{k}: {json.dumps(v) if k == 'delimiter' else v}"
                                     for k, v in source.items()) + "}",
             "events:"]
    rule = "  - "
    if made.message_type:
        lines.append(f"  - when: {{message_type: {_q(made.message_type)}}}")
        rule = "    "
    lines += [f"{rule}type: {made.event_type}", "    version: 1"]
    key = next((e.target for e in made.entries if e.required), None)
    if key is not None:
        lines.append(f"    subject: {key.split('.')[0].title().replace('_', '')}/{{{key}}}")
    lines.append("    map:")
    width = max(len(e.target) for e in made.entries) + 1
    lines += [f"      {e.target + ':':<{width}} {e.yaml_value()}" for e in made.entries]
    lines += ["# deliver:                # connectors/<name>.yaml", "#   - to: case-management",
              "# yaml-language-server: $schema=../middleware/specs/route.schema.json"]
    return "\n".join(lines) + "\n"


def schema_stub(made: Plan) -> dict[str, Any]:
    """A Draft 2020-12 schema of the map's targets: strings (dates with their pattern), identifiers required."""
    root: dict[str, Any] = {"type": "object", "properties": {}}
    for entry in made.entries:
        node = root
        *parents, leaf = entry.target.split(".")
        chain = [root]
        for step in parents:
            node = node["properties"].setdefault(step, {"type": "object", "properties": {}})
            chain.append(node)
        spec: dict[str, Any] = {"type": "string", "minLength": 1, "description": f"from {' | '.join(entry.paths)}"}
        if entry.convert == "date":
            spec = {"type": "string", "pattern": _DATE, "description": spec["description"]}
        node["properties"][leaf] = spec
        if entry.required:
            for holder, step in zip(chain, [*parents, leaf], strict=True):
                if step not in holder.setdefault("required", []):
                    holder["required"].append(step)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"urn:middleware:schema:{made.event_type}:1", "title": f"{made.event_type} v1",
            "description": f"Scaffolded from {made.sample.name}: add descriptions and constraints.", **root}


def case_yaml(made: Plan, expect: dict[str, Any]) -> str:
    """The test case: the copied sample as input, what the route produces now as the expectation."""
    head = (f"# Scaffolded from {made.sample.name}: what the route produced when it was created.\n"
            f"# After changing the map: middleware test {made.name} --update (then review the diff).\n"
            f"input: ../../../{made.sample_file.as_posix()}\n")
    return head + yaml.safe_dump({"expect": expect}, sort_keys=False, allow_unicode=True, width=120)


def write(root: Path, made: Plan) -> list[Path]:
    """Write the route, schema stub, sample and test case; load the project and record the case's
    expectation from the route's output. Removes what it wrote if the project does not load."""
    written: list[Path] = []
    folders = [f for f in (made.sample_file.parent, made.schema_file.parent, made.case_file.parent)
               if not (root / f).exists()]  # removed again on failure
    try:
        for path, content in ((made.sample_file, made.sample.read_bytes()),
                              (made.schema_file, (json.dumps(schema_stub(made), indent=2) + "\n").encode()),
                              (made.route_file, route_yaml(made).encode())):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            with (root / path).open("xb") as out:  # x: never overwrite, even if one appeared meanwhile
                out.write(content)
            written.append(path)
        project, problems = check_project(root, offline=True)
        if project is None:
            raise ScaffoldError(f"the project does not load with the new route: {problems[0]}",
                                hint="run `middleware validate`; nothing was written")
        route = project.routes[made.name]
        try:
            outcome = transform_split(route, (root / made.sample_file).read_bytes(), MessageContext(),
                                      tz=project.settings.tz)
        except PipelineError as exc:
            expect: dict[str, Any] = {"error": {"stage": exc.stage, "message": " ".join(exc.message.split())[:60]}}
        else:
            expect = {"filtered": True} if outcome.filtered else {"events": [
                {k: event[k] for k in ("type", "subject", "data") if k in event} for event in outcome.events]}
        case = root / made.case_file
        case.parent.mkdir(parents=True, exist_ok=True)
        with case.open("x", encoding="utf-8") as out:
            out.write(case_yaml(made, expect))
        written.append(made.case_file)
    except BaseException:
        for path in reversed(written):
            (root / path).unlink(missing_ok=True)
        for folder in folders:
            if (root / folder).is_dir() and not any((root / folder).iterdir()):
                (root / folder).rmdir()
        raise
    return written
