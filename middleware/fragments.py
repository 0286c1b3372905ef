"""Route fragments: a map or a set of deliveries written once in ``routes/_fragments/<name>.yaml`` and
included by name, instead of YAML aliases (which cannot cross files).

```yaml
# routes/_fragments/patient-demographics.yaml
description: PID demographics shared by the ADT routes
map:
  patient.mrn: {path: PID-3.1, required: true}
  patient.name.family: PID-5.1
```

A route's ``map:`` (of an event or a deliver entry) takes ``include: NAME`` (or a list of names) beside
its own keys, which win over the fragment's; ``deliver:`` takes ``- include: NAME`` items, replaced by
the fragment's entries. Expansion happens on the parsed route before it is checked, so every problem
is reported at the including line, with the fragment's ``file:line`` added (``YamlDoc.origins``).
Fragments are not routes: the loader reads ``routes/*.yaml`` only.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from middleware.errors import Problem
from middleware.yamlfile import PathKey, YamlDoc, load_yaml

FOLDER = Path("routes") / "_fragments"
INCLUDE = "include"
NAMES: dict[str, Any] = {"oneOf": [{"type": "string", "minLength": 1},
                                   {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}],
                         "description": "fragment name(s): routes/_fragments/<name>.yaml"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "description": {"type": "string"},
        "map": {"type": "object", "minProperties": 1, "additionalProperties": {"type": ["string", "object"]},
                "description": "map entries (target: source), included with map: {include: NAME}"},
        "deliver": {"type": "array", "minItems": 1, "items": {"type": "object"},
                    "description": "deliver entries, included with deliver: [{include: NAME}]"},
    },
    "oneOf": [{"required": ["map"]}, {"required": ["deliver"]}],
}
"""A fragment file: a description and exactly one of ``map`` or ``deliver``."""


@dataclass(frozen=True)
class Fragment:
    """One fragment file: ``kind`` is ``map`` or ``deliver``; ``body`` its value; ``lines`` of its keys."""

    name: str
    file: str
    kind: str
    body: Any
    lines: dict[PathKey, int] = field(default_factory=dict)

    def origin(self, *path: str | int) -> str:
        """``file:line`` of a key or item inside the body."""
        key: PathKey = (self.kind, *path)
        return f"{self.file}:{self.lines.get(key, self.lines.get((self.kind,), 1))}"


@dataclass
class Fragments:
    """Every fragment of a project by name; :meth:`expand` applies them to a parsed route."""

    found: dict[str, Fragment] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @classmethod
    def load(cls, root: Path, display: Callable[[Path], str]) -> Fragments:
        """Read ``root/routes/_fragments/*.yaml`` (problems in a fragment are reported in its own file)."""
        loaded = cls()
        for path in sorted((root / FOLDER).glob("*.yaml")):
            doc = load_yaml(path, display(path))
            if doc.data is None and not doc.problems:
                doc.problem((), "file is empty")
            if not doc.problems:
                for error in Draft202012Validator(SCHEMA).iter_errors(doc.data):
                    where = ".".join(str(p) for p in error.absolute_path)
                    message = ("a fragment holds exactly one of map: or deliver:" if error.validator == "oneOf"
                               and not error.absolute_path else f"{where or 'fragment'}: {error.message}")
                    doc.problem(tuple(error.absolute_path), message)
            if not doc.problems:
                kind = "map" if "map" in doc.data else "deliver"
                for key in ([k for k, v in doc.data["map"].items() if k == INCLUDE] if kind == "map"
                            else [i for i, v in enumerate(doc.data["deliver"]) if INCLUDE in v]):
                    doc.problem((kind, key), "a fragment cannot include another fragment")
                if not doc.problems:
                    loaded.found[path.stem] = Fragment(path.stem, doc.file, kind, doc.data[kind], doc.lines)
            loaded.problems += doc.problems
        return loaded

    def expand(self, doc: YamlDoc) -> None:
        """Replace the includes of a parsed route in place; problems are recorded on ``doc``."""
        data = doc.data
        if not isinstance(data, dict):
            return
        for index, event in enumerate(data.get("events") or []):
            if isinstance(event, dict) and isinstance(event.get("map"), dict):
                event["map"] = self._map(doc, ("events", index, "map"), event["map"])
        deliver = data.get("deliver")
        if isinstance(deliver, list):
            data["deliver"] = self._deliver(doc, deliver)
            for index, entry in enumerate(data["deliver"]):
                if isinstance(entry, dict) and isinstance(entry.get("map"), dict):
                    entry["map"] = self._map(doc, ("deliver", index, "map"), entry["map"])

    def _named(self, doc: YamlDoc, at: PathKey, names: Any, kind: str) -> list[Fragment]:
        items = names if isinstance(names, list) else [names]
        if not items or not all(isinstance(n, str) and n for n in items):
            doc.problem(at, "include takes a fragment name or a list of them (routes/_fragments/<name>.yaml)")
            return []
        chosen = []
        for name in items:
            fragment = self.found.get(name)
            if fragment is None:
                close = difflib.get_close_matches(name, list(self.found), n=1)
                doc.problem(at, f"no fragment {name!r} in {FOLDER}/" + (f" (did you mean {close[0]!r}?)" if close
                                                                         else ""))
            elif fragment.kind != kind:
                doc.problem(at, f"fragment {name!r} ({fragment.file}) holds {fragment.kind}:, not {kind}:")
            else:
                chosen.append(fragment)
        return chosen

    def _map(self, doc: YamlDoc, at: PathKey, spec: dict[str, Any]) -> dict[str, Any]:
        if INCLUDE not in spec:
            return spec
        line = doc.line((*at, INCLUDE))
        merged: dict[str, Any] = {}
        for fragment in self._named(doc, (*at, INCLUDE), spec[INCLUDE], "map"):
            for target, source in fragment.body.items():
                if target in spec:
                    continue  # the route's own key wins over the fragment's
                key: PathKey = (*at, target)
                if target in merged:
                    doc.problem((*at, INCLUDE), f"target {target!r} is in two included fragments "
                                                f"({doc.origins[key]} and {fragment.origin(target)})")
                merged[target] = _copy(source)
                _point(doc, key, line, fragment.origin(target))
        merged.update((target, source) for target, source in spec.items() if target != INCLUDE)
        return merged

    def _deliver(self, doc: YamlDoc, entries: list[Any]) -> list[Any]:
        if not any(isinstance(e, dict) and INCLUDE in e for e in entries):
            return entries
        old_lines = {k: v for k, v in doc.lines.items() if k[:1] == ("deliver",) and len(k) > 1}
        for key in old_lines:
            del doc.lines[key]
        expanded: list[Any] = []
        for index, entry in enumerate(entries):
            if isinstance(entry, dict) and INCLUDE in entry:
                line = old_lines.get(("deliver", index), doc.line(("deliver",)))
                if len(entry) > 1:
                    doc.lines[("deliver", len(expanded))] = line
                    doc.problem(("deliver", len(expanded)), "an include: item of deliver takes no other keys")
                doc.lines[("deliver", len(expanded))] = line  # where problems in it are reported
                holder = YamlDoc(doc.file, None, {("x",): line})
                for fragment in self._named(holder, ("x",), entry[INCLUDE], "deliver"):
                    for number, item in enumerate(fragment.body):
                        _point(doc, ("deliver", len(expanded)), line, fragment.origin(number))
                        expanded.append(_copy(item))
                doc.problems += holder.problems
                continue
            for key, value in old_lines.items():
                if key[1] == index:
                    doc.lines[("deliver", len(expanded), *key[2:])] = value
            expanded.append(entry)
        return expanded


def _point(doc: YamlDoc, key: PathKey, line: int, origin: str) -> None:
    """Report ``key`` (and everything under it) at the including ``line``, from ``origin``."""
    for existing in [k for k in doc.lines if k[:len(key)] == key]:
        del doc.lines[existing]
    doc.lines[key] = line
    doc.origins[key] = origin


def _copy(value: Any) -> Any:
    """A deep copy of YAML data (an included body is compiled once per including route)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
