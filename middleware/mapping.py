"""The YAML mapping language: conditions (``filter``/``when``) and field rules (``map``).

A field rule maps one target path in the event data (``patient.mrn``) from a source:

- a string: a source expression of the route's format (``PID-3.1``);
- ``{path: EXPR}`` or ``{path: [EXPR, EXPR]}`` (the first that yields a value wins);
- ``{value: CONSTANT}``; ``{template: "{PID-5.2} {PID-5.1}"}``;
- ``{expr: "upper(path('PID-5.1'))"}``: a CEL expression (:mod:`middleware.expressions`);

with options ``as`` (string, date, datetime, int, decimal, bool), ``lookup`` (a table in
config/lookups/), ``default`` and ``required``. An expression that selects repetitions
(``OBX[*]-5``) yields a list. ``{each: OBX, map: {code: OBX-3.1, ...}}`` yields a list of objects,
one per OBX (its expressions read that OBX and the segments that follow it up to the next OBX).
Rules are compiled once; :func:`apply_rules` runs per message.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from middleware import dates
from middleware.errors import MappingError, PipelineError
from middleware.expressions import EvaluationError, Expression, ExpressionError, compile_expression
from middleware.formats import Format, PathAccessor

FIELD_KEYS = frozenset({"path", "value", "template", "as", "lookup", "default", "required", "each", "map",
                        "typed_by", "expr"})
CONDITION_KEYS = frozenset({"message_type", "equals", "exists", "missing", "expr"})
_TEMPLATE_PART = re.compile(r"\{([^{}]+)\}")


class SpecError(ValueError):
    """A mapping or condition in YAML is invalid; ``key`` names the offending key when known."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class LookupTable:
    """A code table from config/lookups/<name>.yaml: ``values`` plus an optional ``default``."""

    name: str
    values: Mapping[str, Any]
    default: Any = None

    def translate(self, code: Any) -> Any:
        """The value for ``code``; raises ``KeyError`` when absent and there is no default."""
        key = str(code)
        if key in self.values:
            return self.values[key]
        if self.default is not None:
            return self.default
        raise KeyError(key)


# -- conversions ------------------------------------------------------------------------------


def _to_decimal(value: Any) -> int | float:
    number = Decimal(str(value).strip())
    if not number.is_finite():
        raise ValueError("not a finite number")
    return int(number) if number == number.to_integral_value() and "." not in str(value) else float(number)


def _to_int(value: Any) -> int:
    text = str(value).strip()
    if not text.lstrip("+-").isdecimal():
        raise ValueError("not a whole number")  # never the value itself: it may be PHI
    return int(text)


_BOOLS = {"y": True, "yes": True, "true": True, "t": True, "1": True,
          "n": False, "no": False, "false": False, "f": False, "0": False}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return _BOOLS[str(value).strip().lower()]


CONVERSIONS: dict[str, Callable[[Any], Any]] = {
    "string": str,
    "date": dates.to_date,  # HL7 DT/DTM/TS or ISO 8601 (FHIR), strict, precision kept (see middleware.dates)
    "datetime": dates.to_datetime,  # likewise; naive times get the engine's time zone in _finish
    "int": _to_int,
    "decimal": _to_decimal,
    "bool": _to_bool,
}


# -- conditions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """All of: message type in ``message_types``; each ``equals`` path has one of its values;
    each ``exists`` path has a value; each ``missing`` path has none; ``expr`` gives true."""

    message_types: frozenset[str] | None
    equals: tuple[tuple[PathAccessor, frozenset[str]], ...]
    exists: tuple[PathAccessor, ...]
    missing: tuple[PathAccessor, ...]
    expression: Expression | None = None
    error: type[PipelineError] = MappingError  # what a failing expression raises (FilterError for filter:)

    def matches(self, doc: Any) -> bool:
        types = self.message_types
        if types is not None:
            kind = doc.message_type
            if kind not in types and (kind is None or "^" in kind  # a bare v2.1 ``ORU`` matches ``ORU^R01``:
                                      or getattr(doc, "implied_message_type", None) not in types):  # see Hl7Message
                return False
        for accessor, allowed in self.equals:
            if not any(str(v) in allowed for v in accessor.read(doc)):
                return False
        if not all(accessor.read(doc) for accessor in self.exists) or any(
                accessor.read(doc) for accessor in self.missing):
            return False
        if self.expression is None:
            return True
        try:
            return self.expression.test(doc)
        except EvaluationError as exc:
            raise self.error(f"condition expr {self.expression.source!r} failed: {exc}",
                             hint="fix the expression, or guard it (path('...') != null && ...)") from None

    def lacks_trigger(self, doc: Any) -> bool:
        """The message type is a bare code whose trigger cannot be inferred (a v2.1 ``ADT`` without EVN-1)
        while this condition names types of that code (``ADT^A01``): not a match, yet no clean mismatch."""
        kind = doc.message_type
        if self.message_types is None or not kind or "^" in kind or kind in self.message_types:
            return False
        return getattr(doc, "implied_message_type", None) is None and any(
            t.startswith(f"{kind}^") for t in self.message_types)


def _strings(spec: Any, key: str) -> list[str]:
    items = spec if isinstance(spec, list) else [spec]
    if not items or not all(isinstance(i, str | int | float) and not isinstance(i, bool) for i in items):
        raise SpecError(f"{key} takes a string or a list of strings", key)
    return [str(i) for i in items]


def _compile_expr(fmt: Format, expr: Any, key: str) -> PathAccessor:
    if not isinstance(expr, str):
        raise SpecError(f"source expression must be a string, got {type(expr).__name__}", key)
    try:
        return fmt.compile_path(expr)
    except ValueError as exc:
        raise SpecError(str(exc), key) from None


def compile_condition(spec: Any, fmt: Format, lookups: Mapping[str, LookupTable] | None = None,
                      error: type[PipelineError] = MappingError) -> Condition:
    """Compile a ``filter``/``when`` mapping; raises :class:`SpecError`. ``error``: what a failing
    ``expr`` raises on a message (the stage it dead-letters at)."""
    if not isinstance(spec, dict) or not spec:
        raise SpecError("a condition is a mapping with message_type, equals, exists or missing")
    for key in spec:
        if key not in CONDITION_KEYS:
            raise SpecError(f"unknown condition {key!r} (use {', '.join(sorted(CONDITION_KEYS))})", key)
    types = frozenset(_strings(spec["message_type"], "message_type")) if "message_type" in spec else None
    equals_spec = spec.get("equals", {})
    if not isinstance(equals_spec, dict):
        raise SpecError("equals maps a source expression to a value or list of values", "equals")
    equals = tuple(
        (_compile_expr(fmt, expr, "equals"), frozenset(_strings(values, "equals")))
        for expr, values in equals_spec.items()
    )
    exists, missing = (
        tuple(_compile_expr(fmt, e, key) for e in _strings(spec[key], key)) if key in spec else ()
        for key in ("exists", "missing")
    )
    expression = None
    if "expr" in spec:
        try:
            expression = compile_expression(spec["expr"], fmt, lookups)
        except ExpressionError as exc:
            raise SpecError(f"expr {spec['expr']!r}: {exc}", "expr") from None
    return Condition(types, equals, exists, missing, expression, error)


# -- field rules ------------------------------------------------------------------------------


_UNSET: Any = object()
_NEEDED_PRECISION = {"date": dates.Precision.DAY, "datetime": dates.Precision.DATETIME}


@dataclass(frozen=True)
class Template:
    """``"{PID-5.2} {PID-5.1}"``: each ``{expr}`` replaced by its first value ("" if absent)."""

    text: str
    parts: tuple[tuple[str, PathAccessor], ...]

    def render(self, doc: Any) -> str | None:
        values = {expr: (acc.read(doc) or [""])[0] for expr, acc in self.parts}
        out = _TEMPLATE_PART.sub(lambda m: str(values[m.group(1)]), self.text).strip()
        return out or None


@dataclass(frozen=True)
class FieldRule:
    """One compiled ``target: source`` entry of a ``map``."""

    target: str
    source: str  # the expression as written, for error messages
    paths: tuple[PathAccessor, ...] = ()
    constant: Any = _UNSET
    template: Template | None = None
    convert: str = "string"
    lookup: LookupTable | None = None
    default: Any = _UNSET
    required: bool = False
    each: tuple[Format, str] | None = None  # (format, scope expression) for ``each:`` rules
    children: tuple[FieldRule, ...] = ()
    typed: bool = False  # ``typed_by``: the accessor returns JSON values typed by the source's data type
    expression: Expression | None = None  # ``expr:``

    def __post_init__(self) -> None:
        # a plain ``target: PATH`` (string, no lookup, no each/template/value): evaluate's fast path
        object.__setattr__(self, "_plain", self.each is None and self.template is None and not self.typed
                           and self.expression is None
                           and self.constant is _UNSET and self.convert == "string" and self.lookup is None)

    def evaluate(self, doc: Any, tz: dt.tzinfo | None = None) -> Any:
        """The target's value for ``doc`` (``_UNSET`` when there is none); raises MappingError.
        ``tz`` is the engine's time zone, given to naive date-times (``as: datetime``)."""
        when = None  # the value already parsed as a date (by _most_precise), not parsed again by _finish
        if self.__dict__["_plain"]:  # the first single value that is a string is the answer as it is
            raw = _UNSET
            for accessor in self.paths:
                values = accessor.read(doc)
                if values:
                    raw = values if accessor.multiple else values[0]
                    if isinstance(raw, str):
                        return raw
                    break
        elif self.each is not None:
            return self._evaluate_each(doc, tz)
        elif self.convert in _NEEDED_PRECISION and len(self.paths) > 1:
            raw, when = self._most_precise(doc)
        else:
            raw = self._raw(doc)
        if raw is _UNSET:
            if self.default is not _UNSET:
                return self.default
            if self.required:
                raise MappingError(f"{self.target}: required value missing ({self.source} is empty)",
                                   hint="fix the source message or make the field optional")
            return _UNSET
        if self.typed:
            return raw
        if self.convert == "string" and self.lookup is None and isinstance(raw, str) and self.constant is _UNSET:
            return raw  # HL7 values and templates are strings already: nothing to convert
        if isinstance(raw, list):
            return [self._finish(item, tz) for item in raw]
        if when is not None and self.constant is _UNSET and self.lookup is None:
            return when.in_zone(tz).iso() if self.convert == "datetime" else when.truncate(dates.Precision.DAY).iso()
        return self._finish(raw, tz)

    @property
    def is_constant(self) -> bool:
        """A ``value:`` rule (its value is known before any message)."""
        return self.constant is not _UNSET

    @property
    def target_parts(self) -> tuple[tuple[str, ...], str]:
        """(parent keys, leaf key) of the dotted target, split once."""
        cached: tuple[tuple[str, ...], str] | None = self.__dict__.get("_target_parts")
        if cached is None:
            *parents, leaf = self.target.split(".")
            cached = (tuple(parents), leaf)
            object.__setattr__(self, "_target_parts", cached)
        return cached

    def _evaluate_each(self, doc: Any, tz: dt.tzinfo | None) -> Any:
        assert self.each is not None
        fmt, scope = self.each
        items = []
        for index, item in enumerate(fmt.each(doc, scope), start=1):
            try:
                data = apply_rules(self.children, item, tz=tz)
            except MappingError as exc:
                exc.message = f"{self.target}[{index}].{exc.message}"  # which item of the list failed
                raise
            if data:
                items.append(data)
        if items:
            return items
        if self.required:
            raise MappingError(f"{self.target}: required value missing (no {scope} with values)",
                               hint="fix the source message or make the field optional")
        return _UNSET

    def _raw(self, doc: Any) -> Any:
        if self.constant is not _UNSET:
            return self.constant
        if self.template is not None:
            rendered = self.template.render(doc)
            return _UNSET if rendered is None else rendered
        if self.expression is not None:
            try:
                value = self.expression.evaluate(doc)
            except EvaluationError as exc:
                raise MappingError(f"{self.target}: expr {self.source!r} failed: {exc}",
                                   hint="fix the expression or guard it, e.g. coalesce(path('...'), '')") from None
            return _UNSET if value is None else value
        for accessor in self.paths:
            values = accessor.read(doc)
            if values:
                return values if accessor.multiple else values[0]
        return _UNSET

    def _most_precise(self, doc: Any) -> tuple[Any, dates.When | None]:
        """``{path: [A, B], as: datetime}``: the first value precise enough for the target (a time of day
        for ``datetime``, a day for ``date``), else the first value at its own precision. A year-only
        PV1-44 so gives way to a full EVN-6; a value that is not a date at all is an error, never skipped.
        Gives the value and, for a single value, its parsed date."""
        needed = _NEEDED_PRECISION[self.convert]
        first: Any = _UNSET
        first_when: dates.When | None = None
        for accessor in self.paths:
            values = accessor.read(doc)
            if not values:
                continue
            if accessor.multiple:
                return (values, None) if first is _UNSET else (first, first_when)
            try:
                when = dates.parse(values[0])
            except dates.DateFormatError as exc:
                raise MappingError(f"{self.target}: {accessor.expr} is not a valid {self.convert}: {exc}",
                                   hint="fix the source value or change `as:`") from None
            if when.precision >= needed:
                return values[0], when
            if first is _UNSET:
                first, first_when = values[0], when
        return first, first_when

    def _finish(self, value: Any, tz: dt.tzinfo | None = None) -> Any:
        try:
            if self.constant is not _UNSET:
                converted = value
            elif self.convert == "datetime":
                converted = dates.to_datetime(value, tz)
            else:
                converted = CONVERSIONS[self.convert](value)
        except (ValueError, KeyError, InvalidOperation, ArithmeticError) as exc:
            detail = f": {exc}" if isinstance(exc, ValueError) and str(exc) else ""
            raise MappingError(f"{self.target}: {self.source} is not a valid {self.convert}{detail}",
                               hint="fix the source value or change `as:`") from None
        if self.lookup is None:
            return converted
        try:
            return self.lookup.translate(converted)
        except KeyError:
            raise MappingError(
                f"{self.target}: code from {self.source} is not in lookup table {self.lookup.name!r}",
                hint=f"add the code to config/lookups/{self.lookup.name}.yaml or give the table a default",
            ) from None


def compile_field(target: str, spec: Any, fmt: Format, lookups: Mapping[str, LookupTable]) -> FieldRule:
    """Compile one ``map`` entry; raises :class:`SpecError` saying what is wrong."""
    if isinstance(spec, str):
        return FieldRule(target, spec, paths=(_compile_expr(fmt, spec, "path"),))
    if not isinstance(spec, dict):
        raise SpecError(f"{target}: expected a source expression or a mapping with path/value/template")
    for key in spec:
        if key not in FIELD_KEYS:
            raise SpecError(f"{target}: unknown key {key!r} (use {', '.join(sorted(FIELD_KEYS))})", key)
    if "each" in spec or "map" in spec:
        return _compile_each(target, spec, fmt, lookups)
    if "typed_by" in spec:
        return _compile_typed(target, spec, fmt)
    sources = [k for k in ("path", "value", "template", "expr") if k in spec]
    if len(sources) != 1:
        raise SpecError(f"{target}: give exactly one of path, value, template, expr, each")
    convert = spec.get("as", "string")
    if convert not in CONVERSIONS:
        raise SpecError(f"{target}: unknown type {convert!r} for as: (use {', '.join(CONVERSIONS)})", "as")
    lookup = None
    if "lookup" in spec:
        if spec["lookup"] not in lookups:
            known = ", ".join(sorted(lookups)) or "none"
            raise SpecError(f"{target}: no lookup table {spec['lookup']!r} in config/lookups/ (known: {known})",
                            "lookup")
        lookup = lookups[spec["lookup"]]
    common: dict[str, Any] = {"convert": convert, "lookup": lookup,
                              "default": spec.get("default", _UNSET), "required": bool(spec.get("required"))}
    if "value" in spec:
        return FieldRule(target, repr(spec["value"]), constant=spec["value"], **common)
    if "expr" in spec:
        try:
            expression = compile_expression(spec["expr"], fmt, lookups)
        except ExpressionError as exc:
            raise SpecError(f"{target}: expr {spec['expr']!r}: {exc}", "expr") from None
        # without as: / lookup: the value stays as the expression typed it (a number, a list, a boolean)
        return FieldRule(target, spec["expr"], expression=expression,
                         typed="as" not in spec and lookup is None, **common)
    if "template" in spec:
        text = spec["template"]
        if not isinstance(text, str):
            raise SpecError(f"{target}: template must be a string", "template")
        if _TEMPLATE_PART.sub("", text).count("{") or _TEMPLATE_PART.sub("", text).count("}"):
            raise SpecError(f"{target}: template {text!r} has unbalanced braces: each {{expression}} needs its "
                            "own { and } (no nesting, no stray brace)", "template")
        parts = tuple((e, _compile_expr(fmt, e, "template")) for e in dict.fromkeys(_TEMPLATE_PART.findall(text)))
        return FieldRule(target, text, template=Template(text, parts), **common)
    exprs = spec["path"] if isinstance(spec["path"], list) else [spec["path"]]
    if not exprs:
        raise SpecError(f"{target}: path list is empty", "path")
    paths = tuple(_compile_expr(fmt, e, "path") for e in exprs)
    return FieldRule(target, " | ".join(str(e) for e in exprs), paths=paths, **common)


def _compile_typed(target: str, spec: dict[str, Any], fmt: Format) -> FieldRule:
    """``{path: OBX-5, typed_by: OBX-2}``: the value typed by its HL7 data type (see formats.hl7v2_values)."""
    extra = sorted(set(spec) - {"path", "typed_by", "required", "default"})
    if extra:
        raise SpecError(f"{target}: typed_by takes only path, required and default (not {', '.join(extra)})",
                        extra[0])
    compile_typed = getattr(fmt, "compile_typed", None)
    if compile_typed is None:
        raise SpecError(f"{target}: typed_by is not available for format {fmt.name} (it is for hl7v2)", "typed_by")
    expr, kind = spec.get("path"), spec["typed_by"]
    if not isinstance(expr, str) or not isinstance(kind, str):
        raise SpecError(f"{target}: typed_by needs path: SEG-FIELD and typed_by: SEG-FIELD, e.g. OBX-5 and OBX-2",
                        "typed_by")
    try:
        accessor = compile_typed(expr, kind)
    except ValueError as exc:
        raise SpecError(f"{target}: {exc}", "typed_by") from None
    return FieldRule(target, accessor.expr, paths=(accessor,), typed=True, default=spec.get("default", _UNSET),
                     required=bool(spec.get("required")))


def _compile_each(target: str, spec: dict[str, Any], fmt: Format, lookups: Mapping[str, LookupTable]) -> FieldRule:
    extra = sorted(set(spec) - {"each", "map", "required"})
    if extra:
        raise SpecError(f"{target}: each takes only map and required (not {', '.join(extra)})", extra[0])
    scope, children = spec.get("each"), spec.get("map")
    if not isinstance(scope, str):
        raise SpecError(f"{target}: each needs a repeating element, e.g. each: OBX", "each")
    if not isinstance(children, dict) or not children:
        raise SpecError(f"{target}: each needs a map of fields for every item", "map")
    try:
        fmt.each_scope(scope)
    except ValueError as exc:
        raise SpecError(f"{target}: {exc}", "each") from None
    rules = tuple(compile_field(k, v, fmt, lookups) for k, v in children.items())
    return FieldRule(target, f"each {scope}", each=(fmt, scope), children=rules, required=bool(spec.get("required")))


def apply_rules(rules: tuple[FieldRule, ...], doc: Any, tz: dt.tzinfo | None = None) -> dict[str, Any]:
    """Build the event data: nested dicts from the dotted targets; absent values left out. ``tz`` is
    the engine's time zone for naive date-times (None leaves them naive)."""
    data: dict[str, Any] = {}
    for rule in rules:
        value = rule.evaluate(doc, tz)
        if value is _UNSET:
            continue
        node = data
        parents, leaf = rule.target_parts
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def data_get(data: Mapping[str, Any], dotted: str) -> Any:
    """Read ``a.b.c`` from nested event data (None if absent)."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
