"""Event ids: UUIDv5 of route + source identity + event type + index (DESIGN.md, "Canonical events").

The same input gives the same ids; a different sender, patient, resource type, resource version, batch
record or event type gives different ones -- even when senders reuse control ids such as ``1001``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from middleware.broker import make_broker, naming
from middleware.broker.base import IncomingMessage, OutgoingMessage
from middleware.envelope import event_id
from middleware.formats import get_format
from middleware.observe import Metrics
from middleware.project import Project, load_project
from middleware.route import MessageContext, transform
from middleware.workers import RouteWorker

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {})


def adt(*, sender: str = "EPIC", facility: str = "GHH", control_id: str = "1001", sent: str = "20261124083000",
        kind: str = "ADT^A01", mrn: str = "MRN-4711", family: str = "Doe") -> bytes:
    return (f"MSH|^~\\&|{sender}|{facility}|CASEMGR|GHH|{sent}||{kind}|{control_id}|P|2.5.1\r"
            f"EVN|{kind[-3:]}|20261124082900\r"
            f"PID|1||{mrn}^^^{facility}^MR||{family}^Jane||19840312|F\r"
            "PV1|1|I|WARD7^0712^B^GHH" + "|" * 16 + "V-9001\r").encode()


def hl7_ids(project: Project, raw: bytes, context: MessageContext | None = None) -> list[str]:
    return [e["id"] for e in transform(project.routes["adt-inbound"], raw, context).events]


def fhir_ids(project: Project, resource: Mapping[str, Any]) -> list[str]:
    return [e["id"] for e in transform(project.routes["fhir-inbound"], orjson.dumps(resource)).events]


# -- HL7 v2 -------------------------------------------------------------------------------------

def test_same_message_gives_the_same_id_whatever_the_transport_says(project: Project) -> None:
    raw = adt()
    first = hl7_ids(project, raw, MessageContext(correlation_id="a", message_id="amqp-1"))
    again = hl7_ids(project, raw + b"\r\n", MessageContext(correlation_id="b", message_id="amqp-2"))
    assert len(first) == 1 and first == again
    assert uuid.UUID(first[0]).version == 5


def test_two_senders_reusing_control_id_1001_give_two_patients_two_ids(project: Project) -> None:
    epic = hl7_ids(project, adt(sender="EPIC", facility="GHH", mrn="MRN-1", family="Doe"))
    cerner = hl7_ids(project, adt(sender="CERNER", facility="GHH", mrn="MRN-2", family="Roe"))
    other_site = hl7_ids(project, adt(sender="EPIC", facility="NORTH", mrn="MRN-3", family="Poe"))
    assert len({*epic, *cerner, *other_site}) == 3


def test_a_sender_reusing_a_control_id_at_another_time_gets_another_id(project: Project) -> None:
    assert hl7_ids(project, adt(sent="20261124083000")) != hl7_ids(project, adt(sent="20261125091500"))


def test_another_event_type_from_the_same_source_identity_gets_another_id(project: Project) -> None:
    admitted = transform(project.routes["adt-inbound"], adt(kind="ADT^A01")).events
    registered = transform(project.routes["adt-inbound"], adt(kind="ADT^A04")).events
    assert [e["type"] for e in admitted + registered] == ["patient.admitted.v1", "patient.registered.v1"]
    assert admitted[0]["id"] != registered[0]["id"]


def test_a_sender_reusing_a_control_id_within_one_timestamp_still_gives_two_patients_two_ids(
        project: Project) -> None:
    first = hl7_ids(project, adt(mrn="MRN-1", family="Doe"))
    second = hl7_ids(project, adt(mrn="MRN-2", family="Roe"))  # same MSH-3, MSH-4, MSH-10 and MSH-7
    assert len({*first, *second}) == 2


def test_messages_without_a_control_id_are_told_apart_by_their_content(project: Project) -> None:
    first, second = adt(control_id="", mrn="MRN-1"), adt(control_id="", mrn="MRN-2")
    assert hl7_ids(project, first) == hl7_ids(project, first)
    assert hl7_ids(project, first) != hl7_ids(project, second)


def test_hl7_source_identity_is_msh_3_4_10_7_as_sent_and_a_digest_of_the_segments() -> None:
    hl7 = get_format("hl7v2")
    raw = adt(sender="LAB^1.2.3^ISO", control_id="X\\F\\1")
    identity = hl7.parse(raw).source_identity()
    assert identity[:4] == ("LAB^1.2.3^ISO", "GHH", "X\\F\\1", "20261124083000")
    assert identity[4] == "sha256:" + hashlib.sha256(raw.rstrip(b"\r")).hexdigest()
    reframed = b"\x0b" + raw.replace(b"\r", b"\r\n") + b"\x1c\r"  # MLLP framing, CRLF: the same message
    assert hl7.parse(reframed).source_identity() == identity


def test_an_each_view_keeps_the_message_identity() -> None:
    hl7 = get_format("hl7v2")
    message = hl7.parse(adt() + b"OBX|1|NM|K||5.9\rOBX|2|NM|NA||140\r")
    views = hl7.each(message, "OBX")
    assert len(views) == 2 and {v.source_identity() for v in views} == {message.source_identity()}


# -- FHIR ---------------------------------------------------------------------------------------

PATIENT = {"resourceType": "Patient", "id": "example", "meta": {"versionId": "1"},
           "identifier": [{"value": "MRN-1"}], "name": [{"family": "Doe", "given": ["Jane"]}],
           "gender": "female", "birthDate": "1984-03-12"}
OBSERVATION = {"resourceType": "Observation", "id": "example", "meta": {"versionId": "1"}, "status": "final",
               "code": {"coding": [{"code": "2823-3"}]}, "subject": {"identifier": {"value": "MRN-1"}},
               "effectiveDateTime": "2026-11-24T08:55:00+01:00", "valueQuantity": {"value": 5.9}}


def test_fhir_resources_sharing_an_id_across_types_get_different_ids(project: Project) -> None:
    patient, observation = fhir_ids(project, PATIENT), fhir_ids(project, OBSERVATION)
    assert len(patient) == len(observation) == 1 and patient != observation


def test_every_version_of_a_fhir_resource_gets_its_own_id(project: Project) -> None:
    v1 = fhir_ids(project, PATIENT)
    v2 = fhir_ids(project, {**PATIENT, "meta": {"versionId": "2"}, "birthDate": "1984-03-13"})
    assert v1 != v2
    assert fhir_ids(project, PATIENT) == v1  # the same version again: the same id


def test_without_version_id_the_content_decides(project: Project) -> None:
    unversioned = {k: v for k, v in PATIENT.items() if k != "meta"}
    changed = {**unversioned, "gender": "other"}
    route = project.routes["fhir-inbound"]
    reordered = orjson.dumps(dict(reversed(list(unversioned.items()))), option=orjson.OPT_INDENT_2)
    assert [e["id"] for e in transform(route, reordered).events] == fhir_ids(project, unversioned)
    assert fhir_ids(project, changed) != fhir_ids(project, unversioned)


def test_fhir_source_identity_is_type_id_and_version() -> None:
    fhir = get_format("fhir")
    assert fhir.parse(orjson.dumps(PATIENT)).source_identity() == ("Patient", "example", "1")
    kind, rid, digest = fhir.parse(orjson.dumps({"resourceType": "Patient"})).source_identity()
    assert (kind, rid) == ("Patient", "") and digest.startswith("sha256:")


def test_json_documents_sharing_an_id_differ_by_content() -> None:
    json_format = get_format("json")
    first = json_format.parse(b'{"type": "referral", "id": "R-1", "specialty": "cardiology"}').source_identity()
    same = json_format.parse(b'{"specialty":"cardiology","id":"R-1","type":"referral"}').source_identity()
    other = json_format.parse(b'{"type": "referral", "id": "R-1", "specialty": "neurology"}').source_identity()
    assert first == same and first != other and first[:2] == ("referral", "R-1")


# -- records of a batch -------------------------------------------------------------------------

def test_batch_records_are_told_apart_by_batch_id_and_position(project: Project) -> None:
    raw = adt()
    first = hl7_ids(project, raw, MessageContext(batch_id="sha256:abc", batch_position="1"))
    assert hl7_ids(project, raw, MessageContext(batch_id="sha256:abc", batch_position="1")) == first
    assert hl7_ids(project, raw, MessageContext(batch_id="sha256:abc", batch_position="2")) != first
    assert hl7_ids(project, raw, MessageContext(batch_id="sha256:def", batch_position="1")) != first
    assert hl7_ids(project, raw) != first


# -- the rule itself ----------------------------------------------------------------------------

def test_identity_parts_cannot_run_into_each_other() -> None:
    assert event_id("r", ("a\x1fb",), "t.v1", 0) != event_id("r", ("a", "b"), "t.v1", 0)
    assert event_id("r", ("a", ""), "t.v1", 0) != event_id("r", ("a",), "t.v1", 0)


_part = st.text(max_size=8)


@given(st.tuples(_part, st.lists(_part, max_size=4), _part, st.integers(0, 5)),
       st.tuples(_part, st.lists(_part, max_size=4), _part, st.integers(0, 5)))
def test_different_inputs_never_share_an_id(a: tuple[str, list[str], str, int],
                                            b: tuple[str, list[str], str, int]) -> None:
    assert (event_id(*a) == event_id(*b)) == (a == b)


# -- the route worker passes the batch headers on (real RabbitMQ) --------------------------------

@pytest.mark.rabbitmq
async def test_worker_gives_batch_records_with_the_same_bytes_their_own_ids(project: Project, amqp_url: str,
                                                                            queue_prefix: str) -> None:
    route = dataclasses.replace(project.routes["adt-inbound"], deliver=())
    broker = make_broker(amqp_url)
    await broker.connect()
    inbound = naming.inbound_queue(route.source_queue, queue_prefix)
    exchange = naming.events_exchange(queue_prefix)
    probe = f"{queue_prefix}probe"
    dlq = naming.dead_letter_queue(route.name, queue_prefix)
    try:
        await broker.declare_queue(dlq, kind="dead-letter")
        await broker.declare_queue(inbound, dead_letter_to=dlq)
        await broker.declare_exchange(exchange)
        await broker.declare_queue(probe)
        await broker.bind(probe, exchange, f"{route.name}.#")
        worker = RouteWorker(route, broker, Metrics(), prefix=queue_prefix)
        raw = adt()
        for position in ("1", "2", "1"):
            headers = {"x-mw-batch-id": "sha256:feed", "x-mw-batch-position": int(position)}
            await broker.publish(OutgoingMessage(body=raw, headers=headers), queue=inbound)
        consumer = await broker.consume(inbound, worker.handle)
        ids: list[str] = []
        for _ in range(200):
            message: IncomingMessage | None = await broker.get(probe)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            ids.append(orjson.loads(message.body)["id"])
            await message.ack()
            if len(ids) == 3:
                break
        await consumer.cancel()
        assert sorted(Counter(ids).values()) == [1, 2]  # position 1 twice: one id; position 2: another
    finally:
        for queue in (inbound, probe, dlq):
            await broker.delete_queue(queue)
        await broker.delete_exchange(exchange)
        await broker.close()
