"""The Rust CEL evaluator of the ``cel`` package, without the package's command-line REPL.

``import cel`` runs the package's ``__init__``, which imports its REPL (``cel.cli``: prompt_toolkit,
wcwidth...): 180 modules and 7.6 MB of resident memory in ``middleware run`` that no route uses
(importing the run command, engine and console: 57.6 MB with it, 50.0 MB without). Only the compiled
extension ``cel.cel`` (``compile``, ``Program``, ``Context``, ``evaluate``) is loaded here, registered as
``cel.cel`` so a later ``import cel`` reuses it (a PyO3 extension is initialised once per process). If
the package is laid out otherwise, or was imported already, the package itself is used.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING


def _load() -> ModuleType:
    if "cel" in sys.modules or "cel.cel" in sys.modules:
        import cel

        return cel
    spec = importlib.util.find_spec("cel")  # finds the package without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    candidates = [path for folder in folders for path in sorted(Path(folder).glob("cel.*"))
                  if path.name.endswith(suffixes)]
    if not candidates:
        import cel

        return cel
    loader = importlib.machinery.ExtensionFileLoader("cel.cel", str(candidates[0]))
    extension_spec = importlib.util.spec_from_file_location("cel.cel", candidates[0], loader=loader)
    assert extension_spec is not None
    module = importlib.util.module_from_spec(extension_spec)
    sys.modules["cel.cel"] = module
    loader.exec_module(module)
    return module


if TYPE_CHECKING:
    import cel
else:
    cel = _load()

__all__ = ["cel"]
