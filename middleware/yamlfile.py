"""YAML with line numbers: every key and list item of a document keeps the line it was written on.

``${VAR}`` and ``${VAR:-default}`` in string values are interpolated from the environment by
:func:`interpolate`; an unset variable without a default is reported, never left literal.

Aliases are bounded: every ``*alias`` costs the number of nodes it stands for (counted with its own
aliases expanded), and a file whose aliases add more than :data:`MAX_ALIAS_NODES` nodes, or whose
alias refers to the node that contains it, is refused at that alias's line. Without this bound a
1 KB "billion laughs" file expands to billions of nodes in everything that walks the data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.events import AliasEvent
from yaml.nodes import CollectionNode

from middleware.errors import Problem
from middleware.yamlhints import explain

MAX_ALIAS_NODES = 100_000
"""Nodes that aliases may add to one file once expanded (``map: *patient`` adds a few dozen)."""

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
    origins: dict[PathKey, str] = field(default_factory=dict)  # included from a fragment: its file:line

    def origin(self, path: PathKey) -> str | None:
        """``file:line`` in the fragment ``path`` (or its nearest ancestor) was included from, if any."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.origins:
                return self.origins[path[:end]]
        return None

    def line(self, path: PathKey) -> int:
        """Line of ``path``, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def problem(self, path: PathKey, message: str) -> None:
        """Record a problem at ``path`` (for a part included from a fragment: with the fragment's line)."""
        origin = self.origin(path) if self.origins else None
        self.problems.append(Problem(self.file, self.line(path), f"{message} (from {origin})" if origin else message))


class AliasLimitError(ComposerError):
    """An alias that would expand the document past :data:`MAX_ALIAS_NODES`, or into itself."""


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that charges each alias the expanded size of its node (see the module docstring)."""

    def __init__(self, stream: str, max_alias_nodes: int) -> None:
        super().__init__(stream)
        self._budget = max_alias_nodes
        self._alias_nodes = 0
        self._sizes: dict[int, int] = {}  # id(node) -> expanded node count, for finished nodes
        self._open: set[str] = set()  # anchors whose node is still being composed

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            if event.anchor in self._open:
                raise AliasLimitError(None, None, f"alias *{event.anchor} refers to a node that contains it "
                                                  "(recursive alias)", event.start_mark)
            if event.anchor in self.anchors:
                self._alias_nodes += self._size(self.anchors[event.anchor])
                if self._alias_nodes > self._budget:
                    raise AliasLimitError(None, None, f"aliases expand to more than {self._budget:,} nodes at "
                                                      f"*{event.anchor} (an alias bomb?): use fewer or smaller "
                                                      "aliases", event.start_mark)
            return super().compose_node(parent, index)
        anchor = self.peek_event().anchor  # type: ignore[no-untyped-call]
        if anchor is None:
            return super().compose_node(parent, index)
        self._open.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open.discard(anchor)

    def _size(self, node: yaml.Node) -> int:
        """Nodes ``node`` stands for with aliases expanded; memoised, so linear in the file."""
        size = self._sizes.get(id(node))
        if size is not None:
            return size
        size = 1
        if isinstance(node, yaml.MappingNode):
            size += sum(self._size(k) + self._size(v) for k, v in node.value)
        elif isinstance(node, CollectionNode):
            size += sum(self._size(item) for item in node.value)
        self._sizes[id(node)] = size
        return size


def load_yaml(path: Path, display: str, *, max_alias_nodes: int = MAX_ALIAS_NODES) -> YamlDoc:
    """Read ``path``; syntax errors, duplicate keys and oversized aliases become problems (data None on error)."""
    try:
        text = path.read_text(encoding="utf-8")
        loader = _BoundedLoader(text, max_alias_nodes)
    except (OSError, UnicodeDecodeError) as exc:
        return YamlDoc(display, None, problems=[Problem(display, 1, f"cannot read file: {exc}")])
    lines: dict[PathKey, int] = {}
    problems: list[Problem] = []
    try:
        node = loader.get_single_node()
        if node is not None:  # before constructing: merge keys (<<: *base) rewrite the mapping nodes
            lines[()] = node.start_mark.line + 1
            _record_lines(node, (), display, lines, problems)
        data = loader.construct_document(node) if node is not None else None
    except AliasLimitError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        return YamlDoc(display, None, problems=[Problem(display, line, str(exc.problem))])
    except yaml.MarkedYAMLError as exc:
        line, message = explain(exc, text)  # the line where the fix goes, in plain words, with a hint
        return YamlDoc(display, None, problems=[Problem(display, line, message)])
    except RecursionError:  # the composer recurses once per nesting level
        line = loader.get_mark().line + 1
        return YamlDoc(display, None, problems=[Problem(display, line, "YAML nested too deeply")])
    finally:
        loader.dispose()
    return YamlDoc(display, data, lines, problems)


def _record_lines(node: yaml.Node, path: PathKey, file: str, lines: dict[PathKey, int],
                  problems: list[Problem]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(Problem(file, line, f"duplicate key {key!r}"))
            seen.add(key)
            lines[(*path, key)] = line
            _record_lines(value_node, (*path, key), file, lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _record_lines(item, (*path, index), file, lines, problems)


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
