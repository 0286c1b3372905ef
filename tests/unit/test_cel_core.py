"""middleware.cel_core: the CEL evaluator without the ``cel`` package's REPL (issue 14, memory baseline)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_expressions_load_cel_without_its_repl_and_a_later_import_cel_still_works() -> None:
    out = _run("""
        import sys
        from middleware.expressions import compile_expression  # noqa: F401
        from middleware.cel_core import cel
        print(cel.evaluate("1 + 2"), "prompt_toolkit" in sys.modules, "cel.cli" in sys.modules)
        import cel as package
        print(package.compile("3 * 2").execute(package.Context()), package.compile is cel.compile)
    """)
    assert out.splitlines() == ["3 False False", "6 True"]
