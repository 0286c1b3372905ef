"""``type: amqp``: publish each CloudEvent to an exchange on another (or the same) RabbitMQ, with confirms.

The connector opens its own connection to ``url`` (never the engine's), publishes ``mandatory``
with publisher confirms, and counts the event delivered only on the broker's ack:

- unroutable (no queue bound for the routing key), an exchange that does not exist, access
  refused or an untrusted broker certificate: dead letter at once, the reason names exchange and
  routing key;
- a broker that is down, a dropped connection, a nack, no confirm within ``timeout``: retried (when
  ``retry_on`` lists ``connection`` / ``timeout``), on a fresh connection.

The message keeps what consumers need to dedupe and trace: ``message_id`` = event id,
``correlation_id``, ``type`` = the event type, ``content_type`` (``application/cloudevents+json``,
or ``application/json`` for a document made by the delivery's outbound ``map:``),
persistent, headers ``x-mw-event-type``, ``x-mw-route``, ``x-correlation-id`` plus the connector's
own ``headers``. ``routing_key`` is a template over the event: ``{type}`` (the default),
``{subject}``, ``{source}``, ``{data.patient.mrn}``...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from middleware import project_schema
from middleware.delivery.base import Connector, ConnectorSpec, Delivery, register
from middleware.errors import DeliveryError, EngineStopping
from middleware.observe import safe_url
from middleware.tls import TlsOptions, client_context

log = logging.getLogger("middleware.delivery")

DEFAULT_TIMEOUT = 10.0
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")

SPEC: dict[str, Any] = {  # the keys of a connectors/<name>.yaml with type: amqp
    "type": "object",
    "required": ["url", "exchange"],
    "properties": {
        "url": {"type": "string", "pattern": "^amqps?://",
                "description": "the broker to publish to (`amqp://` or `amqps://`); its own connection"},
        "exchange": {"type": "string",
                     "description": "exchange to publish to (must exist); `\"\"` is the default exchange, where "
                                    "the routing key is a queue name"},
        "routing_key": {"type": "string", "default": "{type}",
                        "description": "template over the event: `{type}`, `{subject}`, `{source}`, `{id}`, "
                                       "`{data.patient.mrn}`"},
        "headers": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]},
                    "description": "extra message headers"},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "default": DEFAULT_TIMEOUT,
                    "description": "seconds to connect and to get the broker's confirm"},
        "tls": {**project_schema.TLS_CLIENT,
                "description": "for `amqps://`: `ca_file`, `cert_file` / `key_file` (mutual TLS), `verify`; "
                               "paths relative to the project"},
    },
}


def check_options(options: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """Settings that cannot work together; ``validate`` reports them at their line."""
    if options.get("tls") is not None and str(options.get("url", "")).startswith("amqp://"):
        return [(("tls",), f"tls is set but url {safe_url(str(options['url']))} is plain amqp://: use amqps://")]
    return []


def routing_key(template: str, event: Mapping[str, Any], known: Mapping[str, str] | None = None) -> str:
    """``template`` with each ``{name}`` replaced from the event, else from ``known`` (the delivery's own
    ``type``, ``id``, ``correlationid``: a mapped document may lack them); raises ``KeyError`` naming a missing one."""

    def value(match: re.Match[str]) -> str:
        path = match.group(1).strip()
        found: Any = event
        for key in path.split("."):
            found = found.get(key) if isinstance(found, Mapping) else None
        if found is None and known:
            found = known.get(path) or None
        if found is None or isinstance(found, Mapping | list) or found == "":
            raise KeyError(path)
        return str(found)

    return _PLACEHOLDER.sub(value, template)


def _untrusted(exc: BaseException) -> bool:
    """The broker's certificate was refused (aiormq wraps the ssl error, sometimes only in its text)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@register("amqp", SPEC)
class AmqpConnector(Connector):
    """Publishes events to an exchange over its own aio-pika connection, one confirm per event."""

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        options = spec.options
        self.url = str(options["url"])
        self.exchange_name = str(options["exchange"])
        self.routing_key = str(options.get("routing_key", "{type}"))
        self.headers: dict[str, Any] = dict(options.get("headers") or {})
        self.timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        tls = options.get("tls")
        self.tls: TlsOptions | None = TlsOptions.from_yaml(tls, Path()) if isinstance(tls, Mapping) else tls
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._opening = asyncio.Lock()
        self._closed = False

    async def start(self) -> None:
        try:
            await self._open()
        except DeliveryError as exc:  # not fatal: each send tries again, then retries or dead-letters
            log.warning("cannot open amqp connector", extra={"connector": self.name, "error": exc.message})

    async def _open(self) -> AbstractExchange:
        async with self._opening:
            if self._exchange is not None and self._channel is not None and not self._channel.is_closed:
                return self._exchange
            retry_on = self.spec.retry.retry_on
            try:
                async with asyncio.timeout(self.timeout):
                    if self._connection is None or self._connection.is_closed:
                        ssl_context = client_context(self.tls) if self.url.startswith("amqps://") else None
                        self._connection = await aio_pika.connect(
                            self.url, ssl_context=ssl_context,
                            client_properties={"connection_name": f"middleware connector {self.name}"})
                    self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
                    self._exchange = (self._channel.default_exchange if self.exchange_name == "" else
                                      await self._channel.get_exchange(self.exchange_name, ensure=False))
            except TimeoutError:
                await self._reset()
                raise DeliveryError(f"{self.name}: {self.describe()}: no connection within {self.timeout:g}s",
                                    retryable="timeout" in retry_on, hint="check that the broker is up") from None
            except (OSError, aiormq.exceptions.AMQPConnectionError) as exc:
                await self._reset()
                if _untrusted(exc):
                    raise DeliveryError(f"{self.name}: {safe_url(self.url)}: server certificate not trusted",
                                        retryable=False, hint="set the connector's tls.ca_file to the broker's CA, "
                                                              "then replay the dead letter") from None
                raise DeliveryError(f"{self.name}: cannot connect to {safe_url(self.url)}: {type(exc).__name__}",
                                    retryable="connection" in retry_on,
                                    hint="check that the broker is up and the url's credentials") from None
            return self._exchange

    async def send(self, delivery: Delivery) -> None:
        if self._closed:  # shutting down after a drain timeout: the message goes back to its queue
            raise EngineStopping(f"{self.name}: connector is closed", hint="the engine is stopping")
        key = self._key(delivery)
        exchange = await self._open()
        headers: dict[str, Any] = {**self.headers, "x-mw-event-type": delivery.event_type, "x-mw-route": delivery.route}
        if delivery.correlation_id:
            headers["x-correlation-id"] = delivery.correlation_id
        message = aio_pika.Message(delivery.body, content_type=delivery.content_type,
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   message_id=delivery.event_id or None,
                                   correlation_id=delivery.correlation_id or None,
                                   type=delivery.event_type or None, headers=headers)
        retry_on = self.spec.retry.retry_on
        where = f"{self.describe()} key {key!r}"
        try:
            await asyncio.wait_for(exchange.publish(message, routing_key=key, mandatory=True), self.timeout)
        except aiormq.exceptions.PublishError:
            raise DeliveryError(f"{self.name}: {where}: unroutable (no queue is bound for this routing key)",
                                retryable=False, hint="bind a queue to the exchange for this key or fix the "
                                                      "connector's routing_key, then replay the dead letter") from None
        except aiormq.exceptions.DeliveryError:
            raise DeliveryError(f"{self.name}: {where}: the broker refused the message (nack)", retryable=True,
                                hint="the broker could not store it now (disk or memory alarm?): it will be "
                                     "retried") from None
        except aiormq.exceptions.ChannelClosed as exc:  # 404 exchange gone, 403 refused: the channel is closed
            self._exchange = None
            raise DeliveryError(f"{self.name}: {where}: the broker closed the channel ({type(exc).__name__})",
                                retryable=False, hint="check that the exchange exists and the user may write "
                                                      "to it, then replay the dead letter") from None
        except TimeoutError:
            await self._reset()
            raise DeliveryError(f"{self.name}: {where}: no confirm within {self.timeout:g}s",
                                retryable="timeout" in retry_on, hint="check the broker's health") from None
        except (OSError, aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.AMQPError, RuntimeError) as exc:
            await self._reset()
            raise DeliveryError(f"{self.name}: {where} failed: {type(exc).__name__}",
                                retryable="connection" in retry_on, hint="check that the broker is up") from None

    def _key(self, delivery: Delivery) -> str:
        if "{" not in self.routing_key:
            return self.routing_key
        known = {"type": delivery.event_type, "id": delivery.event_id, "correlationid": delivery.correlation_id}
        try:
            event = orjson.loads(delivery.body)
            return routing_key(self.routing_key, event if isinstance(event, Mapping) else {}, known)
        except orjson.JSONDecodeError:
            raise DeliveryError(f"{self.name}: the event is not JSON", retryable=False,
                                hint="the delivery queue holds something else than a CloudEvent") from None
        except KeyError as exc:
            raise DeliveryError(f"{self.name}: routing_key {self.routing_key!r}: the event has no {exc.args[0]}",
                                retryable=False, hint="fix the connector's routing_key, then replay") from None

    async def _reset(self) -> None:
        """Forget the connection (it failed or timed out); the next send opens a new one."""
        connection, self._connection, self._channel, self._exchange = self._connection, None, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 1.0)

    async def close(self) -> None:
        self._closed = True
        await self._reset()

    def describe(self) -> str:
        return f"{safe_url(self.url)} exchange {self.exchange_name!r}"

    check = staticmethod(check_options)
