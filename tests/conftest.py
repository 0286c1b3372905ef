"""Shared fixtures: the real RabbitMQ URL and a per-run queue-name prefix."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
AMQP_URL = os.environ.get("MIDDLEWARE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RUN_PREFIX = f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def amqp_url() -> str:
    """URL of the real RabbitMQ the tests use."""
    return AMQP_URL


@pytest.fixture
def queue_prefix() -> str:
    """A prefix unique to this test, under this run's prefix: tests delete what they declare."""
    return f"{RUN_PREFIX}{uuid.uuid4().hex[:6]}."


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rabbitmq: needs the real RabbitMQ")


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
async def sink() -> AsyncIterator[Sink]:
    server = Sink()
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()
