"""JSON Schemas for editors (``middleware schema-of route|connector|config|fragment|lookup``).

Generated from what ``middleware validate`` checks: :mod:`middleware.project_schema` with the specs
of every registered format, connector type and ingest gateway (:mod:`middleware.spec`), plus the
keys of the map language (:mod:`middleware.mapping`) and fragments, which the loader checks in code.
Draft-07, the dialect YAML language servers read. Connector and config files may hold ``${VAR}``
anywhere a scalar goes, so their scalars also accept such a string. A copy of each schema ships in
``middleware/specs/`` for the ``# yaml-language-server: $schema=...`` lines of the shipped YAML
(``python -m middleware.editor_schema --write`` refreshes them; a test says when they are stale).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from middleware import fragments, project_schema
from middleware.mapping import CONDITION_KEYS, CONVERSIONS
from middleware.spec import components

KINDS = ("route", "connector", "config", "fragment", "lookup")
SPECS = Path(__file__).resolve().parent / "specs"
DRAFT = "http://json-schema.org/draft-07/schema#"
_ENV = {"type": "string", "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}",
        "description": "${VAR} or ${VAR:-default}: taken from the environment"}
_PATHS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

FIELD: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "one field: path, value, template, expr or each (docs/routes.md, Field rules)",
    "properties": {
        "path": {**_PATHS, "description": "a source path, or a list: the first with a value wins"},
        "value": {"description": "a constant"},
        "template": {"type": "string", "description": "text with {PATH} placeholders"},
        "expr": {"type": "string", "description": "a CEL expression, e.g. upper(path('PID-5.1'))"},
        "as": {"enum": list(CONVERSIONS), "description": "convert the value"},
        "lookup": {"type": "string", "description": "a table in config/lookups/"},
        "default": {"description": "used when the source is empty"},
        "required": {"type": "boolean", "description": "an empty source is a mapping error"},
        "each": {"type": "string", "description": "one object per repeating element, e.g. OBX"},
        "map": {"$ref": "#/definitions/map"},
        "typed_by": {"type": "string", "description": "the field naming the value's HL7 data type, e.g. OBX-2"},
    },
}
MAP: dict[str, Any] = {
    "type": "object",
    "description": "target.path: source (docs/routes.md, Field rules)",
    "properties": {fragments.INCLUDE: fragments.NAMES},
    "additionalProperties": {"anyOf": [{"type": "string"}, {"$ref": "#/definitions/field"}]},
}
CONDITION: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "description": "every key given must hold (docs/routes.md, Conditions)",
    "properties": {
        "message_type": {**_PATHS, "description": "e.g. ADT^A01 or a list"},
        "equals": {"type": "object", "description": "path: value or list of values"},
        "exists": {**_PATHS, "description": "paths that must have a value"},
        "missing": {**_PATHS, "description": "paths that must have none"},
        "expr": {"type": "string", "description": "a CEL expression giving true or false"},
    },
}
assert set(CONDITION["properties"]) == CONDITION_KEYS, "editor schema out of step with mapping.CONDITION_KEYS"


def _route() -> dict[str, Any]:
    schema = project_schema.route_schema({n: c.spec for n, c in components("format").items()})
    schema = copy.deepcopy(schema)
    properties = schema["properties"]
    properties["filter"] = CONDITION
    event = properties["events"]["items"]["properties"]
    event["when"], event["map"] = CONDITION, {"$ref": "#/definitions/map"}
    item = properties["deliver"]["items"]
    if "map" in item.get("properties", {}):
        item["properties"]["map"] = {"$ref": "#/definitions/map"}
    properties["deliver"]["items"] = {"anyOf": [item, {
        "type": "object", "additionalProperties": False, "required": [fragments.INCLUDE],
        "properties": {fragments.INCLUDE: fragments.NAMES}}]}
    return {**schema, "definitions": {"map": MAP, "field": FIELD}}


def _fragment() -> dict[str, Any]:
    schema = copy.deepcopy(fragments.SCHEMA)
    schema["properties"]["map"] = {"$ref": "#/definitions/map"}
    deliver = _route()["properties"]["deliver"]["items"]["anyOf"][0]
    schema["properties"]["deliver"]["items"] = deliver
    return {**schema, "definitions": {"map": MAP, "field": FIELD}}


def _with_env(node: Any) -> Any:
    """``node`` with every scalar schema also accepting a ``${VAR}`` string (connectors and config)."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "definitions") and isinstance(value, dict):
            out[key] = {name: _with_env(item) for name, item in value.items()}
        elif key in ("items", "additionalProperties", "then", "else"):
            out[key] = _with_env(value)
        elif key in ("allOf", "anyOf", "oneOf") and isinstance(value, list):
            out[key] = [_with_env(item) for item in value]
        else:
            out[key] = value  # "if" stays strict: it picks the branch by a key's literal value
    kind = node.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind}
    strict_string = kinds == {"string"} and ({"pattern", "format", "enum", "const"} & set(node))
    other_scalar = bool(kinds & {"integer", "number", "boolean"}) and not kinds & {"object", "array"}
    untyped_choice = kind is None and ("enum" in node or "const" in node)
    return {"anyOf": [out, _ENV]} if strict_string or other_scalar or untyped_choice else out


_BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "route": _route,
    "fragment": _fragment,
    "connector": lambda: _with_env(project_schema.connector_schema(
        {n: c.spec for n, c in components("connector").items()})),
    "config": lambda: _with_env(project_schema.config_schema(
        {n: c.spec for n, c in components("ingest").items()})),
    "lookup": lambda: copy.deepcopy(project_schema.LOOKUP),
}
_TITLES = {"route": "routes/<name>.yaml", "fragment": "routes/_fragments/<name>.yaml",
           "connector": "connectors/<name>.yaml", "config": "config/middleware.yaml",
           "lookup": "config/lookups/<name>.yaml"}


def schema_of(kind: str) -> dict[str, Any]:
    """The editor schema of one kind of file; raises ``KeyError`` for an unknown kind."""
    body = _BUILDERS[kind]()
    return {"$schema": DRAFT, "title": f"middleware {_TITLES[kind]}", **body}


def render(kind: str) -> str:
    """The schema as the shipped file holds it (stable key order, trailing newline)."""
    return json.dumps(schema_of(kind), indent=2, ensure_ascii=False) + "\n"


def shipped(kind: str) -> Path:
    """Where the package ships ``kind``'s schema."""
    return SPECS / f"{kind}.schema.json"


def main(argv: list[str] | None = None) -> int:
    """``python -m middleware.editor_schema --write``: regenerate middleware/specs/*.schema.json."""
    parser = argparse.ArgumentParser(prog="python -m middleware.editor_schema", description=main.__doc__)
    parser.add_argument("--write", action="store_true", help="write every kind's schema into middleware/specs/")
    parser.add_argument("kind", nargs="?", choices=KINDS)
    args = parser.parse_args(argv)
    if args.write:
        SPECS.mkdir(exist_ok=True)
        for kind in KINDS:
            shipped(kind).write_text(render(kind), encoding="utf-8")
            print(f"wrote {shipped(kind)}")
        return 0
    sys.stdout.write(render(args.kind or "route"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
