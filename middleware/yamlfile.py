"""YAML with line numbers: every key and list item of a document keeps the line it was written on.

``${VAR}`` and ``${VAR:-default}`` in string values are interpolated from the environment by
:func:`interpolate`; an unset variable without a default is reported, never left literal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from middleware.errors import Problem

_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
PathKey = tuple[str | int, ...]


@dataclass
class YamlDoc:
    """A parsed YAML file: its value, the line of each path in it, and problems found reading it."""

    file: str
    data: Any
    lines: dict[PathKey, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def line(self, path: PathKey) -> int:
        """Line of ``path``, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def problem(self, path: PathKey, message: str) -> None:
        """Record a problem at ``path``."""
        self.problems.append(Problem(self.file, self.line(path), message))


def load_yaml(path: Path, display: str) -> YamlDoc:
    """Read ``path``; syntax errors and duplicate keys become problems (data is None on error)."""
    try:
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return YamlDoc(display, None, problems=[Problem(display, 1, f"cannot read file: {exc}")])
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        return YamlDoc(display, None, problems=[Problem(display, line, f"invalid YAML: {exc.problem}")])
    finally:
        loader.dispose()
    doc = YamlDoc(display, data, {(): node.start_mark.line + 1} if node is not None else {})
    if node is not None:
        _record_lines(node, (), doc)
    return doc


def _record_lines(node: yaml.Node, path: PathKey, doc: YamlDoc) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                doc.problems.append(Problem(doc.file, line, f"duplicate key {key!r}"))
            seen.add(key)
            doc.lines[(*path, key)] = line
            _record_lines(value_node, (*path, key), doc)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            doc.lines[(*path, index)] = item.start_mark.line + 1
            _record_lines(item, (*path, index), doc)


def interpolate(doc: YamlDoc, env: Mapping[str, str]) -> Any:
    """A copy of ``doc.data`` with ``${VAR}`` replaced; unset variables are recorded as problems."""

    def walk(value: Any, path: PathKey) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*path, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:
            text = _VAR.sub(lambda m: substitute(m, path), value)
            if _VAR.fullmatch(value) and _NUMBER.fullmatch(text):  # port: ${MLLP_PORT:-2575} is a number
                return float(text) if "." in text else int(text)
            return text
        return value

    def substitute(match: re.Match[str], path: PathKey) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        doc.problem(path, f"environment variable {name} is not set (set it, or write ${{{name}:-default}})")
        return ""

    return walk(doc.data, ())
