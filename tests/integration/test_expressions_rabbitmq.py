"""``expr:`` on the real RabbitMQ: a message whose expression fails is dead-lettered at stage map with the
target and the expression (never the value), and the route worker goes on with the next message."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from middleware.broker import naming
from middleware.broker.base import Broker, OutgoingMessage
from middleware.deadletter import DeadLetter
from middleware.engine import Engine
from middleware.mapping import compile_field
from middleware.project import Project

from ..conftest import Sink
from .conftest import REPO, one_dead_letter

pytestmark = pytest.mark.rabbitmq
SAMPLES = REPO / "samples" / "adt-inbound"
FAILING = "substring(path('PID-5.1'), 0, int(path('PID-5.2')))"  # the given name is no number


def with_expressions(project: Project) -> Project:
    """adt-inbound with patient.name.family of A01 from a failing expression, and of A04 from a working one."""
    route = project.routes["adt-inbound"]
    events = []
    for rule in route.events:
        source = {"patient.admitted": FAILING, "patient.registered": "upper(path('PID-5.1'))"}.get(rule.type)
        if source is not None:
            field = compile_field("patient.name.family", {"expr": source}, route.format, project.lookups)
            rule = dataclasses.replace(rule, fields=tuple(field if f.target == field.target else f
                                                          for f in rule.fields))
        events.append(rule)
    routes = {**project.routes, "adt-inbound": dataclasses.replace(route, events=tuple(events))}
    return dataclasses.replace(project, routes=routes)


async def test_a_failing_expression_dead_letters_at_map_and_the_worker_goes_on(
        rabbit_project: Project, broker: Broker, sink: Sink, tmp_path: Path) -> None:
    project = with_expressions(rabbit_project)
    engine = Engine(project)
    await engine.start()
    try:
        inbound = naming.inbound_queue("ehr.adt", project.settings.queue_prefix)
        for name in ("a01-admit.hl7", "a04-register.hl7"):
            await broker.publish(OutgoingMessage(body=(SAMPLES / name).read_bytes()), queue=inbound)
        await sink.wait_for(1)
        dlq = naming.dead_letter_queue("adt-inbound", project.settings.queue_prefix)
        message = await one_dead_letter(broker, dlq)
        letter = DeadLetter.from_message(message)
        await message.ack()
        assert (letter.stage, letter.error_class) == ("map", "MappingError")
        assert f"patient.name.family: expr {FAILING!r} failed" in letter.error
        assert "Anna" not in letter.error and "Müller" not in letter.error  # no PHI in the reason
        assert letter.body == (SAMPLES / "a01-admit.hl7").read_bytes()
        [(_, body)] = sink.requests  # the A04 after it went through, its family name upper-cased
        event = json.loads(body)
        assert event["type"] == "patient.registered.v1"
        assert event["data"]["patient"]["name"]["family"] == "O^BRIEN"
    finally:
        await engine.stop()
