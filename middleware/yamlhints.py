"""YAML syntax errors explained: the line and column where the fix goes, what is wrong in plain words
and a hint, instead of PyYAML's scanner and parser wording ("mapping values are not allowed here")."""

from __future__ import annotations

import re

import yaml

_CANNOT_START = re.compile(r"found character '(.+)' that cannot start any token")
_FLOW = {"flow mapping": ("{", "}"), "flow sequence": ("[", "]")}


def explain(error: yaml.MarkedYAMLError, text: str) -> tuple[int, str]:
    """(1-based line, message) for a syntax error in ``text``; the message starts with ``invalid YAML``."""
    mark = error.problem_mark or error.context_mark
    line, column = (mark.line, mark.column) if mark else (0, 0)
    lines = text.splitlines()
    problem, context = error.problem or "", error.context or ""
    found = _CANNOT_START.search(problem)
    if found and found.group(1) == "\\t":
        return _say(line, column, "a tab character: YAML indents and separates with spaces only",
                    "replace the tab with spaces; editors can insert spaces for the tab key")
    if found:
        char = found.group(1)
        return _say(line, column, f"a value cannot start with {char}",
                    f"quote the value, e.g. key: \"{char}...\"")
    if problem.startswith("found unknown escape character"):
        return _say(line, column, f"{problem.split()[-1].strip(chr(39))!r} after a backslash is no escape in "
                    "double quotes", "write \\\\ for a backslash, or put the value in single quotes")
    if "quoted scalar" in context and error.context_mark is not None:
        opened = error.context_mark
        return _say(opened.line, opened.column, "this quote is never closed",
                    "close it before the end of the value, or write a quote inside the value as \\\" "
                    "(double quotes) or '' (single quotes)")
    for kind, (opener, closer) in _FLOW.items():
        if kind in context and error.context_mark is not None:
            opened = error.context_mark
            return _say(opened.line, opened.column, f"the {opener} opened here is not closed with {closer} "
                        f"(PyYAML stopped at line {line + 1}, column {column + 1})",
                        f"add the {closer}, separate items with commas, or quote a value that contains "
                        f"{opener}, {closer}, ',' or ': '")
    if context.startswith("expected a single document"):
        return _say(line, column, "a second document (---) in one file",
                    "one route, connector or config per file: remove the --- line or move the rest to its own file")
    if problem.startswith("found undefined alias"):
        name = problem.rsplit(" ", 1)[-1].strip("'")
        return _say(line, column, f"alias *{name} is not defined above in this file",
                    f"define &{name} before it; to share a map between routes use a fragment "
                    "(routes/_fragments/, include:)")
    if problem == "mapping values are not allowed here":
        return _colon(lines, line, column)
    if problem.startswith("expected <block end>"):
        return _block_end(lines, line, column, problem)
    if "could not find expected ':'" in problem:
        return _say(line, column, "a key without ':' (or a line continued at the wrong indentation)",
                    "write key: value, with a space after the colon")
    return _say(line, column, problem or "cannot be read", "check the indentation and quoting around here")


def _colon(lines: list[str], line: int, column: int) -> tuple[int, str]:
    """``mapping values are not allowed here``: a ': ' where PyYAML expected a plain value."""
    here = lines[line] if line < len(lines) else ""
    before = here[:column]
    indent = _indent(here)
    above = next((lines[n] for n in range(line - 1, -1, -1) if lines[n].strip() and
                  not lines[n].lstrip().startswith("#")), "")
    if re.search(r"\S:\S", above.split("#")[0]) and ": " not in above and not above.rstrip().endswith(":"):
        return _say(line - 1, 0, "a key without a space after its colon (key:value is read as one text)",
                    "write key: value, with a space after the colon")
    if re.search(r"\S: ", before.lstrip("- ")):
        key = before.strip().lstrip("- ").split(":", 1)[0]
        return _say(line, column, "a second ': ' in one line: the value contains a colon and a space",
                    f"quote the value, e.g. {key}: \"...\"")
    if above and indent > _indent(above) and not above.rstrip().endswith(":"):
        return _say(line, indent, f"this line is indented more (column {indent + 1}) than the line above "
                    f"(column {_indent(above) + 1}), which already has a value",
                    "indent the keys of one mapping equally, or end the line above with ':' to open a mapping")
    return _say(line, column, "a ': ' where a value was expected",
                "quote a value that contains ': ', and check the indentation of this line")


def _block_end(lines: list[str], line: int, column: int, problem: str) -> tuple[int, str]:
    """``expected <block end>``: a line whose indentation fits no open list or mapping, or a flow value."""
    here = lines[line] if line < len(lines) else ""
    if "found '{'" in problem or "found '['" in problem:
        key = here.strip().lstrip("- ").split(":", 1)[0] or "key"
        return _say(line, column, "a value that starts with { or [ is read as a mapping or list, and text "
                    "follows it", f"quote the value, e.g. {key}: \"{{PID-5.2}} {{PID-5.1}}\"")
    if "found '<scalar>'" in problem and re.search(r"['\"]\s*\S", here[:column + 1]):
        return _say(line, column, "text after the closing quote of a value",
                    "quote the whole value; inside single quotes write ' as '' (e.g. 'it''s')")
    indent = _indent(here)
    above = next((lines[n] for n in range(line - 1, -1, -1) if lines[n].strip() and
                  not lines[n].lstrip().startswith("#")), "")
    if above.lstrip().startswith("- ") and indent == _indent(above):
        item = _indent(above) + 2 + _indent(above.lstrip()[2:])
        return _say(line, indent, "this key is at the column of the list's '-', so it is not part of the "
                    "item above", f"indent it to column {item + 1}, under the item's first key")
    return _say(line, indent, f"the indentation (column {indent + 1}) does not match the lines above",
                "indent the items of one list or mapping equally, with spaces")


def _indent(text: str) -> int:
    return len(text) - len(text.lstrip(" "))


def _say(line: int, column: int, what: str, hint: str) -> tuple[int, str]:
    return line + 1, f"invalid YAML at column {column + 1}: {what} ({hint})"
