"""The command line's own surface: --version, shell completion, options with a fixed set of values."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from middleware import errors
from middleware.cli.dlq import STAGES

REPO = Path(__file__).resolve().parents[2]
MIDDLEWARE = str(Path(sys.executable).with_name("middleware"))  # the console script the README installs


def middleware(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MIDDLEWARE, *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "MIDDLEWARE_BROKER_URL": "memory://", **(env or {})})


def flat(text: str) -> str:
    """Text with rich's error box and its line wrapping taken out."""
    return " ".join(text.replace("│", " ").split())


def test_version_prints_the_installed_version() -> None:
    result = middleware("--version")
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert result.returncode == 0 and result.stdout == f"middleware {version}\n"


def test_shell_completion_can_be_installed_and_completes_commands() -> None:
    script = middleware("--show-completion", "bash")
    assert script.returncode == 0 and "_MIDDLEWARE_COMPLETE=complete_bash" in script.stdout
    completed = middleware(env={"_MIDDLEWARE_COMPLETE": "complete_bash", "COMP_WORDS": "middleware dl",
                                "COMP_CWORD": "1"})
    assert completed.returncode == 0 and completed.stdout.split() == ["dlq"]
    stages = middleware(env={"_MIDDLEWARE_COMPLETE": "complete_bash", "COMP_WORDS": "middleware run --log-format ",
                             "COMP_CWORD": "3"})
    assert stages.stdout.split() == ["json", "text"]


def test_an_unknown_dlq_stage_is_a_usage_error_naming_the_stages() -> None:
    result = middleware("dlq", "list", "--stage", "parsing")
    assert result.returncode == 2
    assert "'parsing' is not a stage; use one of parse, filter, map, validate, deliver" in flat(result.stderr)


def test_a_dlq_stage_in_any_case_is_accepted() -> None:
    result = middleware("dlq", "list", "--stage", "PARSE")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no dead letters"


def test_the_dlq_stages_are_the_pipeline_error_stages() -> None:
    def stages(cls: type[errors.MiddlewareError]) -> set[str]:
        found = {cls.stage} if cls.stage else set()
        for sub in cls.__subclasses__():
            found |= stages(sub)
        return found

    assert set(STAGES) == stages(errors.PipelineError)


def test_run_refuses_an_unknown_log_format_or_level() -> None:
    for option, value in (("--log-format", "xml"), ("--log-level", "loud")):
        result = middleware("run", option, value)
        assert result.returncode == 2 and f"Invalid value for '{option}'" in flat(result.stderr)
        assert repr(value) in flat(result.stderr)
