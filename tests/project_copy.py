"""A throwaway copy of the shipped project that a test may break, and the edits such tests make to it.

Used by the configuration tests (``middleware validate`` and the loader): each copies the shipped
``config/``, ``routes/``, ``connectors/`` and ``schemas/`` into its ``tmp_path``, changes one line and
expects a ``file:line: message`` problem (or a loaded setting) back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from middleware.project import check_project

REPO = Path(__file__).resolve().parents[1]
PROJECT_FOLDERS = ("config", "routes", "connectors", "schemas")


def copy_project(root: Path, *extra: str) -> Path:
    """Copy the shipped project (and the ``extra`` folders, e.g. ``samples``) into ``root``; returns it."""
    for folder in (*PROJECT_FOLDERS, *extra):
        shutil.copytree(REPO / folder, root / folder)
    return root


def edit(path: Path, old: str, new: str) -> int:
    """Replace the first ``old`` in ``path`` (it must be there) by ``new``; the line number it starts at."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))
    return text[: text.index(old)].count("\n") + 1


def line_of(path: Path, needle: str, start: int = 1) -> int:
    """The number of the first line at or after ``start`` holding ``needle``."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if number >= start and needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def problems(project: Path, env: dict[str, str] | None = None) -> list[str]:
    """What ``middleware validate`` reports for ``project``, as ``file:line: message`` strings."""
    loaded, found = check_project(project, env or {})
    assert (loaded is None) == bool(found)
    return [str(p) for p in found]
