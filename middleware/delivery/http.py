"""``type: http``: POST (PUT, PATCH) each CloudEvent to a REST/FHIR endpoint with aiohttp.

Structured mode: body is the event, ``Content-Type: application/cloudevents+json``. Headers
``X-Correlation-ID`` (the correlation id) and ``Idempotency-Key`` (the event id) let the sink
dedupe redeliveries. 2xx is success; 429, 5xx, timeouts and connection errors are retryable when
the connector's ``retry_on`` lists them; any other status dead-letters at once. Response bodies
are never copied into errors or logs (they may echo PHI).
"""

from __future__ import annotations

from typing import Any

import aiohttp

from middleware.delivery.base import Connector, ConnectorSpec, Delivery, register
from middleware.errors import DeliveryError, EngineStopping
from middleware.observe import safe_url

CONTENT_TYPE = "application/cloudevents+json"  # JSON is UTF-8 by definition (RFC 8259)
DEFAULT_TIMEOUT = 10.0
MAX_CONNECTIONS = 100


def _retry_after(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


@register("http")
class HttpConnector(Connector):
    """Sends events over HTTP; one connection pool per connector."""

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        options = spec.options
        self.url = str(options["url"])
        self.method = str(options.get("method", "POST"))
        self.timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        self.headers: dict[str, str] = {str(k): str(v) for k, v in dict(options.get("headers") or {}).items()}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
            )

    async def send(self, delivery: Delivery) -> None:
        if self._closed:  # shutting down after a drain timeout: the message goes back to its queue
            raise EngineStopping(f"{self.name}: connector is closed", hint="the engine is stopping")
        if self._session is None:
            await self.start()
        assert self._session is not None
        retry_on = self.spec.retry.retry_on
        headers: dict[str, Any] = {**self.headers, "Content-Type": CONTENT_TYPE,
                                   "Idempotency-Key": delivery.event_id}
        if delivery.correlation_id:
            headers["X-Correlation-ID"] = delivery.correlation_id
        where = f"{self.method} {safe_url(self.url)}"
        try:
            async with self._session.request(self.method, self.url, data=delivery.body, headers=headers) as response:
                await response.read()  # drain so the connection returns to the pool
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except TimeoutError:
            raise DeliveryError(f"{self.name}: {where} timed out after {self.timeout:g}s",
                                retryable="timeout" in retry_on,
                                hint="check the sink's health or raise the connector's timeout") from None
        except aiohttp.ClientError as exc:
            raise DeliveryError(f"{self.name}: {where} failed: {type(exc).__name__}",
                                retryable="connection" in retry_on,
                                hint="check that the sink is up and reachable") from None
        if 200 <= status < 300:
            return
        if status == 429:
            retryable = "429" in retry_on
        elif status >= 500:
            retryable = "5xx" in retry_on
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
