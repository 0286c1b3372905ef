"""YAML syntax errors explained: the line where the fix goes, the column, plain words and a hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from middleware.yamlfile import load_yaml


def problem(tmp_path: Path, text: str) -> str:
    path = tmp_path / "route.yaml"
    path.write_text(text, encoding="utf-8")
    doc = load_yaml(path, "routes/route.yaml")
    assert doc.data is None and len(doc.problems) == 1
    return str(doc.problems[0])


@pytest.mark.parametrize(("text", "expected"), [
    ("route: a\nsource:\n  queue: x\n   format: y\n",
     "routes/route.yaml:4: invalid YAML at column 4: this line is indented more (column 4) than the line above "
     "(column 3), which already has a value"),
    ("route: a\nsource:\n    queue: x\n  format: y\n",
     "routes/route.yaml:4: invalid YAML at column 3: the indentation (column 3) does not match the lines above "
     "(indent the items of one list or mapping equally, with spaces)"),
    ("events:\n  - type: a\n  version: 1\n",
     "routes/route.yaml:3: invalid YAML at column 3: this key is at the column of the list's '-', so it is not part "
     "of the item above (indent it to column 5, under the item's first key)"),
    ("route: a\ndescription: Ratio: high\n",
     "routes/route.yaml:2: invalid YAML at column 19: a second ': ' in one line: the value contains a colon and a "
     "space (quote the value, e.g. description: \"...\")"),
    ("route:a\nsource:\n  queue: x\n",
     "routes/route.yaml:1: invalid YAML at column 1: a key without a space after its colon"),
    ("route: a\nsource:\n\tqueue: x\n",
     "routes/route.yaml:3: invalid YAML at column 1: a tab character: YAML indents and separates with spaces only"),
    ("description: 'it's'\n", "routes/route.yaml:1: invalid YAML at column 18: text after the closing quote of a "
                              "value (quote the whole value; inside single quotes write ' as '' (e.g. 'it''s'))"),
    ("x: \"C:\\qdata\"\n", "routes/route.yaml:1: invalid YAML at column 8: 'q' after a backslash is no escape in "
                           "double quotes (write \\\\ for a backslash, or put the value in single quotes)"),
    ("route: a\n---\nroute: b\n", "routes/route.yaml:2: invalid YAML at column 1: a second document (---) in one "
                                "file"),
    ("route: a\ndescription: \"ADT feed\nsource: {queue: x}\n",
     "routes/route.yaml:2: invalid YAML at column 14: this quote is never closed"),
    ("route: 'a\nsource: x\n", "routes/route.yaml:1: invalid YAML at column 8: this quote is never closed"),
    ("source: {queue: x, format: y\nevents: []\n",
     "routes/route.yaml:1: invalid YAML at column 9: the { opened here is not closed with } (PyYAML stopped at "
     "line 2, column 7)"),
    ("map:\n  name: {PID-5.2} {PID-5.1}\n",
     "routes/route.yaml:2: invalid YAML at column 19: a value that starts with { or [ is read as a mapping or list, "
     "and text follows it (quote the value, e.g. name: \"{PID-5.2} {PID-5.1}\")"),
    ("description: @home\n", "routes/route.yaml:1: invalid YAML at column 14: a value cannot start with @ "
                             "(quote the value"),
    ("map: *patient\n", "routes/route.yaml:1: invalid YAML at column 6: alias *patient is not defined above in this "
                        "file (define &patient before it; to share a map between routes use a fragment"),
])
def test_typical_mistakes_are_explained(tmp_path: Path, text: str, expected: str) -> None:
    found = problem(tmp_path, text)
    assert found.startswith(expected)
    assert "not allowed here" not in found and "<block" not in found  # none of PyYAML's own wording


def test_an_unknown_error_keeps_line_column_and_pyyaml_problem(tmp_path: Path) -> None:
    assert problem(tmp_path, "a: !!python/name:os.system x\n").startswith("routes/route.yaml:1: invalid YAML at "
                                                                          "column 4: could not determine a constructor")
