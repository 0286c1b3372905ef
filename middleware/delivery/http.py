"""``type: http``: POST (PUT, PATCH) each CloudEvent to a REST/FHIR endpoint with aiohttp.

Structured mode: body is the event, ``Content-Type: application/cloudevents+json``. Headers
``X-Correlation-ID`` (the correlation id) and ``Idempotency-Key`` (the event id) let the sink
dedupe redeliveries. 2xx is success; 429, 5xx, timeouts and connection errors are retryable when
the connector's ``retry_on`` lists them; any other status dead-letters at once. Redirects are
never followed: a 3xx means the sink did not take the event (a client following 301/302/303
would re-send it as a body-less GET), so it dead-letters naming where it was sent (masked).
Response bodies are never copied into errors or logs (they may echo PHI).

Transport security: ``tls`` (CA bundle, client certificate for mutual TLS, verify) and
``oauth2`` (client-credentials token, cached and refreshed; see :mod:`.auth`).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import errno
import logging
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urljoin

import aiohttp

from middleware import project_schema
from middleware.delivery.auth import ClientCredentials, TokenCache
from middleware.delivery.base import Connector, ConnectorSpec, Delivery, register
from middleware.errors import DeliveryError, EngineStopping
from middleware.observe import safe_url, url_has_credentials
from middleware.tls import TlsOptions, client_context

log = logging.getLogger("middleware.delivery")

CONTENT_TYPE = "application/cloudevents+json"  # JSON is UTF-8 by definition (RFC 8259)
DEFAULT_TIMEOUT = 10.0
MAX_CONNECTIONS = 100


def _retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds the sink asks us to wait: ``Retry-After`` as delay-seconds or an HTTP-date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unreadable: fall back to our own backoff
    if when.tzinfo is None:  # an HTTP-date is always GMT
        when = when.replace(tzinfo=dt.UTC)
    return max((when - (now or dt.datetime.now(dt.UTC))).total_seconds(), 0.0)


def _authorization_key(headers: Mapping[str, Any]) -> str | None:
    return next((str(k) for k in headers if str(k).lower() == "authorization"), None)


def check_options(options: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """``(key path, message)`` for settings that cannot work together; ``validate`` reports them at
    their line and the connector refuses to send with them (one clear dead letter, no retry loop)."""
    found: list[tuple[tuple[str, ...], str]] = []
    url = str(options.get("url", ""))
    header = _authorization_key(options.get("headers") or {})
    userinfo = url_has_credentials(url)
    if userinfo and header:
        found.append((("headers", header), f"url {safe_url(url)} carries credentials (user:password@) and "
                                           f"headers.{header} sets them again: keep one of the two"))
    if options.get("oauth2") and (userinfo or header):
        key: tuple[str, ...] = ("headers", header) if header else ("url",)
        found.append((key, "oauth2 sets the Authorization header: remove "
                           + (f"headers.{header}" if header else "the credentials from the url")))
    if options.get("tls") is not None and url.startswith("http://"):
        found.append((("tls",), f"tls is set but url {safe_url(url)} is plain http://: use https://"))
    return found


def _untrusted_certificate(exc: aiohttp.ClientError) -> str | None:
    """Why the sink's certificate was refused (retrying cannot help), or None for other errors."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        detail = getattr(error, "verify_message", None) or str(error)
        return f"server certificate not trusted ({detail}): set the connector's tls.ca_file to its CA"
    return None


def _was_reset(exc: aiohttp.ClientError) -> bool:
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ConnectionResetError):
        cause = cause.__cause__ or getattr(cause, "os_error", None)
    return cause is not None or (isinstance(exc, OSError) and exc.errno == errno.ECONNRESET)


class Answer(NamedTuple):
    """A sink's answer to one request (the body is for the caller to read, never to log)."""

    status: int
    retry_after: float | None
    location: str | None
    body: bytes


SPEC: dict[str, Any] = {  # the keys of a connectors/<name>.yaml with type: http
    "type": "object",
    "required": ["url"],
    "properties": {
        "url": {"type": "string", "pattern": "^https?://",
                "description": "`http://` or `https://` endpoint; `user:password@` in it is sent as HTTP Basic"},
        "method": {"enum": ["POST", "PUT", "PATCH"], "default": "POST", "description": "the request method"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "extra request headers, e.g. `Authorization: Bearer ${TOKEN}`"},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "default": DEFAULT_TIMEOUT,
                    "description": "seconds for the whole request"},
        "tls": {**project_schema.TLS_CLIENT,
                "description": "`ca_file` (a private CA, added to the system store), `cert_file` / `key_file` "
                               "(client certificate for mutual TLS), `verify` (default true); paths relative "
                               "to the project"},
        "oauth2": {**project_schema.OAUTH2_CLIENT_CREDENTIALS,
                   "description": "OAuth2 client credentials: `token_url`, `client_id`, `client_secret`, optional "
                                  "`scope`, `audience`, `client_auth` (`basic`, the default, or `post`), "
                                  "`refresh_margin` (seconds, default 30)"},
    },
}


@register("http", SPEC)
class HttpConnector(Connector):
    """Sends events over HTTP(S); one connection pool per connector."""

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        options = spec.options
        self.url = str(options["url"])
        self.method = str(options.get("method", "POST"))
        self.timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        self.headers: dict[str, str] = {str(k): str(v) for k, v in dict(options.get("headers") or {}).items()}
        tls = options.get("tls")
        # the project loader gives TlsOptions with paths resolved; a plain mapping is taken as it is
        self.tls: TlsOptions | None = TlsOptions.from_yaml(tls, Path()) if isinstance(tls, Mapping) else tls
        oauth2 = options.get("oauth2")
        self.tokens = (TokenCache(ClientCredentials.from_options(oauth2), spec.name, spec.retry.retry_on)
                       if oauth2 else None)
        self._misconfigured = "; ".join(message for _, message in check_options(options))
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def start(self) -> None:
        try:
            self._open()
        except DeliveryError as exc:  # not fatal: each send tries again, then dead-letters with the reason
            log.warning("cannot open http connector", extra={"connector": self.name, "error": exc.message})

    def _open(self) -> None:
        if self._session is None:
            ssl_option: ssl.SSLContext | bool = True  # aiohttp's default: verify against the system store
            if self.tls is not None:
                try:
                    ssl_option = client_context(self.tls)
                except (ssl.SSLError, OSError) as exc:  # files gone since validate: each send tries again
                    raise DeliveryError(f"{self.name}: cannot load the tls files: {type(exc).__name__}: {exc}",
                                        retryable="connection" in self.spec.retry.retry_on,
                                        hint="check the connector's tls.ca_file / cert_file / key_file") from None
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ssl=ssl_option),
            )

    async def send(self, delivery: Delivery) -> None:
        self._ready()
        headers: dict[str, Any] = {**self.headers, "Content-Type": delivery.content_type,
                                   "Idempotency-Key": delivery.event_id}
        if delivery.correlation_id:
            headers["X-Correlation-ID"] = delivery.correlation_id
        if delivery.traceparent:
            headers["traceparent"] = delivery.traceparent
        answer = await self._authorized(self.method, self.url, delivery.body, headers)
        if 200 <= answer.status < 300:
            return
        self._raise_for(answer.status, answer.retry_after, answer.location)

    def _ready(self) -> None:
        """Refuse work when closing or misconfigured (one clear dead letter); open the pool if needed."""
        if self._closed:  # shutting down after a drain timeout: the message goes back to its queue
            raise EngineStopping(f"{self.name}: connector is closed", hint="the engine is stopping")
        if self._misconfigured:
            raise DeliveryError(f"{self.name}: {self._misconfigured}", retryable=False,
                                hint=f"fix {self.spec.file or 'the connector file'} (`middleware validate` "
                                     "reports it), then replay the dead letter")
        if self._session is None:
            self._open()

    async def _authorized(self, method: str, url: str, body: bytes, headers: dict[str, Any]) -> Answer:
        """:meth:`_exchange` with the token cache's bearer token, once more with a fresh token on a 401."""
        token = await self._authorize(headers)
        answer = await self._exchange(method, url, body, headers)
        if answer.status == 401 and token is not None:  # the token was revoked or expired early: one fresh try
            assert self.tokens is not None
            self.tokens.refused(token)
            await self._authorize(headers)
            answer = await self._exchange(method, url, body, headers)
        return answer

    async def _authorize(self, headers: dict[str, Any]) -> str | None:
        """Set ``Authorization: Bearer`` from the token cache; returns the token used (None: no oauth2)."""
        if self.tokens is None:
            return None
        assert self._session is not None
        token = await self.tokens.token(self._session, self.timeout)
        headers["Authorization"] = f"Bearer {token}"
        return token

    async def _exchange(self, method: str, url: str, body: bytes, headers: dict[str, Any]) -> Answer:
        """One request without following redirects; the answer, or a :class:`DeliveryError` classified
        by the retry policy (timeouts, connection errors, untrusted certificates, unbuildable requests).
        Subclasses (``fhir``) send to other URLs of the same sink through it."""
        assert self._session is not None
        retry_on = self.spec.retry.retry_on
        where = f"{method} {safe_url(url)}"
        try:
            async with self._session.request(method, url, data=body, headers=headers,
                                             allow_redirects=False) as response:
                content = await response.read()  # drain so the connection returns to the pool
                return Answer(response.status, _retry_after(response.headers.get("Retry-After")),
                              response.headers.get("Location"), content)
        except TimeoutError:
            raise DeliveryError(f"{self.name}: {where} timed out after {self.timeout:g}s",
                                retryable="timeout" in retry_on,
                                hint="check the sink's health or raise the connector's timeout") from None
        except aiohttp.ClientError as exc:
            untrusted = _untrusted_certificate(exc)
            if untrusted is not None:
                raise DeliveryError(f"{self.name}: {where} failed: {untrusted}", retryable=False,
                                    hint="fix the connector's tls settings or the sink's certificate, "
                                         "then replay the dead letter") from None
            detail = type(exc).__name__
            if self.url.startswith("https://") and not (self.tls and self.tls.cert_file) and _was_reset(exc):
                # a mutual-TLS server drops a client without certificate: under TLS 1.3 the client sees
                # only a reset, indistinguishable from a transient one, so it stays retryable
                detail += (" (connection reset: if the sink requires a client certificate (mutual TLS), "
                           "set the connector's tls.cert_file)")
            raise DeliveryError(f"{self.name}: {where} failed: {detail}", retryable="connection" in retry_on,
                                hint="check that the sink is up and reachable") from None
        except ValueError as exc:  # aiohttp could not build the request from our settings
            raise DeliveryError(f"{self.name}: {where}: the request could not be built ({type(exc).__name__})",
                                retryable=False, hint="check the connector's url and headers") from None

    def _raise_for(self, status: int, retry_after: float | None, location: str | None) -> None:
        where = self.describe()
        if 300 <= status < 400:
            target = f" to {safe_url(urljoin(self.url, location))}" if location else ""
            raise DeliveryError(f"{self.name}: {where} answered HTTP {status} (redirect{target}, not followed)",
                                retryable=False, status=status,
                                hint="the sink did not take the event: point the connector's url at the final "
                                     "address, then replay the dead letter")
        if status == 429:
            retryable = "429" in self.spec.retry.retry_on
        elif status >= 500:
            retryable = "5xx" in self.spec.retry.retry_on
        else:
            retryable = False
        hint = ("the sink rejected the event: fix the mapping or the sink, then replay the dead letter"
                if not retryable else "the sink is failing: it will be retried")
        raise DeliveryError(f"{self.name}: {where} answered HTTP {status}", retryable=retryable, status=status,
                            retry_after=retry_after, hint=hint)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def describe(self) -> str:
        return f"{self.method} {safe_url(self.url)}"

    check = staticmethod(check_options)
