"""On the real RabbitMQ: a message sent to the HTTP gateway shows in `middleware trace` with its route,
event and each delivery (a retried one with its attempts), and `status` shows the route's SLA state."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from middleware.engine import Engine
from middleware.ingest.http import HttpGateway

from ..conftest import Sink

pytestmark = pytest.mark.rabbitmq
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"  # the caller's trace (W3C)
Cli = Callable[..., subprocess.CompletedProcess[str]]


def adt(control_id: str) -> bytes:
    return (f"MSH|^~\\&|EHR|GHH|ADT|GHH|20260101120000||ADT^A01|{control_id}|P|2.5\r"
            "EVN|A01|20260101120000\rPID|1||4711^^^GHH^MR||DOE^JOHN||19800101|M\rPV1|1|I\r").encode()


async def traced(cli: Cli, key: str, done: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
    """`middleware trace KEY --json` until ``done`` says the message's path is complete."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await asyncio.to_thread(cli, "trace", key, "--json", check=False)
        if result.returncode == 0:
            [message] = json.loads(result.stdout)["messages"]
            if done(message):
                return message
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"trace {key}: {result.stdout or result.stderr}")
        await asyncio.sleep(0.3)


async def test_a_message_from_http_ingest_is_traced_through_its_deliveries(engine: Engine, sink: Sink,
                                                                           cli: Cli) -> None:
    sink.script = [503]  # case-management fails once, then takes it
    gateway = next(g for g in engine.gateways if isinstance(g, HttpGateway))
    control_id = f"TRC{uuid.uuid4().hex[:10]}"
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{gateway.port}/v1/routes/adt-inbound/messages", data=adt(control_id),
            headers={"Content-Type": "x-application/hl7-v2+er7", "traceparent": TRACEPARENT,
                     "Authorization": "Bearer integration-test-token"}) as response:
        assert response.status == 202, await response.text()
        correlation_id = (await response.json())["correlation_id"]

    def delivered_everywhere(message: dict[str, Any]) -> bool:
        deliveries = [d for e in message["events"] for d in e["deliveries"]]
        return len(deliveries) == 2 and all(d["outcome"] == "delivered" for d in deliveries)

    message = await traced(cli, control_id, delivered_everywhere)
    assert message["correlation_id"] == correlation_id and message["source"] == "http:rest"
    assert message["source_id"] == control_id and message["outcome"] == "routed"
    [event] = message["events"]
    deliveries = {d["connector"]: d for d in event["deliveries"]}
    assert deliveries["case-management"]["attempts"] == 2 and deliveries["case-management"]["retries"] == 1
    assert deliveries["bed-board"]["attempts"] == 1
    assert [h["stage"] for h in message["hops"]][:2] == ["ingest", "route"]
    sent = [headers.get("traceparent", "") for headers, _ in sink.requests]  # the 503'd try and the retry
    assert len(sent) == 2 and all(t.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") for t in sent)
    assert TRACEPARENT not in sent  # each hop is a span of its own in the caller's trace
    by_event = await traced(cli, event["event_id"], delivered_everywhere)
    assert by_event["correlation_id"] == correlation_id

    result = await asyncio.to_thread(cli, "status", "--json")
    states = {r["route"]: r for r in json.loads(result.stdout)["sla"]["routes"]}
    assert states["adt-inbound"]["last_received"] is not None
    assert "silent" not in states["adt-inbound"]["breaches"]
