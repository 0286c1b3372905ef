"""The fhir connector on the real RabbitMQ: an ADT A01 through the adt-inbound route ends as a Patient and an
Encounter on a local FHIR server (checked with fhir.resources); a resource the server rejects is dead-lettered
with its OperationOutcome, and the logs name neither the patient nor the outcome."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from middleware.broker import naming
from middleware.broker.base import Broker, OutgoingMessage
from middleware.deadletter import DeadLetter
from middleware.engine import Engine
from middleware.project import Project

from ..fhir_server import FhirServer
from .conftest import REPO, adt_project

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
def rabbit_project(tmp_path: Path, rabbit_env: dict[str, str], server: FhirServer) -> Project:
    """adt-inbound alone, delivering to the FHIR server through two fhir connectors (OAuth2 client credentials)."""
    shipped = (REPO / "connectors" / "fhir-server.yaml").read_text()
    oauth2 = ("oauth2:\n  token_url: ${FHIR_TOKEN_URL}\n  client_id: middleware\n  client_secret: s3cret\n"
              "retry: {attempts: 2, backoff: {initial: 0.05, max: 0.1, jitter: 0}}\n")
    connectors = {
        "fhir-server.yaml": shipped.split("headers:")[0] + "identifier_systems: {patient: 'urn:oid:1.2.3.4.5.1'}\n"
        + oauth2,
        "fhir-mapped.yaml": "connector: fhir-mapped\ntype: fhir\nurl: ${FHIR_URL}\n" + oauth2}
    env = {**rabbit_env, "FHIR_URL": server.url, "FHIR_TOKEN_URL": server.token_url}
    return adt_project(tmp_path, env, DELIVER, connectors)


async def test_a01_and_a03_end_as_patient_and_encounter_and_a_rejected_update_dead_letters(
        rabbit_project: Project, broker: Broker, server: FhirServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="middleware")
    engine = Engine(rabbit_project)
    await engine.start()
    try:
        inbound = naming.inbound_queue("ehr.adt", rabbit_project.settings.queue_prefix)
        for name in ("a01-admit.hl7", "a03-discharge.hl7", "a08-update.hl7"):
            await broker.publish(OutgoingMessage(body=(SAMPLES / name).read_bytes()), queue=inbound)
            await asyncio.sleep(0.3)  # the discharge after the admission, as the EHR sent them
        dlq = naming.dead_letter_queue("adt-inbound", rabbit_project.settings.queue_prefix)
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
