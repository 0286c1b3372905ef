"""Queue depths for Prometheus: ``middleware_queue_messages{route, queue, role}``, the ready messages of
every inbound, delivery and dead-letter queue of the project, read every :data:`INTERVAL` seconds by
``middleware run`` (dashboards and the "dead letters growing" alert need them; the engine's counters
cannot say how many dead letters are still waiting after replays and purges).

Read as ``middleware status`` reads them: from the embedded broker's spool folder, else with a passive
declare per queue (nothing is consumed) on the engine's connection (``broker``: each declare opens a
channel of its own, so a missing queue harms nothing; before the engine connects the depths are
unknown), or on a connection of the sampler's own when none is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from middleware.broker import make_broker
from middleware.broker.base import Broker
from middleware.cli.status import RouteStatus, fill_from_broker, fill_from_spool, route_queues, spool_folder
from middleware.observe import Metrics
from middleware.project import Project

log = logging.getLogger("middleware.depths")
INTERVAL = 15.0
CONNECT_TIMEOUT = 10.0


class DepthSampler:
    """Reads the project's queue depths and keeps ``middleware_queue_messages`` at them."""

    def __init__(self, project: Project, metrics: Metrics, *, broker: Broker | None = None,
                 interval: float = INTERVAL) -> None:
        self.project = project
        self.metrics = metrics
        self.interval = interval
        self._shared = broker  # the engine's: used, never connected or closed here
        self._broker: Broker | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def sample(self) -> list[RouteStatus]:
        """Every route's queues with their depths now (None where the broker did not answer); the
        gauges follow. A queue not declared yet has no gauge."""
        async with self._lock:
            statuses = route_queues(self.project)
            folder = spool_folder(self.project.settings.broker_url)
            if folder is not None:
                await asyncio.to_thread(fill_from_spool, statuses, folder)
            else:
                try:
                    await fill_from_broker(statuses, await self._connected())
                except Exception as exc:  # broker away (any client error): depths unknown, try again next time
                    log.debug("cannot read queue depths", extra={"error_class": type(exc).__name__})
                    await self._drop()
                    for status in statuses:
                        for queue in status.queues:
                            queue.messages = None
            for status in statuses:
                for queue in status.queues:
                    if queue.declared and queue.messages is not None:
                        self.metrics.queue_messages.labels(status.route, queue.queue, queue.role).set(queue.messages)
            return statuses

    async def _connected(self) -> Broker:
        if self._shared is not None:
            return self._shared
        if self._broker is None:
            broker = make_broker(self.project.settings.broker_url, self.project.settings.broker_tls)
            try:
                await asyncio.wait_for(broker.connect(), CONNECT_TIMEOUT)
            except BaseException:  # cancelled or failed: leave no reconnecting connection behind
                with contextlib.suppress(Exception):
                    await broker.close()
                raise
            self._broker = broker
        return self._broker

    async def _drop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            with contextlib.suppress(Exception):
                await broker.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # never let a sampling bug end the loop (or the engine)
                log.exception("queue depth sampling failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        """Sample every :attr:`interval` seconds from now on (until :meth:`close`)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="queue-depths")

    def attach(self, app: Any) -> None:
        """Close with ``app`` (the aiohttp app of ``/metrics``); sampling begins at :meth:`start`, once
        the listener is bound (a start that fails leaves nothing running)."""
        async def stop(_: Any) -> None:
            await self.close()

        app.on_cleanup.append(stop)

    async def close(self) -> None:
        """Stop sampling and close the sampler's broker connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop()
