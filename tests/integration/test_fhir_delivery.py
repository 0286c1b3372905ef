"""The fhir connector on the real RabbitMQ: an ADT A01 through the adt-inbound route ends as a Patient and an
Encounter on a local FHIR server (checked with fhir.resources); a resource the server rejects is dead-lettered
with its OperationOutcome, and the logs name neither the patient nor the outcome."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
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

from ..fhir_server import FhirServer
from .conftest import REPO

pytestmark = pytest.mark.rabbitmq
SAMPLES = REPO / "samples" / "adt-inbound"

DELIVER = """
deliver:
  - to: fhir-server
    when: {type: [patient.admitted, patient.discharged]}
  - to: fhir-mapped                 # updates in the delivery's own shape, which this server refuses
    when: {type: patient.updated}
    map:
      resourceType: {value: Patient}
      identifier[0].system: {value: "urn:x"}
      identifier[0].value: data.patient.mrn
      birthDate: {template: "born {data.patient.birth_date}"}
"""


@pytest.fixture
async def server() -> AsyncIterator[FhirServer]:
    running = FhirServer(require_token=True)
    running.clients["middleware"] = "s3cret"
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
async def project(tmp_path: Path, amqp_url: str, queue_prefix: str, server: FhirServer) -> Project:
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    route = tmp_path / "routes" / "adt-inbound.yaml"
    text = route.read_text()
    route.write_text(text[:text.index("\ndeliver:")] + DELIVER)
    shipped = (tmp_path / "connectors" / "fhir-server.yaml").read_text()
    oauth2 = ("oauth2:\n  token_url: ${FHIR_TOKEN_URL}\n  client_id: middleware\n  client_secret: s3cret\n"
              "retry: {attempts: 2, backoff: {initial: 0.05, max: 0.1, jitter: 0}}\n")
    (tmp_path / "connectors" / "fhir-server.yaml").write_text(
        shipped.split("headers:")[0] + "identifier_systems: {patient: 'urn:oid:1.2.3.4.5.1'}\n" + oauth2)
    (tmp_path / "connectors" / "fhir-mapped.yaml").write_text(
        "connector: fhir-mapped\ntype: fhir\nurl: ${FHIR_URL}\n" + oauth2)
    env = {**os.environ, "MIDDLEWARE_BROKER_URL": amqp_url, "MIDDLEWARE_QUEUE_PREFIX": queue_prefix,
           "FHIR_URL": server.url, "FHIR_TOKEN_URL": server.token_url, "MLLP_PORT": "0", "METRICS_PORT": "0",
           "HTTP_INGEST_PORT": "0", "HTTP_INGEST_TOKEN": "t", "AUDIT_LOG": str(tmp_path / "audit.log")}
    loaded = load_project(tmp_path, env)
    return dataclasses.replace(loaded, settings=dataclasses.replace(loaded.settings, ingest={}),
                               routes={"adt-inbound": loaded.routes["adt-inbound"]})


@pytest.fixture
async def broker(project: Project) -> AsyncIterator[Broker]:
    client = make_broker(project.settings.broker_url)
    await client.connect()
    yield client
    await topology.delete(client, Topology.of(project.routes.values(), project.settings.queue_prefix))
    await client.close()


async def test_a01_and_a03_end_as_patient_and_encounter_and_a_rejected_update_dead_letters(
        project: Project, broker: Broker, server: FhirServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="middleware")
    engine = Engine(project)
    await engine.start()
    try:
        inbound = naming.inbound_queue("ehr.adt", project.settings.queue_prefix)
        for name in ("a01-admit.hl7", "a03-discharge.hl7", "a08-update.hl7"):
            await broker.publish(OutgoingMessage(body=(SAMPLES / name).read_bytes()), queue=inbound)
            await asyncio.sleep(0.3)  # the discharge after the admission, as the EHR sent them
        dlq = naming.dead_letter_queue("adt-inbound", project.settings.queue_prefix)
        for _ in range(200):
            if (await broker.queue_info(dlq)).messages and len(server.requests) >= 3:
                break
            await asyncio.sleep(0.05)
        [patient] = server.resources("Patient")
        [encounter] = server.resources("Encounter")
        assert patient["identifier"][0] == {"system": "urn:oid:1.2.3.4.5.1", "value": "MRN-4711"}
        assert encounter["subject"]["reference"] == f"Patient/{patient['id']}"
        assert encounter["status"] == "finished"  # the A03 updated the A01's encounter in place
        assert all(h["Authorization"].startswith("Bearer ") for _, _, h in server.requests)

        message = await broker.get(dlq)
        assert message is not None
        letter = DeadLetter.from_message(message)
        await message.ack()
        assert (letter.stage, letter.connector, letter.attempts) == ("deliver", "fhir-mapped", 1)
        assert "answered HTTP 422: OperationOutcome error/invalid: Patient.birthDate" in letter.error
        assert ("PUT", "/fhir/Patient?identifier=urn:x%7CMRN-5120") in [(m, p) for m, p, _ in server.requests] or \
            ("PUT", "/fhir/Patient?identifier=urn:x|MRN-5120") in [(m, p) for m, p, _ in server.requests]
        patient_data = ("MRN-5120", "Brien", "1999")
        logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
        assert "dead-lettered" in logged and not any(value in logged for value in patient_data)
        assert "OperationOutcome" not in logged
    finally:
        await engine.stop()
