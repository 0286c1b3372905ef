"""A fresh clone passes: the shared corpus and RabbitMQ are optional locally, required on CI.

Each test lays out a miniature checkout in ``tmp_path`` (our tests/conftest.py plus a small test
file) and runs pytest on it in a separate process, as a new user would.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SWEEP = '''
from pathlib import Path

import pytest


def test_corpus_count(corpus: Path) -> None:
    assert len(list(corpus.glob("hl7v2/*.hl7"))) == 2


@pytest.mark.corpus("hl7v2/*.hl7")
def test_each_file(corpus_file: Path) -> None:
    assert corpus_file.read_bytes().startswith(b"MSH")


def test_without_corpus() -> None:
    pass
'''

NEEDS_RABBITMQ = '''
import pytest


@pytest.mark.rabbitmq
def test_on_rabbitmq() -> None:
    pass


def test_without_rabbitmq() -> None:
    pass
'''


def checkout(root: Path, test_source: str, *, with_corpus: bool) -> Path:
    """``root/repo`` holding our conftest and one test file; ``root/shared/corpus`` if asked."""
    repo = root / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "__init__.py").write_text("")
    (repo / "tests" / "conftest.py").write_bytes((REPO / "tests" / "conftest.py").read_bytes())
    (repo / "tests" / "test_sample.py").write_text(test_source)
    (repo / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    if with_corpus:
        folder = root / "shared" / "corpus" / "hl7v2"
        folder.mkdir(parents=True)
        for name in ("a.hl7", "b.hl7"):
            (folder / name).write_bytes(b"MSH|^~\\&|A|B\r")
    return repo


def pytest_in(repo: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in {"CI", "MIDDLEWARE_REQUIRE_RABBITMQ", "MIDDLEWARE_TEST_AMQP_URL"}}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=repo, env={**clean, **env}, capture_output=True, text=True, timeout=60)


def counts(output: str) -> dict[str, int]:
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|failed|errors?)", output)}


def test_without_the_shared_corpus_the_sweeps_skip_with_one_line(tmp_path: Path) -> None:
    result = pytest_in(checkout(tmp_path, SWEEP, with_corpus=False))
    assert result.returncode == 0, result.stdout
    assert counts(result.stdout) == {"passed": 1, "skipped": 2}
    [line] = [line for line in result.stdout.splitlines() if "shared corpus absent" in line]
    assert str(tmp_path / "shared" / "corpus") in line and "(2 test(s))" in line


def test_on_ci_a_missing_shared_corpus_fails(tmp_path: Path) -> None:
    result = pytest_in(checkout(tmp_path, SWEEP, with_corpus=False), CI="true")
    assert result.returncode == 1, result.stdout
    assert counts(result.stdout) == {"passed": 1, "errors": 2}
    assert "CI (CI=true) must lay ../shared beside the checkout" in result.stdout


def test_with_the_shared_corpus_every_file_is_swept(tmp_path: Path) -> None:
    result = pytest_in(checkout(tmp_path, SWEEP, with_corpus=True), CI="true")
    assert result.returncode == 0, result.stdout
    assert counts(result.stdout) == {"passed": 4}  # the count, two files, the plain test


# a path to ../shared built in code: a "shared" path component, or a string that starts with ../shared
SHARED_PATH = re.compile(r"""["']shared["']|["'](?:\.\./)+shared\b""")


def test_no_test_reads_the_shared_folder_except_through_the_corpus_fixture() -> None:
    assert SHARED_PATH.search('REPO.parent / "shared" / "corpus"') and SHARED_PATH.search("'../shared/corpus'")
    assert not SHARED_PATH.search('"""The bundles (../shared/corpus): every entry maps."""')  # prose is fine
    for path in (REPO / "tests").rglob("*.py"):
        if path.name in {"conftest.py", "test_fresh_clone.py"} and path.parent.name in {"tests", "unit"}:
            continue
        assert not SHARED_PATH.search(path.read_text(encoding="utf-8")), f"{path}: use the corpus fixture"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_without_rabbitmq_its_tests_skip_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    result = pytest_in(checkout(tmp_path, NEEDS_RABBITMQ, with_corpus=False),
                       MIDDLEWARE_TEST_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/")
    assert result.returncode == 0, result.stdout
    assert counts(result.stdout) == {"passed": 1, "skipped": 1}
    [line] = [line for line in result.stdout.splitlines() if "RabbitMQ" in line]
    assert f"RabbitMQ not reachable at 127.0.0.1:{port}" in line and "apt-get install rabbitmq-server" in line


def test_without_rabbitmq_when_required_the_run_fails_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    result = pytest_in(checkout(tmp_path, NEEDS_RABBITMQ, with_corpus=False), MIDDLEWARE_REQUIRE_RABBITMQ="1",
                       MIDDLEWARE_TEST_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/")
    assert result.returncode == 1, result.stdout
    assert "passed" not in result.stdout
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "RabbitMQ" in line]
    assert len(lines) == 1 and f"RabbitMQ not reachable at 127.0.0.1:{port}" in lines[0], lines
    assert "MIDDLEWARE_REQUIRE_RABBITMQ" in lines[0]


@pytest.mark.rabbitmq
def test_a_running_rabbitmq_is_seen(amqp_url: str) -> None:
    from tests.conftest import rabbitmq_problem

    assert rabbitmq_problem(amqp_url) is None
