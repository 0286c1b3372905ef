"""HTTP ingest gateway: ``POST /v1/routes/{route}/messages`` onto a route's inbound queue (aiohttp.web).

The contract is in docs/ingest.md. In short, for each request, in this order: a peer outside
``allowed_peers`` gets 403; no credentials 401, wrong ones 403 (bearer tokens or API keys compared
in constant time); over the listener's token bucket 429 + ``Retry-After``; an unknown route 404; a
media type the route does not take 415; a body over ``max_body_bytes`` 413. The body is split into
records (:mod:`middleware.ingest.http_bodies`) and every record is parsed once: those that are not
messages are dead-lettered with their raw bytes and reason (400 when the body cannot be read as its
media type, 422 when it reads but is not a message of the route's format). The others go through
the one :class:`~middleware.ingest.publisher.Publisher`, and **202 is answered only once the broker
confirmed every one of them**; if the broker is down, the connection drops during the request or no
confirm comes within ``confirm_timeout``, the answer is 503 + ``Retry-After`` and the caller sends
again (at-least-once: records confirmed before the failure may then arrive twice).

An ``Idempotency-Key`` with the same body within ``idempotency_window`` gets the first answer again
without publishing; with another body 422. The keys live in memory, per process (an LRU of
``idempotency_max_keys``): across processes or a restart the same request is published again.

Errors are ``application/problem+json`` (RFC 9457); a caller that sends or accepts
``application/fhir+json`` gets a FHIR OperationOutcome instead. Logs carry the listener, route,
status, correlation id and sizes, never a body or a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import logging
import math
import re
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

import orjson
from aiohttp import web

from middleware import project_schema
from middleware.broker.base import Broker
from middleware.errors import BrokerError, ConfigError, Problem
from middleware.formats import Record, SplitInfo
from middleware.ingest import GatewayContext, HttpListener, HttpRateLimit, register
from middleware.ingest.http_bodies import FHIR_JSON, Body, accepted_types, media_type, read_body
from middleware.ingest.http_openapi import openapi_document
from middleware.ingest.peers import PeerFilter, parse_networks
from middleware.ingest.publisher import FramingError, Published, Publisher, StreamResult, new_id
from middleware.ingest.tls import server_context
from middleware.observe import Metrics
from middleware.project import Settings
from middleware.route import Route

log = logging.getLogger("middleware.ingest.http")

PROBLEM_JSON = "application/problem+json"
TRACEPARENT_HEADER = "traceparent"
CONTENT_TYPE_HEADER = "x-mw-http-content-type"  # the media type the caller sent (CSV rows arrive as JSON)
RETRY_AFTER_BROKER = 5  # seconds a caller is asked to wait after a 503
_WATCH_SECONDS = 0.05  # how often a request waiting for confirms looks at the broker connection
_INLINE_BYTES = 65_536  # bodies up to this size are split and parsed on the event loop (a thread hop costs more)
_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_FHIR_ISSUE = {400: "structure", 401: "login", 403: "forbidden", 404: "not-found", 413: "too-long",
               415: "not-supported", 422: "processing", 429: "throttled", 503: "transient"}


@dataclass(frozen=True)
class Answer:
    """A response as sent (kept by the idempotency cache to be sent again)."""

    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def response(self, **extra: str) -> web.Response:
        return web.Response(status=self.status, body=self.body, content_type=self.content_type,
                            headers={**self.headers, **extra})


class Refused(Exception):
    """A request answered with an error (turned into problem+json or an OperationOutcome)."""

    def __init__(self, status: int, slug: str, title: str, detail: str, *, headers: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def answer(self, *, fhir: bool) -> Answer:
        """RFC 9457 problem details, or a FHIR OperationOutcome for FHIR callers."""
        if fhir:
            outcome = {"resourceType": "OperationOutcome", "issue": [{
                "severity": "error", "code": _FHIR_ISSUE.get(self.status, "exception"),
                "details": {"text": self.title}, "diagnostics": self.detail}]}
            return Answer(self.status, orjson.dumps(outcome), FHIR_JSON, self.headers)
        problem = {"type": f"urn:middleware:problem:{self.slug}", "title": self.title, "status": self.status,
                   "detail": self.detail, **self.extra}
        return Answer(self.status, orjson.dumps(problem), PROBLEM_JSON, self.headers)


class TokenBucket:
    """``burst`` requests at once, refilled at ``per_second``: :meth:`take` says how long to wait, or 0."""

    def __init__(self, limit: HttpRateLimit, clock: Any = time.monotonic) -> None:
        self.rate, self.capacity = limit.per_second, float(limit.burst)
        self._clock = clock
        self._tokens = self.capacity
        self._at = clock()

    def take(self) -> float:
        """Take one token; 0.0 when there was one, else the seconds until there will be."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


@dataclass
class _Remembered:
    digest: str
    expires: float
    answer: asyncio.Future[Answer | None]


class IdempotencyCache:
    """Answers by (route, Idempotency-Key), for ``window`` seconds, at most ``max_keys`` (least recent go first).

    A request whose key is being answered waits for that answer. Only final answers are kept (202,
    and 400/422 whose body was dead-lettered); a 503 forgets the key, so the caller's resend is
    published.
    """

    def __init__(self, window: float, max_keys: int, clock: Any = time.monotonic) -> None:
        self.window, self.max_keys = window, max_keys
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Remembered] = OrderedDict()

    def claim(self, route: str, key: str, digest: str) -> tuple[_Remembered, bool]:
        """The entry for ``key`` and whether this request owns it (must :meth:`settle` it).

        Raises :class:`Refused` (422) when the key was used with another body.
        """
        now = self._clock()
        while self._entries:  # expired entries leave from the old end
            oldest = next(iter(self._entries.values()))
            if oldest.expires > now or not oldest.answer.done():
                break
            self._entries.popitem(last=False)
        entry = self._entries.get((route, key))
        if entry is not None and entry.expires > now:
            if not hmac.compare_digest(entry.digest, digest):
                raise Refused(422, "idempotency-key-reused", "Idempotency-Key reused with another body",
                              "this Idempotency-Key was used with a different body; use a new key for a new request")
            self._entries.move_to_end((route, key))
            return entry, False
        entry = _Remembered(digest, now + self.window, asyncio.get_running_loop().create_future())
        self._entries[(route, key)] = entry
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)
        return entry, True

    def settle(self, route: str, key: str, entry: _Remembered, answer: Answer | None) -> None:
        """Keep ``answer`` for the key (None: forget the key; waiting requests then publish themselves)."""
        if answer is None and self._entries.get((route, key)) is entry:
            del self._entries[(route, key)]
        if not entry.answer.done():
            entry.answer.set_result(answer)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class HttpGateway:
    """One ``ingest.http[]`` listener over ``routes`` (the project's routes; ``listener.routes`` narrows them)."""

    def __init__(self, listener: HttpListener, broker: Broker, settings: Settings, routes: Mapping[str, Route],
                 metrics: Metrics | None = None) -> None:
        self.listener = listener
        self.broker = broker
        self.settings = settings
        self.metrics = metrics
        self.routes = {name: route for name, route in routes.items()
                       if not listener.routes or name in listener.routes}
        self.publishers = {name: Publisher(broker, route, settings) for name, route in self.routes.items()}
        self.source = f"http:{listener.name}"
        self.port = listener.port  # the bound port once started (useful with port 0)
        self._bearer = [_digest(t) for t in listener.bearer_tokens if t]
        self._api_keys = [_digest(k) for k in listener.api_keys if k]
        self._peers = PeerFilter(parse_networks(listener.allowed_peers))
        self._bucket = TokenBucket(listener.rate_limit) if listener.rate_limit else None
        self._idempotency = IdempotencyCache(listener.idempotency_window, listener.idempotency_max_keys)
        self._tls: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None
        self.app = self._make_app()

    @property
    def base_url(self) -> str:
        host = self.listener.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.listener.tls else 'http'}://{host}:{self.port}"

    def _problem(self, message: str) -> ConfigError:
        return ConfigError([Problem(self.listener.file, self.listener.line,
                                    f"ingest.http {self.listener.name}: {message}")])

    async def start(self, *, declare: bool = True) -> None:
        """Declare the routes' queues (unless ``declare`` is False), then listen.

        Raises :class:`ConfigError` (one line naming the listener and port) when no credential is
        set, the TLS files cannot be used or the port is taken.
        """
        if not self._bearer and not self._api_keys:
            raise self._problem("auth: every bearer token and API key is empty (set the environment variable "
                                "they come from, e.g. HTTP_INGEST_TOKEN)")
        if declare:
            for publisher in self.publishers.values():
                await publisher.declare()
        if self.listener.tls is not None:
            try:
                self._tls = server_context(self.listener.tls)
            except (OSError, ssl.SSLError) as exc:
                raise self._problem(f"tls: {exc}") from None
        host, port = self.listener.host, self.listener.port
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.create_server((host, port), family=family, backlog=512)
        except OSError as exc:
            raise self._problem(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=self.settings.drain_timeout)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, ssl_context=self._tls)
        await site.start()
        log.info("http ingest listening", extra={"listener": self.listener.name, "host": host, "port": self.port,
                                                 "routes": sorted(self.routes), "tls": self._tls is not None})

    async def stop(self) -> None:
        """Stop accepting; requests in flight finish (up to ``engine.drain_timeout``)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            log.info("http ingest stopped", extra={"listener": self.listener.name})

    def _make_app(self) -> web.Application:
        # client_max_size bounds a body of any transfer encoding; Content-Length is checked before reading
        app = web.Application(client_max_size=self.listener.max_body_bytes)
        app.router.add_post("/v1/routes/{route}/messages", self._post)
        app.router.add_get("/openapi.json", self._openapi)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.on_response_prepare.append(_server_header)
        return app

    # -- probes and description -------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "listener": self.listener.name})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.broker.connected
        return web.json_response({"ready": ready, "broker": "connected" if ready else "disconnected"},
                                 status=200 if ready else 503)

    async def _openapi(self, request: web.Request) -> web.Response:
        try:
            self._admit(request)
        except Refused as refused:
            return refused.answer(fhir=False).response()
        return web.json_response(openapi_document(self.listener, self.routes, base_url=self.base_url),
                                 dumps=lambda value: orjson.dumps(value).decode())

    # -- POST /v1/routes/{route}/messages ------------------------------------------------------

    async def _post(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        fhir = _wants_fhir(request)
        name = request.match_info["route"]
        size = 0
        try:
            self._admit(request)
            self._check_rate()
            route = self.routes.get(name)
            if route is None:
                raise Refused(404, "unknown-route", "No such route",
                              f"route {name!r} is not accepted here (GET /openapi.json lists the routes)")
            kind = media_type(request.headers.get("Content-Type"))
            accepted = accepted_types(route.format.name)
            if kind not in accepted:
                raise Refused(415, "unsupported-media-type", "Unsupported media type",
                              f"route {name!r} ({route.format.name}) accepts {', '.join(accepted)}, "
                              f"not {kind or 'a body without Content-Type'}",
                              headers={"Accept-Post": ", ".join(accepted)})
            if request.content_length is not None and request.content_length > self.listener.max_body_bytes:
                raise self._too_large()
            correlation_id, extra_headers = _trace(request)
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise self._too_large() from None
            size = len(raw)
            answer = await self._idempotent(request, route, raw, kind, correlation_id, extra_headers, fhir)
        except Refused as refused:
            answer = refused.answer(fhir=fhir)
        extra = {"listener": self.listener.name, "route": name, "status": answer.status, "bytes": size,
                 "correlation_id": answer.headers.get("X-Correlation-ID"),
                 "ms": round((time.perf_counter() - started) * 1000, 2)}
        (log.debug if answer.status == 202 else log.info)("http ingest request", extra=extra)
        return answer.response()

    def _admit(self, request: web.Request) -> None:
        """Peers first, then credentials: 403 outside allowed_peers, 401 without credentials, 403 wrong ones."""
        if not self._peers.allows(request.remote or ""):
            raise Refused(403, "peer-not-allowed", "Forbidden", "this address may not call this listener")
        authorization = request.headers.get("Authorization", "")
        api_key = request.headers.get("X-API-Key")
        bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else None
        if bearer is None and api_key is None:
            raise Refused(401, "unauthorized", "Unauthorized",
                          "send Authorization: Bearer <token>" + (" or X-API-Key" if self._api_keys else ""),
                          headers={"WWW-Authenticate": 'Bearer realm="middleware"'})
        ok = False
        for offered, allowed in ((bearer, self._bearer), (api_key, self._api_keys)):
            if offered is not None:
                digest = _digest(offered)
                for secret in allowed:  # every one compared: the time does not depend on which matched
                    ok |= hmac.compare_digest(digest, secret)
        if not ok:
            raise Refused(403, "forbidden", "Forbidden", "the credentials sent are not valid for this listener")

    def _check_rate(self) -> None:
        if self._bucket is None:
            return
        wait = self._bucket.take()
        if wait > 0:
            raise Refused(429, "rate-limited", "Too many requests",
                          f"over this listener's rate of {self._bucket.rate:g} requests/s",
                          headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def _too_large(self) -> Refused:
        return Refused(413, "body-too-large", "Body too large",
                       f"the body is larger than this listener's max_body_bytes ({self.listener.max_body_bytes})")

    async def _idempotent(self, request: web.Request, route: Route, raw: bytes, kind: str, correlation_id: str,
                          extra_headers: Mapping[str, str], fhir: bool) -> Answer:
        """Publish, or answer again for a repeated Idempotency-Key."""
        key = request.headers.get("Idempotency-Key")
        if key is None:
            return await self._publish(route, raw, kind, correlation_id, extra_headers, fhir)
        if not _IDEMPOTENCY_KEY.fullmatch(key):
            raise Refused(400, "bad-idempotency-key", "Invalid Idempotency-Key",
                          "an Idempotency-Key is 1 to 255 visible ASCII characters")
        digest = hashlib.sha256(kind.encode() + b"\0" + raw).hexdigest()
        while True:
            entry, owner = self._idempotency.claim(route.name, key, digest)
            if not owner:
                first = await asyncio.shield(entry.answer)
                if first is not None:
                    return replace(first, headers={**first.headers, "Idempotency-Replayed": "true"})
                continue  # the first attempt failed (503): this one publishes
            answer: Answer | None = None
            try:
                answer = await self._publish(route, raw, kind, correlation_id, extra_headers, fhir)
            except Refused as refused:
                if refused.status in (400, 422) and "dead_lettered" in refused.extra:
                    answer = refused.answer(fhir=fhir)
                    return answer
                raise
            finally:
                self._idempotency.settle(route.name, key, entry, answer)
            return answer

    async def _publish(self, route: Route, raw: bytes, kind: str, correlation_id: str,
                       extra_headers: Mapping[str, str], fhir: bool) -> Answer:
        """Split, check and publish ``raw``; 202 once every record is confirmed (module docstring)."""
        if not self.broker.connected:
            raise _unavailable(correlation_id, "the broker is not connected")
        losses = self.broker.connection_losses
        body = (read_body(raw, kind, route.format) if len(raw) <= _INLINE_BYTES
                else await asyncio.to_thread(read_body, raw, kind, route.format))
        if body.info.feed is not None and self.metrics is not None:
            self.metrics.feed_heartbeat.labels(route.name).set_to_current_time()
        if not body.records:  # a FHIR subscription handshake or heartbeat: the feed is alive, nothing to publish
            return Answer(200, orjson.dumps({"correlation_id": correlation_id, "message_ids": [],
                                             "feed": body.info.feed}),
                          "application/json", {"X-Correlation-ID": correlation_id})
        headers = {CONTENT_TYPE_HEADER: kind, **extra_headers}
        records = [replace(r, headers={**r.headers, **headers}) for r in body.records]
        done: list[Published] = []
        publisher = self.publishers[route.name]
        task = asyncio.ensure_future(_publish_one(publisher, records[0], self.source, correlation_id, done)
                                     if len(records) == 1 and records[0].position is None else
                                     publisher.publish_stream(io.BytesIO(b""), source=self.source,
                                                              correlation_id=correlation_id,
                                                              on_published=done.append, split=_given(records, body)))
        deadline = time.monotonic() + self.listener.confirm_timeout
        while not task.done():
            await asyncio.wait({task}, timeout=_WATCH_SECONDS)
            if task.done():
                break
            lost = not self.broker.connected or self.broker.connection_losses != losses
            if lost or time.monotonic() >= deadline:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, BrokerError):
                    await task
                why = ("the broker connection was lost" if lost
                       else f"no confirm from the broker within {self.listener.confirm_timeout:g} s")
                raise _unavailable(correlation_id, why, sent=len(done), total=len(records))
        try:
            result = task.result()
        except BrokerError:
            result = None
        if result is None or result.error is not None or not result.complete:
            raise _unavailable(correlation_id, "the broker failed", sent=len(done), total=len(records))
        dead = [{"position": p.position, "message_id": p.message_id, "detail": p.error}
                for p in done if p.dead_lettered]
        ids = [p.message_id for p in done if not p.dead_lettered]
        if dead and self.metrics is not None:
            self.metrics.dead_lettered.labels(route.name, "parse").inc(len(dead))
        if dead:
            log.warning("http ingest records dead-lettered", extra={
                "listener": self.listener.name, "route": route.name, "correlation_id": correlation_id,
                "dead_lettered": len(dead), "published": len(ids)})
        cid_header = {"X-Correlation-ID": correlation_id}
        if not ids:
            unreadable = body.unreadable == len(records)
            first = dead[0]["detail"] or "not a message"
            raise Refused(400 if unreadable else 422, "unreadable-body" if unreadable else "not-a-message",
                          "Body cannot be read" if unreadable else "Not a message of this route's format",
                          f"{first} (dead-lettered on route {route.name!r})" if len(dead) == 1 else
                          f"none of the {len(dead)} records could be taken in (all dead-lettered); the first: {first}",
                          headers=cid_header, extra={"correlation_id": correlation_id, "dead_lettered": dead})
        payload: dict[str, Any] = {"correlation_id": correlation_id, "message_ids": ids}
        if dead:
            payload["dead_lettered"] = dead
        return Answer(202, orjson.dumps(payload), "application/json", cid_header)


async def _publish_one(publisher: Publisher, record: Record, source: str, correlation_id: str,
                       done: list[Published]) -> StreamResult:
    """A body that is one message: published (or dead-lettered) without the batch machinery."""
    message_id = new_id()
    if record.error is None:
        await publisher.publish(record.raw, source=source, correlation_id=correlation_id,
                                headers=record.headers, message_id=message_id)
    else:
        await publisher.dead_letter(record.raw, FramingError(record.error), source=source,
                                    correlation_id=correlation_id, headers=record.headers, message_id=message_id)
    done.append(Published(correlation_id, None, record.error is not None, record.error, message_id))
    return StreamResult(published=int(record.error is None), dead_lettered=int(record.error is not None))


def _given(records: list[Record], body: Body) -> Any:
    """A ``split`` for :meth:`Publisher.publish_stream` that hands over records already split and checked."""

    def split(_stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
        info.batch_id, info.declared, info.records = body.info.batch_id, body.info.declared, len(records)
        info.problems.extend(body.info.problems)
        return iter(records)

    return split


def _unavailable(correlation_id: str, why: str, *, sent: int = 0, total: int = 0) -> Refused:
    confirmed = f"; {sent} of {total} records were confirmed before it" if total > 1 else ""
    return Refused(503, "broker-unavailable", "Service unavailable",
                   f"{why}: the message is not accepted, send it again later (duplicates are possible){confirmed}",
                   headers={"Retry-After": str(RETRY_AFTER_BROKER), "X-Correlation-ID": correlation_id},
                   extra={"correlation_id": correlation_id})


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """``Server: middleware`` instead of aiohttp's, which names the Python and aiohttp versions."""
    response.headers["Server"] = "middleware"


def _wants_fhir(request: web.Request) -> bool:
    """A FHIR caller: it sends or accepts application/fhir+json."""
    return (media_type(request.headers.get("Content-Type")) == FHIR_JSON
            or FHIR_JSON in request.headers.get("Accept", "").lower())


def _trace(request: web.Request) -> tuple[str, dict[str, str]]:
    """The correlation id (X-Correlation-ID, else the traceparent's trace id, else new) and headers to keep."""
    headers: dict[str, str] = {}
    traceparent = request.headers.get("traceparent", "").strip().lower()
    match = _TRACEPARENT.fullmatch(traceparent)
    trace_id = None
    if match and match.group(1) != "ff" and set(match.group(2)) != {"0"} and set(match.group(3)) != {"0"}:
        headers[TRACEPARENT_HEADER] = traceparent  # an invalid one is ignored, as W3C trace context says
        trace_id = match.group(2)
    given = request.headers.get("X-Correlation-ID")
    if given is not None and not _CORRELATION_ID.fullmatch(given):
        raise Refused(400, "bad-correlation-id", "Invalid X-Correlation-ID",
                      "an X-Correlation-ID is 1 to 128 characters of A-Z a-z 0-9 . _ : @ / + = -")
    return given or trace_id or new_id(), headers


_SECRETS: dict[str, Any] = {"type": "array", "items": {"type": "string"}}  # from ${ENV}; empty: refused at start

SPEC: dict[str, Any] = {  # the keys of one ingest.http[] entry (docs/ingest.md)
    "type": "object",
    "additionalProperties": False,
    "required": ["port", "auth"],
    "properties": {
        "name": {**project_schema.NAME, "description": "the listener's name; default `http-<port>`"},
        "host": {"type": "string", "minLength": 1, "default": "127.0.0.1", "description": "address to listen on"},
        "port": {"type": "integer", "minimum": 0, "maximum": 65535, "description": "TCP port (0: any free port)"},
        "auth": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {"bearer_tokens": _SECRETS, "api_keys": _SECRETS},
            "description": "`bearer_tokens` and/or `api_keys`: secrets from `${ENV}` (empty ones are ignored), "
                           "compared in constant time; missing answers 401, wrong 403",
        },
        "routes": {"type": "array", "minItems": 1, "items": project_schema.NAME,
                   "description": "the routes this listener accepts (default: every route); others answer 404"},
        "max_body_bytes": {"type": "integer", "minimum": 64, "default": 10_485_760,
                           "description": "larger bodies answer 413 (by Content-Length, or while reading)"},
        "rate_limit": {
            "type": "object",
            "additionalProperties": False,
            "required": ["per_second"],
            "properties": {"per_second": {"type": "number", "exclusiveMinimum": 0},
                           "burst": {"type": "integer", "minimum": 1}},
            "description": "token bucket for the whole listener: `burst` requests at once (default `per_second`), "
                           "refilled at `per_second`; over it answers 429 with Retry-After",
        },
        "idempotency_window": {"type": "number", "minimum": 0, "default": 86400,
                               "description": "seconds an `Idempotency-Key` is remembered (per process)"},
        "idempotency_max_keys": {"type": "integer", "minimum": 1, "default": 10000,
                                 "description": "keys remembered at most (least recently used go first)"},
        "confirm_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 10,
                            "description": "seconds a request waits for the broker's confirms before 503"},
        "allowed_peers": project_schema.ALLOWED_PEERS,
        "tls": project_schema.SERVER_TLS,
    },
}


@register("http", SPEC)
def _http_gateway(listener: HttpListener, context: GatewayContext) -> HttpGateway:
    """The gateway of one ``ingest.http[]`` entry (every route it accepts)."""
    return HttpGateway(listener, context.broker, context.settings, context.routes, context.metrics)
