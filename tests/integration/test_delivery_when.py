"""Per-delivery ``when:`` and outbound ``map:`` on the real RabbitMQ: one ADT route sends A01s (mapped) to
one local sink and every event to another; an event whose map fails is dead-lettered, never sent."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from middleware import topology
from middleware.broker import make_broker, naming
from middleware.broker.base import Broker, OutgoingMessage
from middleware.deadletter import DeadLetter
from middleware.engine import Engine
from middleware.project import Project, load_project
from middleware.topology import Topology

from ..conftest import Sink
from .conftest import REPO

pytestmark = pytest.mark.rabbitmq
SAMPLES = REPO / "samples" / "adt-inbound"

DELIVER = """
deliver:
  - to: case-management          # the bed board: admissions only, in its own shape
    when: {type: patient.admitted, exists: data.encounter.location.bed}
    map:
      mrn: data.patient.mrn
      bed:
        template: "{data.encounter.location.point_of_care}/{data.encounter.location.room}/{data.encounter.location.bed}"
      discharge: {path: data.encounter.discharged_at, required: true}
  - to: clinical-data-repository  # the archive: everything, as CloudEvents
"""


@pytest.fixture
async def archive() -> AsyncIterator[Sink]:
    server = Sink()
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


@pytest.fixture
async def project(tmp_path: Path, amqp_url: str, queue_prefix: str, sink: Sink, archive: Sink) -> Project:
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    route = tmp_path / "routes" / "adt-inbound.yaml"
    text = route.read_text()
    route.write_text(text[:text.index("\ndeliver:")] + DELIVER)
    env = {**os.environ, "MIDDLEWARE_BROKER_URL": amqp_url, "MIDDLEWARE_QUEUE_PREFIX": queue_prefix,
           "CASE_MANAGEMENT_URL": sink.url, "CDR_URL": archive.url, "MLLP_PORT": "0", "METRICS_PORT": "0",
           "HTTP_INGEST_PORT": "0", "HTTP_INGEST_TOKEN": "t", "AUDIT_LOG": str(tmp_path / "audit.log")}
    loaded = load_project(tmp_path, env)
    settings = dataclasses.replace(loaded.settings, ingest={})  # no gateways: the test publishes itself
    return dataclasses.replace(loaded, settings=settings,
                               routes={"adt-inbound": loaded.routes["adt-inbound"]})


@pytest.fixture
async def broker(project: Project) -> AsyncIterator[Broker]:
    client = make_broker(project.settings.broker_url)
    await client.connect()
    yield client
    await topology.delete(client, Topology.of(project.routes.values(), project.settings.queue_prefix))
    await client.close()


async def test_a01s_go_mapped_to_one_sink_and_everything_to_the_other(project: Project, broker: Broker,
                                                                      sink: Sink, archive: Sink) -> None:
    engine = Engine(project)
    await engine.start()
    try:
        inbound = naming.inbound_queue("ehr.adt", project.settings.queue_prefix)
        for name in ("a01-admit.hl7", "a08-update.hl7", "a03-discharge.hl7"):
            await broker.publish(OutgoingMessage(body=(SAMPLES / name).read_bytes()), queue=inbound)
        await archive.wait_for(3)
        dlq = naming.dead_letter_queue("adt-inbound", project.settings.queue_prefix)
        for _ in range(200):  # the A01's map needs a discharge time it does not have: a dead letter
            if (await broker.queue_info(dlq)).messages:
                break
            await asyncio.sleep(0.05)
        message = await broker.get(dlq)
        assert message is not None
        letter = DeadLetter.from_message(message)
        await message.ack()
        assert (letter.stage, letter.connector, letter.error_class) == ("deliver", "case-management", "MappingError")
        assert "discharge: required value missing" in letter.error
        assert json.loads(letter.body)["type"] == "patient.admitted.v1"  # the event as published, not mapped
        assert sink.requests == []
        archived = sorted(json.loads(body)["type"] for _, body in archive.requests)
        assert archived == ["patient.admitted.v1", "patient.discharged.v1", "patient.updated.v1"]
        assert all(h["Content-Type"] == "application/cloudevents+json" for h, _ in archive.requests)
        skipped = engine.metrics.value("middleware_deliveries_skipped", route="adt-inbound",
                                       connector="case-management")
        for _ in range(100):
            if skipped == 2:
                break
            await asyncio.sleep(0.05)
            skipped = engine.metrics.value("middleware_deliveries_skipped", route="adt-inbound",
                                           connector="case-management")
        assert skipped == 2  # the A08 and A03 events, acked without a request

        # the same route without the failing target: the A01 reaches the bed board in its own shape
        rule = project.routes["adt-inbound"].deliver[0]
        assert rule.outbound is not None and rule.outbound.map is not None
        fixed = dataclasses.replace(rule.outbound.map, rules=rule.outbound.map.rules[:2])
        engine_route = dataclasses.replace(project.routes["adt-inbound"], deliver=(
            dataclasses.replace(rule, outbound=dataclasses.replace(rule.outbound, map=fixed)),
            project.routes["adt-inbound"].deliver[1]))
        await engine.stop()
        engine = Engine(dataclasses.replace(project, routes={"adt-inbound": engine_route}))
        await engine.start()
        await broker.publish(OutgoingMessage(body=(SAMPLES / "a01-admit.hl7").read_bytes()), queue=inbound)
        await sink.wait_for(1)
        headers, body = sink.requests[0]
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"mrn": "MRN-4711", "bed": "WARD7/0712/B"}
        assert headers["Idempotency-Key"]  # the event id still travels in the headers
    finally:
        await engine.stop()
