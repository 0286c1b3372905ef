"""Versioned JSON Schema registry: ``schemas/<event.type>/<major>.json`` (Draft 2020-12).

Validators are compiled once at load. Validation errors name the JSON path and the rule that
failed but never the offending value, so they are safe to log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.exceptions import ValidationError as JsonSchemaError

from middleware.errors import Problem, SchemaValidationError

_MAX_REPORTED = 3


def schema_urn(event_type: str, major: int) -> str:
    """``urn:middleware:schema:<event.type>:<major>``, the CloudEvents ``dataschema``."""
    return f"urn:middleware:schema:{event_type}:{major}"


def _describe(error: JsonSchemaError) -> str:
    where = "data" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    kind = error.validator
    if kind == "required":
        # the message names the missing property only: "'mrn' is a required property"
        return f"{where}: {error.message}"
    if kind == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"{where}: unexpected properties {', '.join(extra)}"
    if kind == "type":
        return f"{where}: must be of type {error.validator_value}"
    return f"{where}: fails {kind} {json.dumps(error.validator_value)[:80]}"


@dataclass(frozen=True)
class EventSchema:
    """One compiled schema version."""

    event_type: str
    major: int
    path: Path
    validator: Draft202012Validator
    fast: Any = None  # jsonschema_rs validator: the hot-path yes/no check

    def validate(self, data: Any) -> None:
        """Raise :class:`SchemaValidationError` listing up to three violations.

        Valid data (the hot path) is checked by jsonschema-rs, about 100x faster than the pure
        Python validator; only invalid data goes through ``jsonschema``, which is the authority
        and words the error messages.
        """
        if self.fast is not None and self.fast.is_valid(data):
            return
        errors = sorted(self.validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
        if errors:
            listed = "; ".join(_describe(e) for e in errors[:_MAX_REPORTED])
            more = f" (+{len(errors) - _MAX_REPORTED} more)" if len(errors) > _MAX_REPORTED else ""
            raise SchemaValidationError(
                f"{self.event_type} v{self.major} data does not match {self.path.name}: {listed}{more}",
                hint="fix the route's map or the source message",
            )


class SchemaRegistry:
    """Every schema of a project, keyed by (event type, major version)."""

    def __init__(self, schemas: dict[tuple[str, int], EventSchema], problems: list[Problem]) -> None:
        self._schemas = schemas
        self.problems = problems

    @classmethod
    def load(cls, folder: Path, root: Path | None = None) -> SchemaRegistry:
        """Load ``folder/<type>/<major>.json``; invalid schemas become problems (paths shown relative to ``root``)."""
        schemas: dict[tuple[str, int], EventSchema] = {}
        problems: list[Problem] = []
        for path in sorted(folder.glob("*/*.json")) if folder.is_dir() else []:
            shown = str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)
            if not path.stem.isdigit():
                problems.append(Problem(shown, 1, "schema file name must be the major version, e.g. 1.json"))
                continue
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
                Draft202012Validator.check_schema(document)
            except json.JSONDecodeError as exc:
                problems.append(Problem(shown, exc.lineno, f"invalid JSON: {exc.msg}"))
                continue
            except SchemaError as exc:
                problems.append(Problem(shown, 1, f"invalid JSON Schema: {exc.message}"))
                continue
            key = (path.parent.name, int(path.stem))
            schemas[key] = EventSchema(key[0], key[1], path, Draft202012Validator(document),
                                       jsonschema_rs.validator_for(document))
        return cls(schemas, problems)

    def get(self, event_type: str, major: int) -> EventSchema | None:
        """The schema for ``event_type`` version ``major``, or None."""
        return self._schemas.get((event_type, major))

    def __len__(self) -> int:
        return len(self._schemas)

    def keys(self) -> list[tuple[str, int]]:
        """Every (event type, major) known."""
        return sorted(self._schemas)


# -- catalogue and compatibility ------------------------------------------------------------------

# Keywords that only annotate: changing them never changes which documents are valid.
_ANNOTATIONS = frozenset({
    "$schema", "$id", "$comment", "$anchor", "$dynamicAnchor", "$vocabulary", "title", "description",
    "examples", "default", "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding",
})
# Lower bounds (raising one narrows) and upper bounds (lowering one narrows); a bound at its
# neutral value (0 for the counts and lengths) constrains nothing.
_LOWER_BOUNDS = ("minLength", "minItems", "minProperties", "minimum", "exclusiveMinimum", "minContains")
_UPPER_BOUNDS = ("maxLength", "maxItems", "maxProperties", "maximum", "exclusiveMaximum", "maxContains")
_NEUTRAL = {"minLength": 0, "minItems": 0, "minProperties": 0, "minContains": 1}
# Constraints that narrow when added or changed, and only loosen when removed.
_REMOVABLE = ("pattern", "const", "format", "uniqueItems", "multipleOf")
_HANDLED = frozenset({"type", "properties", "required", "enum", "items", "additionalProperties",
                      *_LOWER_BOUNDS, *_UPPER_BOUNDS, *_REMOVABLE})


def _canonical(value: Any) -> str:
    """A hashable, type-exact form of a JSON value (``1``, ``1.0`` and ``true`` stay distinct)."""
    return json.dumps(value, sort_keys=True)


def _types(schema: dict[str, Any]) -> list[str] | None:
    value = schema.get("type")
    if value is None:
        return None
    return sorted({value} if isinstance(value, str) else {str(t) for t in value})


def _shown_types(types: list[str] | None) -> str:
    if types is None:
        return "any"
    return types[0] if len(types) == 1 else "[" + ", ".join(types) + "]"


def compatibility_problems(old: Any, new: Any, path: str = "data") -> list[str]:
    """Every way ``new`` breaks producers' and consumers' reliance on ``old`` (same major version).

    A schema may change within a major version only if every document ``old`` accepted is still
    accepted *and* consumers still find what ``old`` promised: no property removed, the set of
    required properties unchanged, no type changed, no enum value removed, no constraint added or
    tightened (loosening a bound, new optional properties, new enum values and annotation changes
    such as ``title`` or ``description`` are fine). Keywords the checker does not reason about
    (``allOf``, ``$ref``...) must stay exactly as they were. Nested ``properties``,
    ``items`` and ``additionalProperties`` are compared recursively.

    Returns ``"<data path>: <what changed>"`` lines, e.g. ``"data.patient: 'phone' became required"``;
    paths follow validation errors: ``data.patient.mrn``, ``data.observations[].code``.
    """
    problems: list[str] = []
    _compare(old, new, path, problems)
    return problems


def _compare(old: Any, new: Any, path: str, problems: list[str]) -> None:
    if old is False:
        return  # nothing was accepted: anything is a loosening
    if new is False:
        problems.append(f"{path}: no longer accepts any value")
        return
    old = old if isinstance(old, dict) else {}
    new = new if isinstance(new, dict) else {}

    old_types, new_types = _types(old), _types(new)
    if old_types != new_types:
        problems.append(f"{path}: type changed from {_shown_types(old_types)} to {_shown_types(new_types)}")

    if "enum" in new:
        if "enum" not in old:
            problems.append(f"{path}: enum added (only the listed values are accepted now)")
        else:
            kept = {_canonical(v) for v in new["enum"]}
            removed = [v for v in old["enum"] if _canonical(v) not in kept]
            if removed:
                problems.append(f"{path}: enum values removed: {', '.join(json.dumps(v) for v in removed)}")

    for keyword in _REMOVABLE:
        if keyword in new and keyword not in old:
            problems.append(f"{path}: {keyword} added")
        elif keyword in new and _canonical(old[keyword]) != _canonical(new[keyword]):
            problems.append(f"{path}: {keyword} changed from {json.dumps(old[keyword])} to {json.dumps(new[keyword])}")

    for keyword in _LOWER_BOUNDS:
        _compare_bound(old, new, keyword, path, problems, lower=True)
    for keyword in _UPPER_BOUNDS:
        _compare_bound(old, new, keyword, path, problems, lower=False)

    old_required, new_required = set(old.get("required", [])), set(new.get("required", []))
    for name in sorted(new_required - old_required):
        problems.append(f"{path}: {name!r} became required")
    for name in sorted(old_required - new_required):
        problems.append(f"{path}: {name!r} is no longer required")

    old_properties, new_properties = old.get("properties", {}), new.get("properties", {})
    for name, old_property in old_properties.items():
        if name not in new_properties:
            problems.append(f"{path}.{name}: property removed")
        else:
            _compare(old_property, new_properties[name], f"{path}.{name}", problems)

    if "additionalProperties" in old or "additionalProperties" in new:
        _compare(old.get("additionalProperties", True), new.get("additionalProperties", True), f"{path}.*",
                 problems)
    if "items" in old or "items" in new:
        _compare(old.get("items", True), new.get("items", True), f"{path}[]", problems)

    for keyword in sorted((set(old) | set(new)) - _HANDLED - _ANNOTATIONS):
        if keyword not in new:
            problems.append(f"{path}: {keyword} removed (not checked: keep it unchanged)")
        elif keyword not in old:
            problems.append(f"{path}: {keyword} added (not checked: keep it unchanged)")
        elif _canonical(old[keyword]) != _canonical(new[keyword]):
            problems.append(f"{path}: {keyword} changed (not checked: keep it unchanged)")


def _compare_bound(old: dict[str, Any], new: dict[str, Any], keyword: str, path: str, problems: list[str], *,
                   lower: bool) -> None:
    if keyword not in new:
        return  # removed or never there: no narrowing
    value = new[keyword]
    if keyword not in old:
        if value != _NEUTRAL.get(keyword):
            problems.append(f"{path}: {keyword} added ({json.dumps(value)})")
        return
    before = old[keyword]
    if not isinstance(value, int | float) or not isinstance(before, int | float):
        if _canonical(value) != _canonical(before):
            problems.append(f"{path}: {keyword} changed from {json.dumps(before)} to {json.dumps(value)}")
    elif lower and value > before:
        problems.append(f"{path}: {keyword} raised from {json.dumps(before)} to {json.dumps(value)}")
    elif not lower and value < before:
        problems.append(f"{path}: {keyword} lowered from {json.dumps(before)} to {json.dumps(value)}")


def required_paths(schema: Any, prefix: str = "") -> list[str]:
    """Dotted paths every valid document has, e.g. ``patient.mrn``, ``observations[].code``.

    A required object or array whose items require fields lists those fields instead of itself;
    fields required only inside an optional parent are left out.
    """
    paths: list[str] = []
    if not isinstance(schema, dict):
        return paths
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        path = f"{prefix}{name}"
        child = properties.get(name, {})
        inner = _inner_required(child, path)
        paths.extend(inner or [path])
    return paths


def _inner_required(schema: Any, path: str) -> list[str]:
    if not isinstance(schema, dict):
        return []
    if schema.get("required"):
        return required_paths(schema, f"{path}.")
    items = schema.get("items")
    if isinstance(items, dict):
        return _inner_required(items, f"{path}[]")
    return []
