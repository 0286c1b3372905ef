"""Event maps checked against their event's JSON Schema when a project is loaded (``middleware validate``).

For one event rule: every target is a property the schema declares; what a rule produces fits the
property's type (``as: int`` into a string field is an error; a list of objects needs an array); lookup
tables and constants only give values the property's ``enum`` allows; and every required property is
mapped (those of optional objects too, once the map fills anything in them). A path's value is only known
at run time, so a plain path is taken as text (what the mapping gives without ``as``) and typed values
(``typed_by``) are not checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from middleware.mapping import FieldRule

Finding = tuple[tuple[str, ...], str]  # (key path inside the rule's map, message)
_PRODUCED = {"string": "string", "date": "string", "datetime": "string", "int": "integer", "decimal": "number",
             "bool": "boolean"}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    return "object" if isinstance(value, Mapping) else "null"


def _resolve(node: Any, root: Mapping[str, Any]) -> Any:
    """Follow local ``$ref`` (``#/$defs/code``) until a schema that is not a reference."""
    seen = 0
    while isinstance(node, Mapping) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        target: Any = root
        for part in node["$ref"][2:].split("/"):
            target = target.get(part) if isinstance(target, Mapping) else None
        node, seen = target, seen + 1
        if seen > 32:
            return None
    return node


def _branches(node: Any, root: Mapping[str, Any]) -> list[Any]:
    """The schema and the branches of its anyOf / oneOf / allOf, references resolved."""
    node = _resolve(node, root)
    if not isinstance(node, Mapping):
        return []
    found = [node]
    for key in ("anyOf", "oneOf", "allOf"):
        for branch in node.get(key) or []:
            found += _branches(branch, root)
    return found


def _property(node: Any, name: str, root: Mapping[str, Any]) -> Any:
    for branch in _branches(node, root):
        properties = branch.get("properties")
        if isinstance(properties, Mapping) and name in properties:
            return properties[name]
    return None


def _allowed(node: Any, root: Mapping[str, Any]) -> set[str] | None:
    """The JSON types the schema allows (None: it does not say)."""
    allowed: set[str] = set()
    said = False
    for branch in _branches(node, root):
        kind = branch.get("type")
        if isinstance(kind, str):
            allowed.add(kind)
            said = True
        elif isinstance(kind, list):
            allowed |= {k for k in kind if isinstance(k, str)}
            said = True
        for key in ("enum", "const"):
            if key in branch:
                values = branch[key] if key == "enum" else [branch[key]]
                allowed |= {_json_type(v) for v in values}
                said = True
    if not said:
        return None
    if "number" in allowed:
        allowed.add("integer")
    return allowed


def _enum(node: Any, root: Mapping[str, Any]) -> list[Any] | None:
    values: list[Any] = []
    for branch in _branches(node, root):
        if "enum" in branch:
            values += list(branch["enum"])
        elif "const" in branch:
            values.append(branch["const"])
        elif "type" in branch:
            return None  # a branch that takes any value of a type: no closed set
    return values or None


def _produced(rule: FieldRule) -> tuple[str | None, list[Any] | None]:
    """(JSON type of one value, the exact values when known) for a non-``each`` rule."""
    if rule.typed:
        return None, None
    if rule.lookup is not None:
        values = list(rule.lookup.values.values()) + ([rule.lookup.default] if rule.lookup.default is not None else [])
        kinds = {_json_type(v) for v in values}
        return (kinds.pop() if len(kinds) == 1 else None), values
    if rule.is_constant:
        return _json_type(rule.constant), [rule.constant]
    return _PRODUCED.get(rule.convert), None


def _targets_cover(targets: Sequence[str], path: str) -> bool:
    return any(t == path or t.startswith(path + ".") for t in targets)


def _required(node: Any, root: Mapping[str, Any], prefix: str, targets: Sequence[str]) -> list[str]:
    """Required properties (dotted) that no target fills; optional objects only once something fills them."""
    missing: list[str] = []
    for branch in _branches(node, root):
        for name in branch.get("required") or []:
            path = f"{prefix}{name}"
            if not _targets_cover(targets, path):
                missing.append(path)
        for name, child in (branch.get("properties") or {}).items():
            path = f"{prefix}{name}"
            child_branches = _branches(child, root)
            is_object = any(b.get("type") == "object" or "properties" in b for b in child_branches)
            if is_object and any(t.startswith(path + ".") for t in targets):
                missing += _required(child, root, path + ".", targets)
    return missing


def check_map(rules: Sequence[FieldRule], node: Any, root: Mapping[str, Any] | None = None,
              where: tuple[str, ...] = ()) -> list[Finding]:
    """Every mismatch between ``rules`` (one map, or an ``each`` item's map) and the schema ``node``."""
    root = root if root is not None else node
    findings: list[Finding] = []
    for rule in rules:
        key = (*where, rule.target)
        target = node
        parents, leaf = rule.target_parts
        for part in (*parents, leaf):
            target = _property(target, part, root)
            if target is None:
                findings.append((key, f"{rule.target}: not a property of the event's schema"))
                break
        if target is None:
            continue
        allowed = _allowed(target, root)
        if rule.each is not None:
            if allowed is not None and "array" not in allowed:
                findings.append((key, f"{rule.target}: each gives a list, the schema wants {_show(allowed)}"))
                continue
            items = next((b["items"] for b in _branches(target, root) if isinstance(b.get("items"), Mapping)), None)
            if items is not None:
                findings += check_map(rule.children, items, root, (*key, "map"))
                findings += [((*key, "map"), f"{rule.target}[].{path}: required by the schema but not mapped")
                             for path in _required(items, root, "", [c.target for c in rule.children])]
            continue
        kind, values = _produced(rule)
        if any(getattr(p, "multiple", False) for p in rule.paths):
            if allowed is not None and "array" not in allowed:
                findings.append((key, f"{rule.target}: the path gives a list, the schema wants {_show(allowed)}"))
                continue
            target = next((b["items"] for b in _branches(target, root) if isinstance(b.get("items"), Mapping)), None)
            allowed = _allowed(target, root) if target is not None else None
        if kind is not None and allowed is not None and kind not in allowed:
            how = f"lookup {rule.lookup.name!r}" if rule.lookup is not None else (
                "the constant" if rule.is_constant else f"as: {rule.convert}")
            findings.append((key, f"{rule.target}: {how} gives {kind}, the schema wants {_show(allowed)}"))
            continue
        enum = _enum(target, root) if target is not None else None
        if values is not None and enum is not None:
            outside = [v for v in values if v not in enum]
            if outside:
                source = f"lookup table {rule.lookup.name!r}" if rule.lookup is not None else "the constant"
                findings.append((key, f"{rule.target}: {source} gives {', '.join(map(repr, outside[:5]))}, not in "
                                      f"the schema's enum ({', '.join(map(repr, enum))})"))
    if not where:
        findings += [((), f"{path}: required by the schema but not mapped")
                     for path in _required(node, root, "", [r.target for r in rules])]
    return findings


def _show(kinds: set[str]) -> str:
    return " or ".join(sorted(kinds - {"integer"} if "number" in kinds else kinds))
