"""Metrics endpoint and JSON logs."""

from __future__ import annotations

import json
import logging

import aiohttp

from middleware.observe import JsonFormatter, Metrics, serve_metrics


async def test_metrics_and_health_endpoints() -> None:
    metrics = Metrics()
    metrics.received.labels("adt-inbound").inc(3)
    metrics.dead_lettered.labels("adt-inbound", "parse").inc()
    runner = await serve_metrics(metrics, "127.0.0.1", 0)
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                health = await response.json()
    finally:
        await runner.cleanup()
    assert 'middleware_messages_received_total{route="adt-inbound"} 3.0' in text
    assert 'middleware_dead_lettered_total{route="adt-inbound",stage="parse"} 1.0' in text
    assert health == {"status": "ok"}
    assert metrics.total("middleware_messages_received") == 3


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.LogRecord("middleware.worker", logging.WARNING, __file__, 1, "dead-lettered", (), None)
    record.route = "adt-inbound"
    record.correlation_id = "c-1"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["event"] == "dead-lettered" and entry["level"] == "warning"
    assert entry["route"] == "adt-inbound" and entry["correlation_id"] == "c-1"


def test_safe_url_masks_credentials_and_drops_queries() -> None:
    from middleware.observe import safe_url

    assert safe_url("amqp://guest:secret@127.0.0.1:5672/vh") == "amqp://***@127.0.0.1:5672/vh"
    assert safe_url("https://u:p@sink.example/events?token=t") == "https://***@sink.example/events"
    assert safe_url("filesystem:///srv/var/broker") == "filesystem:///srv/var/broker"
