"""FHIR ingest on the real RabbitMQ: a 1,000-entry transaction Bundle split by ``middleware publish`` and by
the HTTP endpoint (one message per entry, positions 1..1000), the engine turning the entries into events
whose patient is the Patient entry the Observations name by urn:uuid; a subscription heartbeat on the
HTTP endpoint marks the feed alive and publishes nothing; an NDJSON file published line by line."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from middleware.broker import naming
from middleware.broker.amqp import AmqpBroker
from middleware.broker.base import Broker, IncomingMessage
from middleware.engine import Engine
from middleware.ingest import HttpListener
from middleware.ingest.http import HttpGateway
from middleware.observe import Metrics
from middleware.project import Project

from ..conftest import Sink

pytestmark = pytest.mark.rabbitmq

TOKEN = "fhir-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
SUBSCRIPTION = "https://ehr.example.org/fhir/Subscription/adt-feed"


def transaction(entries: int, bundle_id: str = "tx-1000") -> dict[str, Any]:
    """A transaction Bundle: a Patient (urn:uuid, MR identifier) then Observations whose subject names it."""
    patient = {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000000",
               "resource": {"resourceType": "Patient", "identifier": [
                   {"type": {"coding": [{"code": "MR"}]}, "value": "MRN-TX-1"}], "name": [{"family": "Kato"}]},
               "request": {"method": "POST", "url": "Patient"}}
    observations = [{"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{n:012d}",
                     "resource": {"resourceType": "Observation", "status": "final",
                                  "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                                  "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000000"},
                                  "effectiveDateTime": "2026-11-24T08:00:00Z",
                                  "valueQuantity": {"value": 60 + n % 40, "unit": "/min"}},
                     "request": {"method": "POST", "url": "Observation"}} for n in range(1, entries)]
    return {"resourceType": "Bundle", "id": bundle_id, "type": "transaction", "entry": [patient, *observations]}


def inbound(project: Project) -> str:
    return naming.inbound_queue(project.routes["fhir-inbound"].source_queue, project.settings.queue_prefix)


async def drain(broker: Broker, queue: str) -> list[IncomingMessage]:
    messages = []
    while (message := await broker.get(queue)) is not None:
        await message.ack()
        messages.append(message)
    return messages


def assert_split(messages: list[IncomingMessage], total: int) -> None:
    assert [m.headers["x-mw-batch-position"] for m in messages] == list(range(1, total + 1))
    assert {m.headers["x-mw-batch-total"] for m in messages} == {total}
    assert {(m.headers["x-mw-bundle-id"], m.headers["x-mw-bundle-type"]) for m in messages} == {
        ("tx-1000", "transaction")}
    # publish names the batch by the file's digest and keeps the bundle's own in x-mw-batch-sender-id
    assert {m.headers.get("x-mw-batch-sender-id", m.headers["x-mw-batch-id"]) for m in messages} == {"Bundle/tx-1000"}
    assert messages[7].headers["x-mw-fullurl"] == "urn:uuid:00000000-0000-4000-8000-000000000007"
    assert [orjson.loads(m.body)["entry"][0]["resource"]["resourceType"] for m in messages[:2]] == [
        "Patient", "Observation"]


async def test_publish_splits_a_1000_entry_transaction_bundle_and_the_route_resolves_the_patient(
        cli: Callable[..., subprocess.CompletedProcess[str]], broker: Broker, rabbit_project: Project,
        sink: Sink, tmp_path: Path) -> None:
    path = tmp_path / "transaction.json"
    path.write_bytes(orjson.dumps(transaction(1000), option=orjson.OPT_INDENT_2))
    result = cli("publish", "--queue", "fhir.inbound", str(path))
    lines = result.stdout.splitlines()  # one line per entry: correlation id and file#position
    assert len(lines) == 1000 and lines[-1].endswith("transaction.json#1000")
    messages = [message for _ in range(1001) if (message := await broker.get(inbound(rabbit_project))) is not None]
    assert_split(messages, 1000)
    for message in messages:  # back on the queue for the engine, as they are (body, headers)
        await message.hand_back()
    engine = Engine(rabbit_project)
    await engine.start()
    try:
        await sink.wait_for(1000, timeout=120)
    finally:
        await engine.stop()
    events = [orjson.loads(body) for _, body in sink.requests]
    assert sorted(e["type"] for e in events) == ["patient.registered.v1"] + ["result.reported.v1"] * 999
    assert {e["data"]["patient"]["mrn"] for e in events} == {"MRN-TX-1"}  # every urn:uuid subject resolved
    assert len({e["id"] for e in events}) == 1000


@pytest.fixture
async def gateway(rabbit_project: Project, broker: Broker) -> AsyncIterator[tuple[HttpGateway, Metrics]]:
    connection = AmqpBroker(rabbit_project.settings.broker_url)
    await connection.connect()
    metrics = Metrics()
    listener = HttpListener(name="fhir", port=0, bearer_tokens=(TOKEN,), routes=("fhir-inbound",))
    started = HttpGateway(listener, connection, rabbit_project.settings, rabbit_project.routes, metrics)
    await started.start()
    yield started, metrics
    await started.stop()
    await connection.close()


async def test_a_1000_entry_bundle_posted_is_one_202_with_1000_message_ids(
        gateway: tuple[HttpGateway, Metrics], broker: Broker, rabbit_project: Project) -> None:
    http, _ = gateway
    async with aiohttp.ClientSession() as client, client.post(
            f"{http.base_url}/v1/routes/fhir-inbound/messages", data=orjson.dumps(transaction(1000)),
            headers=AUTH) as response:
        assert response.status == 202, await response.text()
        answer = await response.json()
    assert len(answer["message_ids"]) == 1000 and "dead_lettered" not in answer
    messages = await drain(broker, inbound(rabbit_project))
    assert [m.message_id for m in messages] == answer["message_ids"]
    assert_split(messages, 1000)


def notification(kind: str, *focus: dict[str, Any]) -> bytes:
    status = {"resourceType": "SubscriptionStatus", "status": "active", "type": kind,
              "eventsSinceSubscriptionStart": "5", "subscription": {"reference": SUBSCRIPTION},
              "topic": "http://example.org/topics/patient-admission"}
    entries = [{"fullUrl": "urn:uuid:11111111-0000-4000-8000-000000000000", "resource": status}]
    entries += [{"fullUrl": f"https://ehr.example.org/fhir/Patient/{r['id']}", "resource": r} for r in focus]
    return orjson.dumps({"resourceType": "Bundle", "id": f"n-{kind}", "type": "history", "entry": entries})


async def test_a_subscription_heartbeat_marks_the_feed_alive_and_a_notification_publishes_its_focus(
        gateway: tuple[HttpGateway, Metrics], broker: Broker, rabbit_project: Project) -> None:
    http, metrics = gateway
    alive = "middleware_feed_heartbeat_timestamp_seconds"
    assert metrics.registry.get_sample_value(alive, {"route": "fhir-inbound"}) is None
    address = f"{http.base_url}/v1/routes/fhir-inbound/messages"
    async with aiohttp.ClientSession() as client:
        for kind in ("handshake", "heartbeat"):
            async with client.post(address, data=notification(kind), headers=AUTH) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["message_ids"] == [] and (await response.json())["feed"] == kind
        beat = metrics.registry.get_sample_value(alive, {"route": "fhir-inbound"})
        assert beat is not None and beat > 1.7e9
        assert await drain(broker, inbound(rabbit_project)) == []  # nothing published
        focus = {"resourceType": "Patient", "id": "77663", "identifier": [{"value": "MRN-N-1"}]}
        async with client.post(address, data=notification("event-notification", focus), headers=AUTH) as response:
            assert response.status == 202 and len((await response.json())["message_ids"]) == 1
    [message] = await drain(broker, inbound(rabbit_project))
    assert orjson.loads(message.body)["entry"][0]["resource"] == focus
    assert message.headers["x-mw-subscription"] == SUBSCRIPTION and message.headers["x-mw-bundle-type"] == "history"


async def test_an_ndjson_file_publishes_one_resource_per_line_and_a_bad_line_dead_letters_alone(
        cli: Callable[..., subprocess.CompletedProcess[str]], broker: Broker, rabbit_project: Project,
        tmp_path: Path) -> None:
    path = tmp_path / "Patient.ndjson"
    lines = [json.dumps({"resourceType": "Patient", "id": str(n), "identifier": [{"value": f"M{n}"}]})
             for n in range(5)]
    lines.insert(3, '{"resourceType": "Patient", ')
    path.write_text("\n".join(lines) + "\n")
    cli("publish", "--queue", "fhir.inbound", str(path))
    messages = await drain(broker, inbound(rabbit_project))
    assert [orjson.loads(m.body)["id"] for m in messages] == ["0", "1", "2", "3", "4"]
    assert [m.headers["x-mw-batch-position"] for m in messages] == [1, 2, 3, 5, 6]
    [dead] = await drain(broker, naming.dead_letter_queue("fhir-inbound", rabbit_project.settings.queue_prefix))
    assert dead.headers.get("x-mw-batch-position") == 4
