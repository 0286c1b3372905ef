"""Nothing is acked that a sink did not take: redirects and unusable credentials dead-letter at once
with their reason, on the real RabbitMQ with the engine running."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from middleware.broker.base import Broker
from middleware.delivery import ConnectorSpec
from middleware.engine import Engine
from middleware.project import Project

from ..conftest import Sink
from .test_end_to_end import SAMPLES, Cli, dead_letters, publish

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def engine_with() -> AsyncIterator[list[Engine]]:
    """Engines a test starts with its own connector specs; stopped afterwards."""
    started: list[Engine] = []
    yield started
    for running in started:
        await running.stop()


async def start(engine_with: list[Engine], project: Project, case_management: ConnectorSpec) -> Engine:
    running = Engine(project, connector_specs={"case-management": case_management})
    await running.start()
    engine_with.append(running)
    return running


@pytest.mark.parametrize("status", [302, 303])
async def test_sink_redirecting_dead_letters_instead_of_counting_a_get_as_delivered(
        rabbit_project: Project, broker: Broker, cli: Cli, sink: Sink, engine_with: list[Engine],
        status: int) -> None:
    spec = rabbit_project.connectors["case-management"]
    running = await start(engine_with, rabbit_project, spec)
    sink.script = [status]
    sink.reply_headers = {"Location": sink.url.replace("http://", "http://ops:hunter2@") + "/elsewhere"}
    await publish(cli, SAMPLES / "a01-admit.hl7")
    [letter] = await dead_letters(broker, rabbit_project, 1)
    assert letter.stage == "deliver" and letter.connector == "case-management" and letter.attempts == 1
    assert f"HTTP {status} (redirect to http://***@127.0.0.1" in letter.error and "hunter2" not in letter.error
    await asyncio.sleep(0.3)
    assert [h.get("Content-Type") for h, _ in sink.requests] == ["application/cloudevents+json"]  # no GET followed
    assert running.metrics.value("middleware_events_delivered", route="adt-inbound",
                                 connector="case-management") == 0


async def test_url_credentials_beside_an_authorization_header_dead_letter_once_not_as_a_connector_bug(
        rabbit_project: Project, broker: Broker, cli: Cli, sink: Sink, engine_with: list[Engine]) -> None:
    spec = rabbit_project.connectors["case-management"]
    assert "Authorization" in spec.options["headers"]
    broken = dataclasses.replace(spec, options={**spec.options, "url": sink.url.replace("http://", "http://svc:pw@")})
    await start(engine_with, rabbit_project, broken)
    await publish(cli, SAMPLES / "a01-admit.hl7")
    [letter] = await dead_letters(broker, rabbit_project, 1)
    assert letter.error_class == "DeliveryError" and letter.attempts == 1  # not 10 redeliveries
    assert "carries credentials" in letter.error and "bug" not in letter.error and "pw@" not in letter.error
    assert sink.requests == []
