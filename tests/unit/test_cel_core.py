"""What ``middleware run`` imports (issue 14, memory baseline): the CEL evaluator without the ``cel``
package's REPL, and no module that only an unused feature needs."""

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


def test_the_engine_console_and_connectors_import_no_repl_jwt_or_fhir_models() -> None:
    out = _run("""
        import sys
        import middleware.cli, middleware.cli.run, middleware.engine, middleware.console.app  # noqa: F401
        import middleware.delivery.fhir, middleware.delivery.http, middleware.expressions  # noqa: F401
        from middleware.formats.fhir import is_resource_type
        assert is_resource_type("Patient") and not is_resource_type("HumanName")
        unused = {"prompt_toolkit", "jwt", "cryptography", "fhir", "pydantic"}
        print(sorted({name.split(".")[0] for name in sys.modules} & unused))
    """)
    assert out == "[]"
