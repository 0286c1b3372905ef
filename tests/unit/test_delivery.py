"""Connectors against real local servers and files, and the tenacity retry policy around them."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import socket
import time
from pathlib import Path

import pytest

from middleware.delivery import ConnectorSpec, Delivery, RetryPolicy, make_connector
from middleware.delivery.retry import send_with_retry
from middleware.errors import DeliveryError

from ..conftest import Sink

FAST = RetryPolicy(attempts=4, initial=0.01, max=0.05, multiplier=2, jitter=0.0)
EVENT = {"specversion": "1.0", "id": "ev-1", "type": "patient.admitted.v1", "data": {"patient": {"mrn": "1"}}}
DELIVERY = Delivery(body=json.dumps(EVENT).encode(), event_id="ev-1", correlation_id="corr-1", route="adt-inbound",
                    event_type="patient.admitted.v1")


def http_spec(url: str, retry: RetryPolicy = FAST, **options: object) -> ConnectorSpec:
    return ConnectorSpec("case-management", "http", {"url": url, **options}, retry)


async def send(spec: ConnectorSpec, delivery: Delivery = DELIVERY) -> tuple[int, list[tuple[int, int | None]]]:
    connector = make_connector(spec)
    await connector.start()
    retries: list[tuple[int, int | None]] = []
    try:
        attempts = await send_with_retry(connector, delivery, spec.retry,
                                         on_retry=lambda n, e: retries.append((n, e.status)))
    finally:
        await connector.close()
    return attempts, retries


async def test_http_posts_the_cloudevent_with_correlation_and_idempotency_headers(sink: Sink) -> None:
    attempts, _ = await send(http_spec(sink.url, headers={"Authorization": "Bearer t"}))
    assert attempts == 1
    [(headers, body)] = sink.requests
    assert json.loads(body) == EVENT
    assert headers["Content-Type"] == "application/cloudevents+json"
    assert headers["X-Correlation-ID"] == "corr-1"
    assert headers["Idempotency-Key"] == "ev-1"
    assert headers["Authorization"] == "Bearer t"


async def test_http_retries_5xx_until_accepted(sink: Sink) -> None:
    sink.script = [503, 500]
    attempts, retries = await send(http_spec(sink.url))
    assert attempts == 3
    assert retries == [(1, 503), (2, 500)]
    assert len(sink.requests) == 3


async def test_http_4xx_is_final_at_once_and_names_no_response_body(sink: Sink) -> None:
    sink.script = [400]
    with pytest.raises(DeliveryError) as raised:
        await send(http_spec(sink.url))
    assert raised.value.status == 400 and not raised.value.retryable and raised.value.attempts == 1
    assert "HTTP 400" in str(raised.value) and "no" not in raised.value.message.split("HTTP 400")[1]
    assert len(sink.requests) == 1


async def test_http_gives_up_after_the_policy_attempts(sink: Sink) -> None:
    sink.script = [503] * 10
    with pytest.raises(DeliveryError) as raised:
        await send(http_spec(sink.url))
    assert raised.value.attempts == 4 and raised.value.status == 503
    assert len(sink.requests) == 4


async def test_429_honours_retry_after_and_retry_on(sink: Sink) -> None:
    sink.script = [429]
    sink.reply_headers = {"Retry-After": "0.04"}
    started = time.perf_counter()
    attempts, _ = await send(http_spec(sink.url, retry=dataclasses.replace(FAST, initial=0.001, max=0.05)))
    assert attempts == 2 and time.perf_counter() - started >= 0.04  # waited as long as the sink asked
    sink.script = [429]
    sink.reply_headers = {"Retry-After": "0.3"}  # longer than in-process retry waits (max 0.05): parked instead
    with pytest.raises(DeliveryError) as raised:
        await send(http_spec(sink.url))
    assert raised.value.retryable and raised.value.retry_after == 0.3 and raised.value.attempts == 1
    sink.reply_headers = {}
    sink.script = [429]
    only_5xx = dataclasses.replace(FAST, retry_on=frozenset({"5xx"}))
    with pytest.raises(DeliveryError) as raised:
        await send(http_spec(sink.url, retry=only_5xx))
    assert raised.value.status == 429 and raised.value.attempts == 1


async def test_connection_refused_is_retried_then_fails() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DeliveryError) as raised:
        await send(http_spec(f"http://user:secret@127.0.0.1:{port}/events?token=t0k3n"))
    assert raised.value.retryable and raised.value.attempts == 4
    assert "secret" not in str(raised.value) and "t0k3n" not in str(raised.value)


async def test_timeout_is_retryable(sink: Sink) -> None:
    sink.delay = 1.0
    with pytest.raises(DeliveryError, match="timed out") as raised:
        await send(http_spec(sink.url, retry=dataclasses.replace(FAST, attempts=2), timeout=0.1))
    assert raised.value.retryable and raised.value.attempts == 2


async def test_file_appends_one_fsynced_line_per_event_without_interleaving(tmp_path: Path) -> None:
    path = tmp_path / "out" / "bed-board.jsonl"
    connector = make_connector(ConnectorSpec("bed-board", "file", {"path": str(path)}, FAST))
    await connector.start()
    pretty = Delivery(json.dumps(EVENT, indent=2).encode(), "ev-1", "c", "r", "t")
    await asyncio.gather(*(connector.send(DELIVERY if n % 2 else pretty) for n in range(50)))
    await connector.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 50 and all(json.loads(line) == EVENT for line in lines)
    assert connector.describe() == f"file {path}"


async def test_file_that_cannot_be_written_is_a_delivery_error(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    spec = ConnectorSpec("bed-board", "file", {"path": str(tmp_path / "taken")}, dataclasses.replace(FAST, attempts=2))
    with pytest.raises(DeliveryError, match="cannot write") as raised:
        await send(spec)
    assert raised.value.attempts == 2


async def test_a_closed_http_connector_refuses_work_without_dead_lettering(sink: Sink) -> None:
    from middleware.errors import EngineStopping

    connector = make_connector(http_spec(sink.url))
    await connector.start()
    await connector.close()
    with pytest.raises(EngineStopping):
        await connector.send(DELIVERY)
    assert sink.requests == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_http_redirect_is_never_followed_and_is_final_naming_the_masked_target(sink: Sink, status: int) -> None:
    # the Location points back at the same sink, which answers 200: a client following the redirect
    # would make a second request there (a body-less GET for 301/302/303) and count the event delivered
    target = sink.url.replace("http://", "http://ops:hunter2@") + "/moved?access_token=t0k3n"
    sink.script = [status]
    sink.reply_headers = {"Location": target}
    with pytest.raises(DeliveryError) as raised:
        await send(http_spec(sink.url))
    error = raised.value
    assert error.status == status and not error.retryable and error.attempts == 1
    assert len(sink.requests) == 1  # the original POST only: nothing followed
    assert f"HTTP {status}" in error.message and "redirect to http://***@127.0.0.1" in error.message
    assert "/events/moved" in error.message and "not followed" in error.message
    assert "hunter2" not in str(error) and "t0k3n" not in str(error)


async def test_http_relative_redirect_is_resolved_against_the_connector_url(sink: Sink) -> None:
    sink.script = [302]
    sink.reply_headers = {"Location": "/login"}
    with pytest.raises(DeliveryError, match=r"HTTP 302 \(redirect to http://127\.0\.0\.1:\d+/login, not followed\)"):
        await send(http_spec(sink.url))


async def test_credentials_in_url_and_authorization_header_fail_once_without_a_request(sink: Sink) -> None:
    # aiohttp refuses to combine them (ValueError); the connector says why, once, and never retries
    url = sink.url.replace("http://", "http://svc:pw@")
    with pytest.raises(DeliveryError) as raised:
        await send(http_spec(url, headers={"authorization": "Bearer t"}))
    error = raised.value
    assert not error.retryable and error.attempts == 1
    assert "carries credentials" in error.message and "headers.authorization" in error.message
    assert "pw@" not in str(error) and "middleware validate" in str(error)
    assert sink.requests == []


async def test_credentials_in_url_alone_are_sent_as_basic_auth(sink: Sink) -> None:
    await send(http_spec(sink.url.replace("http://", "http://svc:p%40ss@")))
    [(headers, _)] = sink.requests
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"svc:p@ss").decode()
