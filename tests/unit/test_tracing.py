"""Tracing is off by default and then imports nothing of OpenTelemetry; switched on without the
``otel`` extra, `validate` and the engine's start fail saying what to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import middleware
from middleware import tracing
from middleware.delivery.base import Delivery
from middleware.errors import ConfigError, DeliveryError
from middleware.project import load_project
from middleware.route import Route

from .test_ordered_worker import Message as OrderedMessage
from .test_ordered_worker import Recorder, Scripted
from .test_ordered_worker import _worker as ordered_worker
from .test_ordered_worker import route as ordered_route  # noqa: F401  (a fixture: the ordering kit's route)
from .test_project_validation import edit, project  # noqa: F401  (project: a fixture, a copy of the shipped one)

REPO = Path(__file__).resolve().parents[2]
HIDE_OTEL = "import sys; sys.modules['opentelemetry'] = None  # as if the otel extra were not installed\n"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MIDDLEWARE_JOURNAL_URL": "", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env=env)


def switch_on(project: Path) -> None:  # noqa: F811
    with (project / "config" / "middleware.yaml").open("a") as config:
        config.write("tracing:\n  enabled: true\n  otlp_endpoint: http://127.0.0.1:4318/v1/traces\n")


def test_tracing_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    """The shipped project (no tracing:) loads and builds its engine (workers, publishers, connectors
    imported) without importing opentelemetry, though it is installed here."""
    code = f"""
import asyncio, sys
from middleware.engine import Engine
from middleware.project import load_project
from middleware.tracing import NULL_TRACING
import os
os.environ["MIDDLEWARE_JOURNAL_URL"] = "sqlite:///{tmp_path}/journal.db"
project = load_project(".", {{**os.environ, "HTTP_INGEST_TOKEN": "t", "CASE_MANAGEMENT_URL": "http://127.0.0.1:9/",
                               "CDR_URL": "http://127.0.0.1:9/"}})
engine = Engine(project, gateways=False)
assert engine.tracing is NULL_TRACING and not project.settings.tracing.enabled
loaded = sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry")
print("loaded:", loaded)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded: []"


def test_spans_when_off_are_one_shared_null_span() -> None:
    span = tracing.NULL_TRACING.start("route", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                                      route="adt-inbound")
    assert span is tracing.NULL_SPAN and span.traceparent is None and span.child("transform") is span
    span.end("routed")


def test_validate_says_what_to_install_when_tracing_is_on_without_the_extra(project: Path) -> None:  # noqa: F811
    switch_on(project)
    code = HIDE_OTEL + ("from middleware.cli import main\n"
                        "sys.argv = ['middleware', 'validate', '--project', sys.argv[1]]\nmain()")
    result = run_python(code, str(project))
    assert result.returncode == 1
    line = [n for n, text in enumerate((project / "config" / "middleware.yaml").read_text().splitlines(), 1)
            if text.strip() == "enabled: true"][-1]  # the one switch_on appended
    assert f"config/middleware.yaml:{line}: tracing.enabled is true but OpenTelemetry is not installed: " \
           f"pip install 'middleware[otel]'" in result.stdout + result.stderr


def test_the_loader_accepts_tracing_when_the_extra_is_installed(project: Path) -> None:  # noqa: F811
    switch_on(project)
    settings = load_project(project, {"HTTP_INGEST_TOKEN": "t"}, offline=True).settings.tracing
    assert settings == tracing.TracingSettings(enabled=True, otlp_endpoint="http://127.0.0.1:4318/v1/traces")


def test_a_bad_tracing_key_is_a_problem(project: Path) -> None:  # noqa: F811
    edit(project / "config" / "middleware.yaml", "journal:", "tracing:\n  endpoint: http://x\njournal:")
    with pytest.raises(ConfigError, match="unknown key 'endpoint'"):
        load_project(project, {"HTTP_INGEST_TOKEN": "t"}, offline=True)


def test_opening_tracing_without_the_extra_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "middleware.tracing_otel", None)  # its import fails, as without the SDK
    monkeypatch.delattr(middleware, "tracing_otel", raising=False)  # (an earlier test may have imported it)
    assert tracing.open_tracing(tracing.TracingSettings()) is tracing.NULL_TRACING  # off: never imported
    with pytest.raises(tracing.TracingError) as raised:
        tracing.open_tracing(tracing.TracingSettings(enabled=True))
    assert "pip install 'middleware[otel]'" in str(raised.value)


async def test_an_ordered_delivery_is_a_span_of_its_event_and_sends_its_traceparent(
        ordered_route: Route) -> None:  # noqa: F811
    """The ordered delivery worker (per-key order) traces like the others: a ``deliver`` span, child
    of the event's traceparent, whose own traceparent the connector sends; retried in place, one span."""
    exporter = InMemorySpanExporter()
    connector = Scripted([DeliveryError("503", status=503, retryable=True)])
    sent: list[str | None] = []
    send = connector.send

    async def recording(delivery: Delivery) -> None:
        sent.append(delivery.traceparent)
        await send(delivery)

    connector.send = recording  # type: ignore[method-assign]
    worker = ordered_worker(ordered_route, connector, Recorder())
    worker.tracing = tracing.open_tracing(tracing.TracingSettings(), exporter)
    message = OrderedMessage()
    message.headers["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await worker.handle(message)
    [span] = exporter.get_finished_spans()
    ctx = span.get_span_context()
    assert message.outcome == "ack" and span.name == "deliver order-sink"
    assert f"{ctx.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736" and span.parent is not None
    assert f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert sent == [f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"] * 2  # the try and its retry
    assert dict(span.attributes or {})["mw.outcome"] == "delivered" and span.attributes["mw.attempts"] == 2
