"""Structured logging and Prometheus metrics.

Log lines and metric labels carry ids, types, routes, stages and correlation ids — never names,
dates of birth or payloads. Metrics live in a per-engine registry, not a global one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from types import TracebackType
from typing import Any
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from middleware.errors import MiddlewareError

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _stack(tb: TracebackType | None, limit: int = 12) -> list[str]:
    """The innermost frames of a traceback as ``file:line in function`` (no locals, no message)."""
    return [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(tb)[-limit:]]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and the record's extra fields.

    An exception adds its class and stack (``file:line in function``), never its message: a
    message may quote the data being processed.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": mask_secrets(record.getMessage()),  # a library's message may quote a URL
        }
        entry.update({k: mask_secrets(v) if isinstance(v, str) else v
                      for k, v in record.__dict__.items() if k not in _RESERVED and v is not None})
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["stack"] = _stack(record.exc_info[2])
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """For a person at a terminal: ``time level logger: event key=value ...`` and any traceback."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = mask_secrets(super().format(record))
        extra = [f"{k}={mask_secrets(str(v))}" for k, v in record.__dict__.items()
                 if k not in _RESERVED and v is not None]
        if not extra:
            return line
        head, newline, rest = line.partition("\n")  # a traceback follows the first line
        return f"{head} {' '.join(extra)}{newline}{rest}"


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler :func:`configure_logging` installs (so a second call replaces it)."""


_log = logging.getLogger("middleware")


def configure_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    """Every line on stderr through one formatter: JSON lines (default) or text for a terminal.

    Our loggers log at ``level``; library loggers (aiormq, aio_pika, asyncio, aiohttp, ...) reach
    the same handler through the root logger at WARNING and up; uncaught exceptions (main thread,
    other threads) and Python warnings are logged too, instead of printed as bare tracebacks.
    Call :func:`log_loop_exception` from the event loop's exception handler.
    """
    handler = _OurHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _OurHandler)] + [handler]
    root.setLevel(logging.WARNING)
    _log.handlers.clear()
    _log.setLevel(level)
    _log.propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, tb)
        return
    _log.critical("uncaught exception", exc_info=(kind, error, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        _log.error("uncaught exception in a thread", exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
                   extra={"thread_name": args.thread.name if args.thread else None})


def log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An event-loop exception handler: the error as one log line (asyncio's default prints the
    context's reprs)."""
    error = context.get("exception")
    where = context.get("task") or context.get("future")
    extra = {"task": where.get_name() if isinstance(where, asyncio.Task) else None}
    exc_info = (type(error), error, error.__traceback__) if isinstance(error, BaseException) else None
    logging.getLogger("middleware.asyncio").error(str(context.get("message") or "event loop error"),
                                                  exc_info=exc_info, extra=extra)


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
        self.skipped = Counter("middleware_deliveries_skipped", "Events a delivery's when: did not match (acked)",
                               ["route", "connector"], registry=r)
        self.retries = Counter("middleware_delivery_retries", "Delivery attempts that were retried",
                               ["route", "connector"], registry=r)
        self.parked = Counter("middleware_deliveries_parked", "Deliveries parked in a delay queue on the broker "
                              "(retries in process used up, breaker open or a long Retry-After)",
                              ["route", "connector"], registry=r)
        self.parked_messages = Gauge("middleware_parked_messages", "Deliveries waiting in the delay queues now "
                                     "(their depths, as last read by the engine)", ["route", "connector"], registry=r)
        self.breaker_open = Gauge("middleware_breaker_open", "1 while a connector's circuit breaker is open "
                                  "(its deliveries paused, one probe every probe_every), else 0",
                                  ["connector"], registry=r)
        self.breaker_opened = Counter("middleware_breaker_opened", "Times a connector's circuit breaker opened",
                                      ["connector"], registry=r)
        self.dead_lettered = Counter("middleware_dead_lettered", "Messages sent to a dead-letter queue",
                                     ["route", "stage"], registry=r)
        self.processing = Histogram("middleware_route_seconds", "Time to turn one inbound message into events",
                                    ["route"], registry=r,
                                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0))
        self.delivery_seconds = Histogram("middleware_delivery_seconds", "Time to deliver one event, retries included",
                                          ["route", "connector"], registry=r)
        self.feed_heartbeat = Gauge("middleware_feed_heartbeat_timestamp_seconds",
                                    "When a feed last said it is alive (a FHIR subscription handshake, heartbeat "
                                    "or notification), Unix time", ["route"], registry=r)
        self.folder_files = Gauge("middleware_folder_files", "Files of a watched folder now waiting or in progress",
                                  ["folder", "state"], registry=r)
        self.folder_finished = Counter("middleware_folder_files_finished",
                                       "Files of a watched folder finished (done, failed, duplicate)",
                                       ["folder", "outcome"], registry=r)
        self.folder_records = Counter("middleware_folder_records", "Records of watched-folder files confirmed "
                                      "(published or dead_lettered)", ["folder", "outcome"], registry=r)
        self.queue_messages = Gauge("middleware_queue_messages", "Ready messages in each queue of the project "
                                    "(role: inbound, delivery, dead-letter), read every 15 s (middleware/depths.py)",
                                    ["route", "queue", "role"], registry=r)
        # journal, message age and SLA (middleware/journal/, docs/operations.md "SLA and feed health")
        self.journal_written = Counter("middleware_journal_written", "Journal records written", registry=r)
        self.journal_dropped = Counter("middleware_journal_dropped", "Journal records dropped (store down, slow "
                                       "or its queue full); the pipeline went on", registry=r)
        ages = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 86400)
        self.route_age = Histogram("middleware_route_message_age_seconds", "At the route worker: now - when the "
                                   "message was received", ["route"], registry=r, buckets=ages)
        self.route_event_age = Histogram("middleware_route_event_age_seconds", "At the route worker: now - the "
                                         "business event time", ["route"], registry=r, buckets=ages)
        self.delivery_age = Histogram("middleware_delivery_message_age_seconds", "At delivery: now - when the "
                                      "message was received", ["route", "connector"], registry=r, buckets=ages)
        self.delivery_event_age = Histogram("middleware_delivery_event_age_seconds", "At delivery: now - the "
                                            "business event time", ["route", "connector"], registry=r, buckets=ages)
        self.last_received = Gauge("middleware_route_last_received_timestamp_seconds", "When the route last "
                                   "took in a message, Unix time", ["route"], registry=r)
        self.source_last_received = Gauge("middleware_source_last_received_timestamp_seconds", "When a source "
                                          "(x-mw-ingest: mllp:<listener>, http:<listener>, publish) last sent a "
                                          "message, Unix time", ["source"], registry=r)
        self.sla_deliver_breaches = Counter("middleware_sla_deliver_within_breaches", "Events delivered later "
                                            "than the route's sla.deliver_within", ["route", "connector"], registry=r)
        self.sla_silent_breaches = Counter("middleware_sla_silent_feed_breaches", "Times a route's feed went "
                                           "silent for longer than sla.silent_after", ["route"], registry=r)
        self.sla_error_breaches = Counter("middleware_sla_error_rate_breaches", "Times a route's error rate rose "
                                          "above sla.max_error_rate", ["route"], registry=r)
        self.sla_silent = Gauge("middleware_sla_feed_silent", "1 while the route's feed is silent (sla.silent_after)",
                                ["route"], registry=r)
        self.sla_error_rate = Gauge("middleware_sla_error_rate", "Dead letters / messages over the last 15 minutes",
                                    ["route"], registry=r)

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


async def serve_metrics(metrics: Metrics, host: str, port: int, setup: Any = None) -> Any:
    """Serve ``/metrics`` (Prometheus text) and ``/healthz``; returns the aiohttp runner to clean up.

    ``setup(app)``, if given, adds more to the same listener (the console at ``/``)."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics_page), web.get("/healthz", health)])
    if setup is not None:
        setup(app)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's strerror repeats the address
        raise MiddlewareError(f"metrics.port {port}: cannot listen on {host}:{port}: {reason}",
                              hint="is another engine running on this host? give each its own metrics.port "
                                   "(METRICS_PORT), or 0 for any free port") from None
    return runner


# -- secrets in URLs ------------------------------------------------------------------------------

MASK = "***"
_URL_START = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+")
# a host (name, IPv4 or [IPv6]) with an optional port, then the end of the authority
_HOST = re.compile(r"(?:\[[0-9A-Za-z:.%]*\]|[A-Za-z0-9._~%\-]+)(?::[0-9]*)?(?=[^A-Za-z0-9._~%\-:@]|$)")
_SECRET_PARAMS = frozenset({
    "token", "access_token", "refresh_token", "id_token", "auth", "key", "api_key", "apikey", "password",
    "passwd", "pwd", "secret", "client_secret", "sig", "signature", "credential", "credentials",
})
_SECRET_SUFFIXES = ("token", "_key", "apikey", "secret", "password", "signature")


def _param_spans(rest: str, start: int) -> list[tuple[int, int]]:
    """Spans of secret parameter values in the query and fragment of ``rest``, whose authority
    (host, port) begins at ``start``."""
    spans: list[tuple[int, int]] = []
    delimiters = [i for i in (rest.find(c, start) for c in "?#") if i >= 0]
    if not delimiters:
        return spans
    position = min(delimiters)
    hash_ = rest.find("#", position)
    for part_start, part_end in ((position + 1, hash_ if hash_ > position else len(rest)),
                                 (hash_ + 1, len(rest)) if hash_ >= position else (0, 0)):
        offset = part_start
        for part in rest[part_start:part_end].split("&"):
            name, eq, value = part.partition("=")
            if eq and value and _secret_param(name):
                spans.append((offset + len(name) + 1, offset + len(part)))
            offset += len(part) + 1
    return spans


def _secret_spans(rest: str) -> list[tuple[int, int]]:
    """Spans of ``rest`` (what follows ``scheme://``) that may be secret, under every reading of it.

    A password may hold any character (``/ # ? @ :`` too), so a userinfo may end at any ``@``
    followed by a host, provided its user name (before the first ``:``) holds none of ``/ ? #``
    (nor does a userinfo without ``:``). When readings differ (``https://h:1/p?token=a@b``: a
    password ``1/p?token=a``, or a token ``a@b``), the secrets of all of them are masked."""
    spans: list[tuple[int, int]] = []
    authority_end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    if "@" not in rest[:authority_end]:
        spans += _param_spans(rest, 0)  # the reading without userinfo
    at = -1
    while (at := rest.find("@", at + 1)) >= 0:
        userinfo = rest[:at]
        user, colon, _ = userinfo.partition(":")
        if userinfo and _HOST.match(rest, at + 1) and not any(c in user for c in "/?#") and (colon or user == userinfo):
            spans.append((0, at))
            spans += _param_spans(rest, at + 1)
    return spans


def _secret_param(name: str) -> bool:
    name = unquote(name).strip().lower().replace("-", "_")
    return name in _SECRET_PARAMS or name.endswith(_SECRET_SUFFIXES)


def safe_url(url: str) -> str:
    """``url`` fit for logs, headers and terminals: userinfo masked (``***@host``) whatever its
    characters, and the values of secret query (or fragment) parameters masked (``token=***``:
    token, access_token, api_key, apikey, key, password, secret, sig, signature, ``*_token``,
    ``*_key``, ..., any case). A URL without secrets comes back unchanged; text that is no
    ``scheme://`` URL too. When in doubt it masks more: an ``@`` after a ``host:port``
    (``https://host:8443/users/a@b.example``) reads as the end of a password."""
    start = _URL_START.match(url)
    if not start:
        return url
    prefix, rest = url[:start.end()], url[start.end():]
    merged: list[list[int]] = []
    for begin, end in sorted(_secret_spans(rest)):
        if merged and begin <= merged[-1][1]:  # overlapping or adjacent: one mask
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    masked, position = [prefix], 0
    for begin, end in merged:
        masked += [rest[position:begin], MASK]
        position = end
    masked.append(rest[position:])
    return "".join(masked)


def url_has_credentials(url: str) -> bool:
    """True when some reading of ``url`` carries a userinfo (``user:password@``), whatever the
    password's characters: the reading :func:`safe_url` masks."""
    start = _URL_START.match(url)
    if not start:
        return False
    return any(begin == 0 for begin, _ in _secret_spans(url[start.end():]))


def mask_secrets(text: str) -> str:
    """``text`` (an error message, a log line) with every ``scheme://`` URL in it passed through
    :func:`safe_url`; a URL ends at whitespace."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: safe_url(m.group()), text)
