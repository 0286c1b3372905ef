"""Several RabbitMQ URLs (the nodes of a cluster): connect to the first that answers, and when the node
goes away reconnect to the next one, keeping aio-pika's robust channels and consumers.

``broker.url`` and ``MIDDLEWARE_BROKER_URL`` may list nodes separated by commas
(``amqp://u:p@rabbit-1:5672/,amqp://u:p@rabbit-2:5672/``; a comma inside a password is written ``%2C``).
:class:`FailoverConnection` is an aio-pika ``RobustConnection`` whose every connection attempt that
fails, and every loss of an established connection, moves it to the next URL in the list (round
robin), so its robust channels re-open their queues and consumers on whichever node answers. Quorum
queues are replicated across the cluster's nodes, so the queues are there on the next node too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aio_pika import RobustConnection
from yarl import URL

from middleware.observe import safe_url

log = logging.getLogger("middleware.broker")


def split_urls(url: str) -> list[str]:
    """The node URLs of a ``broker.url`` (comma separated; one URL gives a list of one)."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError("no broker URL given")
    return urls


class FailoverConnection(RobustConnection):
    """A robust connection over several node URLs (see the module docstring); ``urls`` and ``first`` (the
    index tried first) are given as keyword arguments of ``aio_pika.connect_robust``."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, *,
                 urls: list[str] | None = None, first: int = 0, **kwargs: Any) -> None:
        super().__init__(url, loop=loop, **kwargs)
        self.urls = [URL(u) for u in (urls or [str(url)])]
        self.current = first % len(self.urls)
        self.url = self.urls[self.current]
        self.close_callbacks.add(self._next_on_loss)

    def _advance(self, why: str) -> None:
        if len(self.urls) == 1:
            return
        before = self.url
        self.current = (self.current + 1) % len(self.urls)
        self.url = self.urls[self.current]
        log.info("broker node switched", extra={"broker": safe_url(str(self.url)), "previous": safe_url(str(before)),
                                                "reason": why})

    def _next_on_loss(self, _: Any, error: BaseException | None) -> None:
        if not self._close_called and not self.is_closed:  # a lost node, not our own close()
            self._advance("connection lost")

    async def _RobustConnection__connect_transport(self) -> None:  # aio-pika's private hook (see below)
        """One connection attempt of the robust connection's loop: the next URL when it fails."""
        try:
            await _CONNECT_TRANSPORT(self)
        except BaseException:
            self._advance("connection attempt failed")
            raise


# the attempt aio-pika's reconnect loop makes (RobustConnection.__connect_transport, aio-pika 9.4 to 10.x);
# tests/unit/test_broker_failover.py fails loudly if an upgrade renames it
_CONNECT_TRANSPORT = RobustConnection._RobustConnection__connect_transport  # type: ignore[attr-defined]
