"""Per-delivery ``when:`` and outbound ``map:`` on the real RabbitMQ: one ADT route sends A01s (mapped) to
one local sink and every event to another; an event whose map fails is dead-lettered, never sent."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from middleware.broker import naming
from middleware.broker.base import Broker, OutgoingMessage
from middleware.deadletter import DeadLetter
from middleware.engine import Engine
from middleware.project import Project

from ..conftest import Sink
from .conftest import REPO, adt_project, one_dead_letter

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
def rabbit_project(tmp_path: Path, rabbit_env: dict[str, str], archive: Sink) -> Project:
    """adt-inbound alone, A01s mapped to the sink (case management), every event to the archive (CDR)."""
    return adt_project(tmp_path, {**rabbit_env, "CDR_URL": archive.url}, DELIVER)


async def test_a01s_go_mapped_to_one_sink_and_everything_to_the_other(rabbit_project: Project, broker: Broker,
                                                                      sink: Sink, archive: Sink) -> None:
    engine = Engine(rabbit_project)
    await engine.start()
    try:
        inbound = naming.inbound_queue("ehr.adt", rabbit_project.settings.queue_prefix)
        for name in ("a01-admit.hl7", "a08-update.hl7", "a03-discharge.hl7"):
            await broker.publish(OutgoingMessage(body=(SAMPLES / name).read_bytes()), queue=inbound)
        await archive.wait_for(3)
        dlq = naming.dead_letter_queue("adt-inbound", rabbit_project.settings.queue_prefix)
        message = await one_dead_letter(broker, dlq)  # the A01's map needs a discharge time it does not have
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
        rule = rabbit_project.routes["adt-inbound"].deliver[0]
        assert rule.outbound is not None and rule.outbound.map is not None
        fixed = dataclasses.replace(rule.outbound.map, rules=rule.outbound.map.rules[:2])
        engine_route = dataclasses.replace(rabbit_project.routes["adt-inbound"], deliver=(
            dataclasses.replace(rule, outbound=dataclasses.replace(rule.outbound, map=fixed)),
            rabbit_project.routes["adt-inbound"].deliver[1]))
        await engine.stop()
        engine = Engine(dataclasses.replace(rabbit_project, routes={"adt-inbound": engine_route}))
        await engine.start()
        await broker.publish(OutgoingMessage(body=(SAMPLES / "a01-admit.hl7").read_bytes()), queue=inbound)
        await sink.wait_for(1)
        headers, body = sink.requests[0]
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"mrn": "MRN-4711", "bed": "WARD7/0712/B"}
        assert headers["Idempotency-Key"]  # the event id still travels in the headers
    finally:
        await engine.stop()
