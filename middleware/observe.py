"""Structured logging and Prometheus metrics.

Log lines and metric labels carry ids, types, routes, stages and correlation ids — never names,
dates of birth or payloads. Metrics live in a per-engine registry, not a global one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Counter, Histogram

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED and v is not None})
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    """Send the middleware's logs to stderr, as JSON lines (default) or plain text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("middleware")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class Metrics:
    """The engine's counters, per route (and connector / stage / event type)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter("middleware_messages_received", "Inbound messages consumed", ["route"], registry=r)
        self.filtered = Counter("middleware_messages_filtered", "Inbound messages dropped by the route filter",
                                ["route"], registry=r)
        self.events = Counter("middleware_events_published", "Canonical events published",
                              ["route", "type"], registry=r)
        self.delivered = Counter("middleware_events_delivered", "Events accepted by a sink",
                                 ["route", "connector"], registry=r)
        self.retries = Counter("middleware_delivery_retries", "Delivery attempts that were retried",
                               ["route", "connector"], registry=r)
        self.dead_lettered = Counter("middleware_dead_lettered", "Messages sent to a dead-letter queue",
                                     ["route", "stage"], registry=r)
        self.processing = Histogram("middleware_route_seconds", "Time to turn one inbound message into events",
                                    ["route"], registry=r,
                                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0))
        self.delivery_seconds = Histogram("middleware_delivery_seconds", "Time to deliver one event, retries included",
                                          ["route", "connector"], registry=r)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a counter sample (0 if never incremented), e.g. for the demo summary."""
        found = self.registry.get_sample_value(f"{name}_total", labels)
        return found or 0.0

    def total(self, name: str, **labels: str) -> float:
        """Sum of a counter over every label set that matches ``labels``."""
        result = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == f"{name}_total" and all(sample.labels.get(k) == v for k, v in labels.items()):
                    result += sample.value
        return result


async def serve_metrics(metrics: Metrics, host: str, port: int) -> Any:
    """Serve ``/metrics`` (Prometheus text) and ``/healthz``; returns the aiohttp runner to clean up."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics_page), web.get("/healthz", health)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def safe_url(url: str) -> str:
    """``url`` fit for logs and messages: credentials masked (``***@``), the query (it may hold
    tokens) dropped."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    if "@" in parts.netloc:
        host = f"***@{host}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
