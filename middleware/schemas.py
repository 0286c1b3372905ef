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
