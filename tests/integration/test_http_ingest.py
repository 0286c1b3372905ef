"""The HTTP ingest gateway on the real RabbitMQ, called by a real aiohttp client: every status code,
auth, TLS and client certificates, Idempotency-Key, a 1,000-record batch, 202 only after the confirm,
a broker cut mid-request, and the engine starting the shipped listener."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from middleware.broker import naming
from middleware.broker.amqp import AmqpBroker
from middleware.broker.base import Broker, IncomingMessage, OutgoingMessage
from middleware.deadletter import DeadLetter
from middleware.engine import Engine
from middleware.errors import ConfigError
from middleware.ingest import HttpListener, HttpRateLimit, MllpTls
from middleware.ingest.http import HttpGateway
from middleware.project import Project

from ..conftest import Sink
from . import test_run_failures
from .test_run_failures import assert_untouched, json_lines, run_until_exit, taken_port

pytestmark = pytest.mark.rabbitmq

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
TOKEN = "t0ken-for-tests"
API_KEY = "partner-key-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REFERRAL = (SAMPLES / "referrals-rest" / "cardiology-urgent.json").read_bytes()
JSON_TYPE = {"Content-Type": "application/json"}
ROUTES = ("referrals-rest", "results-inbound", "fhir-inbound")

Start = Callable[..., Awaitable[HttpGateway]]
waiting = test_run_failures.waiting  # the fixture: the project's queues declared, one ADT message waiting


class GatedBroker(AmqpBroker):
    """The real adapter; with ``hold_after`` set, publishes past that many wait for ``gate`` before they are sent,
    and with ``hold_confirms`` every publish returns (its confirm reported) only once ``gate`` is set."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = asyncio.Event()
        self.hold_after: int | None = None
        self.hold_confirms = False
        self.sent = 0
        self.confirmed = 0
        self.reached = asyncio.Event()  # hold_after publishes were sent (or one, with hold_confirms)

    async def publish(self, message: OutgoingMessage, **kwargs: Any) -> None:
        if self.hold_after is not None and self.sent >= self.hold_after:
            self.reached.set()
            await self.gate.wait()
        self.sent += 1
        await super().publish(message, **kwargs)
        if self.hold_confirms:
            self.reached.set()
            await self.gate.wait()
        self.confirmed += 1


@pytest.fixture
async def start(rabbit_project: Project, broker: Broker) -> AsyncIterator[Start]:
    """Start HTTP gateways on port 0 (each on its own connection) for a few shipped routes; stop them after."""
    started: list[tuple[HttpGateway, Broker]] = []

    async def run(**options: Any) -> HttpGateway:
        gateway_broker = GatedBroker(rabbit_project.settings.broker_url)
        await gateway_broker.connect()
        listener = HttpListener(**{"name": "test", "port": 0, "bearer_tokens": (TOKEN,), "routes": ROUTES,
                                   **options})
        gateway = HttpGateway(listener, gateway_broker, rabbit_project.settings, rabbit_project.routes)
        started.append((gateway, gateway_broker))
        await gateway.start()
        return gateway

    yield run
    for gateway, gateway_broker in started:
        await gateway.stop()
        await gateway_broker.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def inbound(project: Project, route: str) -> str:
    return naming.inbound_queue(project.routes[route].source_queue, project.settings.queue_prefix)


def dead_letters(project: Project, route: str) -> str:
    return naming.dead_letter_queue(route, project.settings.queue_prefix)


async def drain(broker: Broker, queue: str) -> list[IncomingMessage]:
    """Every message on ``queue`` (acked)."""
    messages = []
    while (message := await broker.get(queue)) is not None:
        await message.ack()
        messages.append(message)
    return messages


def url(gateway: HttpGateway, route: str = "referrals-rest") -> str:
    return f"{gateway.base_url}/v1/routes/{route}/messages"


def oru(n: int) -> bytes:
    return (f"MSH|^~\\&|LIS|GHH|EPIC|GHH|20261124143000+0100||ORU^R01|HTTP-{n:05d}|P|2.5.1\r"
            f"PID|1||MRN-{n:05d}^^^GHH^MR||Test^Patient\r"
            f"OBR|1|ORD-{n}||2345-7^Glucose^LN\r"
            f"OBX|1|NM|2345-7^Glucose^LN||5.{n % 10}|mmol/L|||||F\r").encode()


def hl7_batch(count: int) -> bytes:
    return (b"FHS|^~\\&|LIS|GHH|EPIC|GHH|20261124180000+0100||||FILE-HTTP-1\r"
            b"BHS|^~\\&|LIS|GHH|EPIC|GHH|20261124180000+0100||||BATCH-HTTP-1\r"
            + b"".join(oru(n) for n in range(1, count + 1))
            + f"BTS|{count}\rFTS|1\r".encode())


# -- 202 and what is on the queue -------------------------------------------------------------

async def test_a_referral_is_202_with_ids_and_on_the_queue_byte_for_byte(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start()
    async with client.post(url(gateway), data=REFERRAL, headers={**AUTH, **JSON_TYPE}) as response:
        assert response.status == 202
        answer = await response.json()
        assert response.headers["X-Correlation-ID"] == answer["correlation_id"]
        assert response.headers["Server"] == "middleware"  # no Python / aiohttp versions
    [message] = await drain(broker, inbound(rabbit_project, "referrals-rest"))
    assert message.body == REFERRAL
    assert answer["message_ids"] == [message.message_id]
    assert message.correlation_id == answer["correlation_id"]
    assert message.headers["x-mw-ingest"] == "http:test"
    assert message.content_type == "application/json"


async def test_a_callers_correlation_id_and_traceparent_are_kept(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = {**AUTH, **JSON_TYPE, "X-Correlation-ID": "referral-batch-77", "traceparent": traceparent}
    async with client.post(url(gateway), data=REFERRAL, headers=headers) as response:
        assert response.status == 202 and response.headers["X-Correlation-ID"] == "referral-batch-77"
    async with client.post(url(gateway), data=REFERRAL, headers={**AUTH, **JSON_TYPE, "traceparent": traceparent}) \
            as response:
        assert (await response.json())["correlation_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"  # the trace id
    first, second = await drain(broker, inbound(rabbit_project, "referrals-rest"))
    assert first.correlation_id == "referral-batch-77" and first.headers["traceparent"] == traceparent
    assert second.correlation_id == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_a_1000_message_hl7_batch_is_one_202_with_1000_ids_in_order(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start()
    async with client.post(url(gateway, "results-inbound"), data=hl7_batch(1000),
                           headers={**AUTH, "Content-Type": "x-application/hl7-v2+er7"}) as response:
        assert response.status == 202, await response.text()
        answer = await response.json()
    assert len(answer["message_ids"]) == 1000 and "dead_lettered" not in answer
    messages = await drain(broker, inbound(rabbit_project, "results-inbound"))
    assert [m.message_id for m in messages] == answer["message_ids"]
    assert [m.headers["x-mw-batch-position"] for m in messages] == list(range(1, 1001))
    assert messages[0].body == oru(1) and messages[999].body == oru(1000)
    assert {m.correlation_id for m in messages} == {answer["correlation_id"]}


async def test_ndjson_and_csv_bodies_are_one_message_per_line_or_row(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start()
    lines = b"\n".join(json.dumps({"referralId": f"REF-{n}", "patient": {"mrn": f"MRN-{n}"}}).encode()
                       for n in range(3))
    async with client.post(url(gateway), data=lines + b"\n",
                           headers={**AUTH, "Content-Type": "application/x-ndjson"}) as response:
        assert response.status == 202 and len((await response.json())["message_ids"]) == 3
    csv_body = b"referralId,priority\r\nREF-10,urgent\r\nREF-11,\r\n"
    async with client.post(url(gateway), data=csv_body, headers={**AUTH, "Content-Type": "text/csv"}) as response:
        assert response.status == 202 and len((await response.json())["message_ids"]) == 2
    messages = await drain(broker, inbound(rabbit_project, "referrals-rest"))
    assert [json.loads(m.body) for m in messages] == [
        {"referralId": "REF-0", "patient": {"mrn": "MRN-0"}}, {"referralId": "REF-1", "patient": {"mrn": "MRN-1"}},
        {"referralId": "REF-2", "patient": {"mrn": "MRN-2"}},
        {"referralId": "REF-10", "priority": "urgent"}, {"referralId": "REF-11"}]
    assert [m.headers["x-mw-http-content-type"] for m in messages] == ["application/x-ndjson"] * 3 + ["text/csv"] * 2


# -- auth -----------------------------------------------------------------------------------------

async def test_auth_missing_is_401_wrong_is_403_right_is_202_and_nothing_is_published_before(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start(api_keys=(API_KEY,))
    async with client.post(url(gateway), data=REFERRAL, headers=JSON_TYPE) as response:
        assert response.status == 401 and response.content_type == "application/problem+json"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["status"] == 401
    for wrong in ({"Authorization": "Bearer not-the-token"}, {"Authorization": f"Bearer {TOKEN}x"},
                  {"X-API-Key": "partner-key-2"}):
        async with client.post(url(gateway), data=REFERRAL, headers={**wrong, **JSON_TYPE}) as response:
            assert response.status == 403, wrong
    assert await drain(broker, inbound(rabbit_project, "referrals-rest")) == []
    for right in (AUTH, {"X-API-Key": API_KEY}):
        async with client.post(url(gateway), data=REFERRAL, headers={**right, **JSON_TYPE}) as response:
            assert response.status == 202
    assert len(await drain(broker, inbound(rabbit_project, "referrals-rest"))) == 2


async def test_a_peer_outside_allowed_peers_is_403(start: Start, client: aiohttp.ClientSession) -> None:
    gateway = await start(allowed_peers=("10.99.0.0/16",))
    async with client.post(url(gateway), data=REFERRAL, headers={**AUTH, **JSON_TYPE}) as response:
        assert response.status == 403 and (await response.json())["type"].endswith("peer-not-allowed")


@dataclasses.dataclass
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path
    client: trustme.LeafCert
    ca: trustme.CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("http-pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key", ca.issue_cert("sender.example"), ca)


def client_context(pki: Pki, *, certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if certificate:
        pki.client.configure_cert(context)
    return context


async def test_tls_with_a_required_client_certificate(start: Start, client: aiohttp.ClientSession, pki: Pki) -> None:
    tls = MllpTls(str(pki.cert_file), str(pki.key_file), str(pki.ca_file), require_client_cert=True)
    gateway = await start(tls=tls)
    assert gateway.base_url.startswith("https://127.0.0.1:")
    async with client.post(url(gateway), data=REFERRAL, headers={**AUTH, **JSON_TYPE},
                           ssl=client_context(pki, certificate=True)) as response:
        assert response.status == 202
    with pytest.raises(aiohttp.ClientError):  # the handshake (or the first read after it) is refused
        async with client.post(url(gateway), data=REFERRAL, headers={**AUTH, **JSON_TYPE},
                               ssl=client_context(pki, certificate=False)) as response:
            await response.read()
    other_ca = trustme.CA()  # a certificate the listener's CA did not sign
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    other_ca.issue_cert("stranger.example").configure_cert(context)
    with pytest.raises(aiohttp.ClientError):
        async with client.post(url(gateway), data=REFERRAL, headers={**AUTH, **JSON_TYPE}, ssl=context) as response:
            await response.read()


async def test_tls_without_client_certificates_takes_any_client(
        start: Start, client: aiohttp.ClientSession, pki: Pki) -> None:
    gateway = await start(tls=MllpTls(str(pki.cert_file), str(pki.key_file)))
    async with client.post(url(gateway), data=REFERRAL, headers={**AUTH, **JSON_TYPE},
                           ssl=client_context(pki, certificate=False)) as response:
        assert response.status == 202
    with pytest.raises(aiohttp.ClientError):  # plain HTTP to a TLS listener
        async with client.post(url(gateway).replace("https://", "http://"), data=REFERRAL,
                               headers={**AUTH, **JSON_TYPE}) as response:
            await response.read()


# -- the error statuses ---------------------------------------------------------------------------

async def test_unknown_route_is_404_and_a_route_the_listener_does_not_take_too(
        start: Start, client: aiohttp.ClientSession) -> None:
    gateway = await start()
    for route in ("no-such-route", "adt-inbound"):  # adt-inbound exists but is not in this listener's routes
        async with client.post(url(gateway, route), data=REFERRAL, headers={**AUTH, **JSON_TYPE}) as response:
            assert response.status == 404
            problem = await response.json()
            assert problem["type"] == "urn:middleware:problem:unknown-route" and route in problem["detail"]


async def test_a_media_type_the_route_does_not_take_is_415(start: Start, client: aiohttp.ClientSession) -> None:
    gateway = await start()
    for route, content_type in (("referrals-rest", "text/plain"), ("referrals-rest", "x-application/hl7-v2+er7"),
                                ("results-inbound", "application/json")):
        async with client.post(url(gateway, route), data=REFERRAL,
                               headers={**AUTH, "Content-Type": content_type}) as response:
            assert response.status == 415, (route, content_type)
            assert "Accept-Post" in response.headers


async def test_a_body_over_max_body_bytes_is_413_with_or_without_content_length(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start(max_body_bytes=1024)
    big = json.dumps({"referralId": "REF-1", "patient": {"mrn": "M"}, "note": "x" * 2000}).encode()
    async with client.post(url(gateway), data=big, headers={**AUTH, **JSON_TYPE}) as response:
        assert response.status == 413

    async def chunks() -> AsyncIterator[bytes]:
        for start_at in range(0, len(big), 256):
            yield big[start_at:start_at + 256]

    async with client.post(url(gateway), data=chunks(), headers={**AUTH, **JSON_TYPE}) as response:
        assert response.status == 413
    assert await drain(broker, inbound(rabbit_project, "referrals-rest")) == []


async def test_over_the_rate_is_429_with_retry_after(start: Start, client: aiohttp.ClientSession) -> None:
    gateway = await start(rate_limit=HttpRateLimit(per_second=0.5, burst=2))
    statuses = []
    for _ in range(3):
        async with client.post(url(gateway), data=REFERRAL, headers={**AUTH, **JSON_TYPE}) as response:
            statuses.append(response.status)
            retry_after = response.headers.get("Retry-After")
    assert statuses == [202, 202, 429]
    assert retry_after is not None and 1 <= int(retry_after) <= 2  # one token comes back in 2 s


async def test_unreadable_json_is_400_and_dead_lettered_with_its_raw_body(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start()
    raw = (SAMPLES / "referrals-rest" / "malformed-truncated.json").read_bytes()
    async with client.post(url(gateway), data=raw, headers={**AUTH, **JSON_TYPE}) as response:
        assert response.status == 400 and response.content_type == "application/problem+json"
        problem = await response.json()
    assert problem["title"] == "Body cannot be read" and "not valid JSON" in problem["detail"]
    assert await drain(broker, inbound(rabbit_project, "referrals-rest")) == []
    [message] = await drain(broker, dead_letters(rabbit_project, "referrals-rest"))
    letter = DeadLetter.from_message(message)
    assert message.body == raw and letter.stage == "parse" and letter.route == "referrals-rest"
    assert letter.correlation_id == problem["correlation_id"]
    assert problem["dead_lettered"][0]["message_id"] == message.message_id


async def test_fhir_without_resource_type_is_422_as_an_operation_outcome_and_dead_lettered(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start()
    raw = (SAMPLES / "fhir-inbound" / "malformed-no-resourcetype.json").read_bytes()
    async with client.post(url(gateway, "fhir-inbound"), data=raw,
                           headers={**AUTH, "Content-Type": "application/fhir+json"}) as response:
        assert response.status == 422 and response.content_type == "application/fhir+json"
        outcome = await response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error" and "resourceType" in outcome["issue"][0]["diagnostics"]
    [message] = await drain(broker, dead_letters(rabbit_project, "fhir-inbound"))
    assert message.body == raw


async def test_a_batch_with_one_broken_message_publishes_the_others_and_names_the_dead_letter(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start()
    body = oru(1) + b"MSH|^~|LIS|broken delimiters\rPID|1\r" + oru(3)
    async with client.post(url(gateway, "results-inbound"), data=body,
                           headers={**AUTH, "Content-Type": "application/hl7-v2"}) as response:
        assert response.status == 202
        answer = await response.json()
    assert len(answer["message_ids"]) == 2 and [d["position"] for d in answer["dead_lettered"]] == [2]
    assert [m.body for m in await drain(broker, inbound(rabbit_project, "results-inbound"))] == [oru(1), oru(3)]
    [letter] = await drain(broker, dead_letters(rabbit_project, "results-inbound"))
    assert letter.message_id == answer["dead_lettered"][0]["message_id"]


async def test_broker_down_is_503_with_retry_after_and_readyz_says_not_ready(
        start: Start, client: aiohttp.ClientSession) -> None:
    gateway = await start()
    async with client.get(f"{gateway.base_url}/readyz") as response:
        assert response.status == 200 and (await response.json())["ready"] is True
    await gateway.broker.close()
    async with client.post(url(gateway), data=REFERRAL, headers={**AUTH, **JSON_TYPE}) as response:
        assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
        assert (await response.json())["type"] == "urn:middleware:problem:broker-unavailable"
    async with client.get(f"{gateway.base_url}/readyz") as response:
        assert response.status == 503
    async with client.get(f"{gateway.base_url}/healthz") as response:
        assert response.status == 200


async def test_no_confirm_within_confirm_timeout_is_503(start: Start, client: aiohttp.ClientSession) -> None:
    gateway = await start(confirm_timeout=0.3)
    gated = gateway.broker
    assert isinstance(gated, GatedBroker)
    gated.hold_confirms = True
    async with client.post(url(gateway), data=REFERRAL, headers={**AUTH, **JSON_TYPE}) as response:
        assert response.status == 503 and "no confirm" in (await response.json())["detail"]
    gated.gate.set()


# -- order, idempotency, faults -------------------------------------------------------------------

async def test_the_202_never_comes_before_the_broker_confirmed(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start()
    gated = gateway.broker
    assert isinstance(gated, GatedBroker)
    gated.hold_confirms = True
    request = asyncio.ensure_future(client.post(url(gateway), data=REFERRAL, headers={**AUTH, **JSON_TYPE}))
    await asyncio.wait_for(gated.reached.wait(), 10)
    queue = inbound(rabbit_project, "referrals-rest")
    for _ in range(100):  # the message is on the queue: RabbitMQ has it, the confirm is held back
        if (await broker.queue_info(queue)).messages == 1:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    assert not request.done() and gated.confirmed == 0
    gated.gate.set()
    response = await asyncio.wait_for(request, 10)
    assert response.status == 202 and gated.confirmed == 1
    response.release()


async def test_an_idempotency_key_replay_gets_the_first_answer_and_publishes_nothing_more(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start()
    headers = {**AUTH, **JSON_TYPE, "Idempotency-Key": "order-5521-attempt"}
    answers = []
    for _ in range(2):
        async with client.post(url(gateway), data=REFERRAL, headers=headers) as response:
            assert response.status == 202
            answers.append((await response.read(), response.headers.get("Idempotency-Replayed")))
    assert answers[0][0] == answers[1][0] and answers[0][1] is None and answers[1][1] == "true"
    async with client.post(url(gateway), data=REFERRAL.replace(b"urgent", b"routine"), headers=headers) as response:
        assert response.status == 422
        assert (await response.json())["type"] == "urn:middleware:problem:idempotency-key-reused"
    concurrent = [client.post(url(gateway), data=REFERRAL, headers={**headers, "Idempotency-Key": "k2"})
                  for _ in range(5)]
    bodies = set()
    for response in await asyncio.gather(*concurrent):
        assert response.status == 202
        bodies.add(await response.read())
        response.release()
    assert len(bodies) == 1
    assert len(await drain(broker, inbound(rabbit_project, "referrals-rest"))) == 2  # one per key


def close_connection(name: str) -> None:
    listed = subprocess.run(["rabbitmqctl", "list_connections", "-q", "pid", "client_properties"],
                            capture_output=True, text=True, timeout=60)
    [pid] = [line.split("\t")[0] for line in listed.stdout.splitlines() if name in line]
    closed = subprocess.run(["rabbitmqctl", "close_connection", pid, "fault injection"],
                            capture_output=True, text=True, timeout=60)
    assert closed.returncode == 0, closed.stderr


async def test_a_broker_cut_mid_request_is_503_and_the_resend_loses_nothing(
        start: Start, client: aiohttp.ClientSession, broker: Broker, rabbit_project: Project) -> None:
    gateway = await start()
    gated = gateway.broker
    assert isinstance(gated, GatedBroker)
    gated.hold_after = 300
    body = b"\n".join(json.dumps({"referralId": f"REF-{n}", "patient": {"mrn": f"M{n}"}}).encode()
                      for n in range(1000))
    headers = {**AUTH, "Content-Type": "application/x-ndjson", "Idempotency-Key": "cut-1"}
    request = asyncio.ensure_future(client.post(url(gateway), data=body, headers=headers))
    await asyncio.wait_for(gated.reached.wait(), 20)
    await asyncio.to_thread(close_connection, gated.connection_name)
    response = await asyncio.wait_for(request, 20)
    assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
    assert "connection was lost" in (await response.json())["detail"]
    response.release()
    gated.hold_after = None
    gated.gate.set()
    for _ in range(200):  # the robust connection comes back by itself
        if gated.connected:
            break
        await asyncio.sleep(0.05)
    async with client.post(url(gateway), data=body, headers=headers) as again:  # the caller sends it again
        assert again.status == 202 and len((await again.json())["message_ids"]) == 1000
    seen: dict[str, int] = {}
    for message in await drain(broker, inbound(rabbit_project, "referrals-rest")):
        key = json.loads(message.body)["referralId"]
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) == {f"REF-{n}" for n in range(1000)}  # nothing lost
    assert max(seen.values()) <= 2  # at most once per attempt: at-least-once, never more
    assert sum(seen.values()) - 1000 <= 300  # only what was sent before the cut came twice


# -- description, probes, start-up ------------------------------------------------------------------

async def test_openapi_describes_each_route_with_its_media_types_and_needs_credentials(
        start: Start, client: aiohttp.ClientSession) -> None:
    gateway = await start(api_keys=(API_KEY,))
    async with client.get(f"{gateway.base_url}/openapi.json") as response:
        assert response.status == 401
    async with client.get(f"{gateway.base_url}/openapi.json", headers=AUTH) as response:
        document = await response.json()
    assert document["openapi"].startswith("3.1")
    assert sorted(document["paths"]) == sorted([f"/v1/routes/{r}/messages" for r in ROUTES] + ["/healthz", "/readyz"])
    post = document["paths"]["/v1/routes/results-inbound/messages"]["post"]
    assert sorted(post["requestBody"]["content"]) == ["application/hl7-v2", "x-application/hl7-v2+er7"]
    assert {"202", "400", "401", "403", "404", "413", "415", "422", "429", "503"} <= set(post["responses"])
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert document["servers"] == [{"url": gateway.base_url}]


async def test_a_taken_port_or_no_credential_fails_the_start_naming_the_listener(
        start: Start, rabbit_project: Project) -> None:
    first = await start()
    with pytest.raises(ConfigError) as taken:
        await start(name="second", port=first.port)
    assert f"ingest.http second: cannot listen on 127.0.0.1:{first.port}" in str(taken.value)
    with pytest.raises(ConfigError) as empty:
        await start(name="empty", bearer_tokens=("",))
    assert "ingest.http empty: auth" in str(empty.value)


async def test_the_engine_starts_the_shipped_listener_and_a_posted_referral_reaches_case_management(
        engine: Engine, sink: Sink, client: aiohttp.ClientSession) -> None:
    [gateway] = [g for g in engine.gateways if isinstance(g, HttpGateway)]
    assert gateway.listener.name == "rest" and gateway.port != 0
    async with client.post(url(gateway), data=REFERRAL,
                           headers={"Authorization": "Bearer integration-test-token", **JSON_TYPE}) as response:
        assert response.status == 202
        correlation_id = (await response.json())["correlation_id"]
    await sink.wait_for(1)
    event = json.loads(sink.requests[0][1])
    assert event["type"] == "referral.requested.v1" and event["correlationid"] == correlation_id
    assert event["data"]["referral"]["id"] == "REF-2026-004512"


async def test_a_taken_http_port_stops_run_with_one_error_line_before_anything_is_consumed(
        broker: Broker, rabbit_project: Project, rabbit_env: dict[str, str], waiting: str, tmp_path: Path) -> None:
    with taken_port() as port:
        result = await asyncio.to_thread(run_until_exit, {**rabbit_env, "HTTP_INGEST_PORT": str(port)}, tmp_path)
    assert result.returncode == 1, result.stderr
    entries = json_lines(result.stderr)
    [error] = [entry for entry in entries if entry["level"] == "error"]
    assert f"ingest.http rest: cannot listen on 127.0.0.1:{port}" in error["event"]
    assert not any(entry["event"] == "engine started" for entry in entries)
    await assert_untouched(broker, rabbit_project, waiting)


async def test_run_without_an_ingest_token_stops_with_one_error_line_naming_it(
        broker: Broker, rabbit_project: Project, rabbit_env: dict[str, str], waiting: str, tmp_path: Path) -> None:
    env = {k: v for k, v in rabbit_env.items() if k != "HTTP_INGEST_TOKEN"}
    result = await asyncio.to_thread(run_until_exit, env, tmp_path)
    assert result.returncode == 1, result.stderr
    [error] = [entry for entry in json_lines(result.stderr) if entry["level"] == "error"]
    assert "ingest.http rest: auth:" in error["event"] and "HTTP_INGEST_TOKEN" in error["event"]
    await assert_untouched(broker, rabbit_project, waiting)
