"""Broker port and adapters; :func:`connect_broker` picks the adapter from the URL scheme."""

from __future__ import annotations

from middleware.broker.base import Broker, Consumer, Handler, IncomingMessage, OutgoingMessage, QueueInfo
from middleware.tls import TlsOptions

__all__ = ["Broker", "Consumer", "Handler", "IncomingMessage", "OutgoingMessage", "QueueInfo", "make_broker"]


def make_broker(url: str, tls: TlsOptions | None = None) -> Broker:
    """An unconnected adapter for ``url``: aio-pika for amqp(s)://, kombu for anything else.

    ``tls`` (``broker.tls``) is used by aio-pika for ``amqps://`` URLs.
    """
    if url.startswith(("amqp://", "amqps://")):
        from middleware.broker.amqp import AmqpBroker

        return AmqpBroker(url, tls=tls)
    from middleware.broker.kombu_broker import KombuBroker

    return KombuBroker(url)
