"""Shared fixtures: the real RabbitMQ URL, a per-run queue-name prefix, the shared corpus, a sink.

Two things a test run may not find, each reported in one line:

- RabbitMQ (``MIDDLEWARE_TEST_AMQP_URL``): without it the RabbitMQ tests skip; with
  ``MIDDLEWARE_REQUIRE_RABBITMQ=1`` (set by ``.ci/run``) the run stops with an error instead.
- The shared corpus (``../shared/corpus`` beside the checkout): without it the corpus sweeps skip;
  under CI (``CI=true``, where it is always laid there) its absence fails them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
AMQP_URL = os.environ.get("MIDDLEWARE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RUN_PREFIX = f"t{uuid.uuid4().hex[:8]}."
CORPUS_ABSENT = f"shared corpus absent at {CORPUS}: corpus sweeps skipped"
_RABBITMQ_HINT = "start it (see README: apt-get install rabbitmq-server) or set MIDDLEWARE_TEST_AMQP_URL"


def under_ci() -> bool:
    """True on CI (``CI=true``), where a missing shared corpus is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture
def amqp_url() -> str:
    """URL of the real RabbitMQ the tests use."""
    return AMQP_URL


@pytest.fixture
def queue_prefix() -> str:
    """A prefix unique to this test, under this run's prefix: tests delete what they declare."""
    return f"{RUN_PREFIX}{uuid.uuid4().hex[:6]}."


# -- the shared corpus ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def corpus() -> Path:
    """``../shared/corpus``; every corpus sweep goes through here (or ``corpus_file``).

    Absent: the test skips, or fails under CI.
    """
    if not CORPUS.is_dir():
        if under_ci():
            pytest.fail(f"shared corpus absent at {CORPUS}; CI (CI=true) must lay ../shared beside the checkout",
                        pytrace=False)
        pytest.skip(CORPUS_ABSENT)
    return CORPUS


@pytest.fixture
def corpus_file(request: pytest.FixtureRequest, corpus: Path) -> Path:
    """One file of the shared corpus: a test marked ``@pytest.mark.corpus("<glob>")`` runs once per match."""
    path: Path | None = request.param
    if path is None:
        marker = request.node.get_closest_marker("corpus")
        pytest.fail(f"no file of {corpus} matches {marker.args[0] if marker else '?'!r}", pytrace=False)
    return path


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``corpus_file`` over the corpus files the test's ``corpus`` marker selects."""
    if "corpus_file" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("corpus")
    if marker is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: corpus_file needs @pytest.mark.corpus('<glob>')")
    files: list[Path | None] = [*sorted(CORPUS.glob(marker.args[0]))] if CORPUS.is_dir() else []
    # absent corpus: one placeholder case, which the ``corpus`` fixture skips (or fails under CI)
    params = files or [None]
    metafunc.parametrize("corpus_file", params, indirect=True,
                         ids=[p.name if p is not None else "no-corpus" for p in params])


# -- RabbitMQ ---------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rabbitmq: needs the real RabbitMQ")
    config.addinivalue_line("markers", "corpus(glob): parametrize corpus_file over ../shared/corpus/<glob>")


def rabbitmq_problem(url: str = AMQP_URL, timeout: float = 3.0) -> str | None:
    """Why RabbitMQ at ``url`` cannot be used (None: it answers the AMQP protocol header)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(b"AMQP\x00\x00\x09\x01")
            answer = conn.recv(1)
    except OSError as exc:
        return f"RabbitMQ not reachable at {host}:{port} ({exc.strerror or type(exc).__name__})"
    if answer != b"\x01":  # a method frame: connection.start
        return f"RabbitMQ at {host}:{port} does not speak AMQP 0-9-1"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """No RabbitMQ: skip its tests with one reason, or stop the run when it is required."""
    needing = [item for item in items if _needs_rabbitmq(item)]
    if not needing:
        return
    problem = rabbitmq_problem()
    if problem is None:
        return
    if os.environ.get("MIDDLEWARE_REQUIRE_RABBITMQ"):
        pytest.exit(f"{problem}: {len(needing)} RabbitMQ test(s) cannot run and MIDDLEWARE_REQUIRE_RABBITMQ "
                    f"is set; {_RABBITMQ_HINT}", returncode=1)
    reason = f"{problem}: RabbitMQ tests skipped; {_RABBITMQ_HINT}"
    for item in needing:
        item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per missing dependency, even with ``-q``: what is absent and how many tests skipped."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        for known in (CORPUS_ABSENT, "RabbitMQ tests skipped"):
            if known in reason:
                line = reason.removeprefix("Skipped: ")
                reasons[line] = reasons.get(line, 0) + 1
    for line, count in reasons.items():
        terminalreporter.write_line(f"{line} ({count} test(s))", yellow=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """With MIDDLEWARE_REQUIRE_RABBITMQ=1 (set by .ci/run) a skipped RabbitMQ test is a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("MIDDLEWARE_REQUIRE_RABBITMQ") and _needs_rabbitmq(item):
        report.outcome = "failed"
        report.longrepr = f"RabbitMQ test was skipped, but RabbitMQ is required here: {report.longrepr}"


def _needs_rabbitmq(item: pytest.Item) -> bool:
    if item.get_closest_marker("rabbitmq"):
        return True
    callspec = getattr(item, "callspec", None)
    return bool(callspec and any("amqp" in str(v) for v in callspec.params.values()))


class Sink:
    """A real HTTP server playing the downstream system: answers from a script, records requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.script: list[int] = []  # statuses to answer, in order; 200 once exhausted
        self.delay = 0.0  # seconds to wait before answering
        self.reply_headers: dict[str, str] = {}
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            self.requests.append((dict(request.headers), await request.read()))
            status = self.script.pop(0) if self.script else 200
            await asyncio.sleep(self.delay)
            return web.Response(status=status, text="ok" if status < 400 else "no", headers=self.reply_headers)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/events"

    async def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.requests) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"sink got {len(self.requests)} request(s), expected {count}")
            await asyncio.sleep(0.05)


@pytest.fixture
def connector_type() -> Iterator[Callable[[str, Callable[..., object]], None]]:
    """Register a test's own connector type (like any connector type) for that test only: the
    registry forgets it afterwards, so validation messages and docs tables elsewhere never list it."""
    from middleware import spec
    from middleware.delivery import base

    names: list[str] = []

    def add(name: str, factory: Callable[..., object]) -> None:
        base.register(name)(factory)  # type: ignore[arg-type]
        names.append(name)

    yield add
    for name in names:
        spec.unregister("connector", name)


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    server = Sink()
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()
