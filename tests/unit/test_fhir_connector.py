"""The ``fhir`` connector against a local FHIR server that validates what it gets with fhir.resources:
built-in maps for the catalogue events, conditional update / create, transaction bundles, the
OperationOutcome in a rejected event's error, and bearer, OAuth2 and SMART Backend Services auth."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from middleware.delivery import ConnectorSpec, Delivery, RetryPolicy, make_connector
from middleware.delivery.retry import send_with_retry
from middleware.errors import DeliveryError
from middleware.project import check_project, load_project
from middleware.route import transform

from ..fhir_server import FhirServer

REPO = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(attempts=3, initial=0.01, max=0.02, multiplier=2, jitter=0.0)


@cache
def event(route: str, sample: str) -> dict[str, Any]:
    """The first event the shipped route makes of a shipped sample."""
    project = load_project(REPO, {}, offline=True)
    outcome = transform(project.route(route), (REPO / "samples" / route / sample).read_bytes())
    return outcome.events[0]


def delivery(event: dict[str, Any], body: bytes | None = None, content_type: str | None = None) -> Delivery:
    extra = {"content_type": content_type} if content_type else {}
    return Delivery(body=body or orjson.dumps(event), event_id=event["id"], correlation_id="c-1", route="r",
                    event_type=event["type"], **extra)


ADMIT = ("adt-inbound", "a01-admit.hl7")
DISCHARGE = ("adt-inbound", "a03-discharge.hl7")
UPDATE = ("adt-inbound", "a08-update.hl7")
RESULT = ("results-inbound", "oru-r01-lipid-panel.hl7")
ORDER = ("orders-inbound", "oml-o21-blood-culture.hl7")
BOOKED = ("scheduling-inbound", "siu-s12-cardiology.hl7")


@pytest.fixture
async def server() -> AsyncIterator[FhirServer]:
    running = FhirServer()
    await running.start()
    yield running
    await running.stop()


async def send(server: FhirServer, *deliveries: Delivery, retry: RetryPolicy = FAST, **options: Any) -> None:
    connector = make_connector(ConnectorSpec("ehr-fhir", "fhir", {"url": server.url, **options}, retry))
    await connector.start()
    try:
        for item in deliveries:
            await send_with_retry(connector, item, retry)
    finally:
        await connector.close()


async def test_admission_is_a_transaction_of_patient_and_encounter_that_refers_to_it(server: FhirServer) -> None:
    await send(server, delivery(event(*ADMIT)))
    [method, path, headers] = server.requests[0]
    assert (method, path, headers["Content-Type"]) == ("POST", "/fhir", "application/fhir+json")
    [patient] = server.resources("Patient")
    [encounter] = server.resources("Encounter")
    assert patient["identifier"] == [{"system": "urn:middleware:identifier:mrn", "value": "MRN-4711"}]
    assert patient["birthDate"] and patient["name"][0]["family"]
    assert encounter["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert (encounter["status"], encounter["class"]["code"]) == ("in-progress", "IMP")
    assert encounter["location"] == [{"location": {"display": "WARD7 0712 B"}}]


async def test_the_same_event_twice_and_a_discharge_update_the_resources_in_place(server: FhirServer) -> None:
    await send(server, delivery(event(*ADMIT)), delivery(event(*ADMIT)), delivery(event(*DISCHARGE)))
    [patient] = server.resources("Patient")
    [encounter] = server.resources("Encounter")
    assert encounter["status"] == "finished" and encounter["period"]["end"]
    assert encounter["subject"]["reference"] == f"Patient/{patient['id']}"


async def test_a_patient_update_is_one_conditional_put(server: FhirServer) -> None:
    await send(server, delivery(event(*UPDATE)))
    [(method, path, _)] = server.requests
    assert method == "PUT" and path.startswith("/fhir/Patient?identifier=urn:middleware:identifier:mrn")
    [patient] = server.resources("Patient")
    assert patient["identifier"][0]["value"] == event(*UPDATE)["data"]["patient"]["mrn"]


async def test_results_become_observations_without_overwriting_the_patient(server: FhirServer) -> None:
    await send(server, delivery(event(*ADMIT)))
    registered = server.resources("Patient")[0]
    await send(server, delivery(event(*RESULT)), delivery(event(*RESULT)))
    assert server.resources("Patient") == [registered]  # created only if absent: the ORU's PID changes nothing
    observations = server.resources("Observation")
    assert len(observations) == 3  # sent twice: keyed by event id and position, stored once
    cholesterol = next(o for o in observations if o["code"]["coding"][0]["code"] == "2093-3")
    assert cholesterol["valueQuantity"] == {"value": 196, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                                            "code": "mg/dL"}
    assert cholesterol["code"]["coding"][0]["system"] == "http://loinc.org"
    assert {o["status"] for o in observations} == {"final", "preliminary"}
    assert all(o["subject"]["reference"] == f"Patient/{registered['id']}" for o in observations)


async def test_orders_and_appointments_become_service_requests_and_appointments(server: FhirServer) -> None:
    await send(server, delivery(event(*ORDER)), delivery(event(*BOOKED)))
    [order] = server.resources("ServiceRequest")
    [booked] = server.resources("Appointment")
    [patient] = server.resources("Patient")
    assert (order["status"], order["intent"], order["priority"]) == ("active", "order", "stat")
    assert order["identifier"][0]["value"] == "ORD-1002"
    assert booked["status"] == "booked" and booked["start"] == "2026-12-01T09:30:00+01:00"
    assert booked["participant"][0]["actor"]["reference"] == f"Patient/{patient['id']}"


async def test_a_rejected_resource_dead_letters_at_once_with_the_operation_outcome(server: FhirServer) -> None:
    bad = orjson.dumps({"resourceType": "Patient", "birthDate": "31/12/1999",
                        "identifier": [{"system": "urn:x", "value": "1"}]})
    with pytest.raises(DeliveryError) as raised:
        await send(server, delivery(event(*UPDATE), bad, "application/json"))
    error = raised.value
    assert (error.status, error.retryable, error.attempts) == (422, False, 1)
    assert "answered HTTP 422: OperationOutcome error/invalid: Patient.birthDate" in error.message
    assert "at Patient.birthDate" in error.message
    [(method, path, _)] = server.requests  # the delivery's map built a resource: stored by its identifier
    assert (method, path) == ("PUT", "/fhir/Patient?identifier=urn:x%7C1") or path.endswith("urn:x|1")


async def test_an_event_without_a_built_in_map_or_a_mapped_non_resource_is_final(server: FhirServer) -> None:
    merged = {**event(*UPDATE), "type": "patient.merged.v1"}
    with pytest.raises(DeliveryError, match=r"no built-in FHIR map for event type patient\.merged") as raised:
        await send(server, delivery(merged))
    assert not raised.value.retryable
    with pytest.raises(DeliveryError, match="must build a FHIR resource"):
        await send(server, delivery(event(*UPDATE), b'{"mrn": "1"}', "application/json"))
    assert server.requests == []


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)
EVENT_DATA = st.fixed_dictionaries({}, optional={
    "patient": st.fixed_dictionaries({}, optional={"mrn": JSON, "name": JSON, "sex": JSON, "address": JSON}),
    "encounter": JSON, "observations": JSON, "order": JSON, "appointment": JSON, "result": JSON})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["patient.updated.v1", "patient.admitted.v1", "result.reported.v1", "order.placed.v1",
                             "appointment.booked.v1", "patient.merged.v1"]), data=EVENT_DATA | JSON)
def test_any_event_shape_gives_a_request_or_a_final_delivery_error(kind: str, data: Any) -> None:
    connector = make_connector(ConnectorSpec("ehr-fhir", "fhir", {"url": "http://127.0.0.1:9/fhir"}, FAST))
    body = orjson.dumps({"id": "e", "type": kind, "data": data}, option=orjson.OPT_NON_STR_KEYS)
    try:
        method, url, payload, _ = connector._request_for(  # type: ignore[attr-defined]
            Delivery(body=body, event_id="e", correlation_id="c", route="r", event_type=kind))
    except DeliveryError as exc:
        assert not exc.retryable
    else:
        assert method in ("PUT", "POST") and url.startswith("http://127.0.0.1:9/fhir") and orjson.loads(payload)


async def test_a_failing_server_is_retried(server: FhirServer) -> None:
    server.fail_with = [503, 503]
    await send(server, delivery(event(*UPDATE)))
    assert len(server.requests) == 3 and len(server.resources("Patient")) == 1


# -- auth ----------------------------------------------------------------------------------------


async def test_bearer_token_from_headers(server: FhirServer) -> None:
    server.require_token = True
    server.tokens.add("static-token")
    with pytest.raises(DeliveryError, match="answered HTTP 401"):
        await send(server, delivery(event(*UPDATE)))
    await send(server, delivery(event(*UPDATE)), headers={"Authorization": "Bearer static-token"})
    assert len(server.resources("Patient")) == 1


async def test_oauth2_client_credentials(server: FhirServer) -> None:
    server.require_token = True
    server.clients["middleware"] = "s3cret"
    oauth2 = {"token_url": server.token_url, "client_id": "middleware", "client_secret": "s3cret"}
    await send(server, delivery(event(*ADMIT)), delivery(event(*UPDATE)), oauth2=oauth2)
    assert len(server.tokens) == 1 and len(server.resources("Patient")) == 2


def pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
async def test_smart_backend_services_signed_assertion(server: FhirServer, tmp_path: Path, algorithm: str) -> None:
    key = (rsa.generate_private_key(65537, 2048) if algorithm == "RS384" else ec.generate_private_key(ec.SECP384R1()))
    server.require_token = True
    server.clients["bulk-client"] = key.public_key()
    (tmp_path / "key.pem").write_text(pem(key))
    smart = {"token_url": server.token_url, "client_id": "bulk-client", "algorithm": algorithm,
             "private_key_file": str(tmp_path / "key.pem"), "kid": "k1"}
    await send(server, delivery(event(*UPDATE)), smart=smart)
    assert len(server.resources("Patient")) == 1 and len(server.used_jti) == 1
    # an assertion signed with another key is refused by the token endpoint: final, nothing stored twice
    other = rsa.generate_private_key(65537, 2048) if algorithm == "RS384" else ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(DeliveryError, match=r"token endpoint .* answered HTTP 401") as raised:
        without_file = {k: v for k, v in smart.items() if k != "private_key_file"}
        await send(server, delivery(event(*ADMIT)), smart={**without_file, "private_key": pem(other)})
    assert not raised.value.retryable and len(server.resources("Patient")) == 1


# -- connector files -------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    return tmp_path


def test_shipped_fhir_connector_is_valid_and_smart_keys_are_checked_at_their_line(project: Path) -> None:
    loaded, problems = check_project(project, {})
    assert problems == [] and loaded is not None and loaded.connectors["fhir-server"].type == "fhir"
    key = ec.generate_private_key(ec.SECP384R1())
    (project / "smart.pem").write_text(pem(key))
    (project / "connectors" / "fhir-server.yaml").write_text(
        "connector: fhir-server\ntype: fhir\nurl: https://fhir.example.org/r4\nsmart:\n"
        "  token_url: https://fhir.example.org/token\n  client_id: me\n  private_key_file: smart.pem\n"
        "  algorithm: RS384\noauth2: {token_url: https://x.example/t, client_id: a, client_secret: b}\n")
    _, problems = check_project(project, {})
    assert [str(p) for p in problems] == [
        "connectors/fhir-server.yaml:4: smart and oauth2 both set the Authorization header: keep one",
        "connectors/fhir-server.yaml:7: smart: algorithm RS384 needs an RSA private key (use ES384 for an EC key)"]
    text = (project / "connectors" / "fhir-server.yaml").read_text()
    (project / "connectors" / "fhir-server.yaml").write_text(text.replace("RS384", "ES384").split("oauth2")[0])
    _, problems = check_project(project, {})
    assert problems == []


def test_a_connector_with_an_unusable_key_dead_letters_without_a_request() -> None:
    spec = ConnectorSpec("ehr-fhir", "fhir", {"url": "http://127.0.0.1:9/fhir", "smart": {
        "token_url": "http://127.0.0.1:9/token", "client_id": "me", "private_key": "not a key"}}, FAST)
    connector = make_connector(dataclasses.replace(spec))
    assert "smart: the private key is not an unencrypted PEM private key" in connector._misconfigured  # type: ignore[attr-defined]
