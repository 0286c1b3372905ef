"""The engine's SLA watch: silent feeds and error rates per route, from its own metrics (so it works
with the journal off). Each breach is counted once when it begins (``*_breaches_total``), and the
``middleware_sla_feed_silent`` / ``middleware_sla_error_rate`` gauges show the current state.
``deliver_within`` is checked at each delivery (:func:`middleware.journal.hooks.delivered`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from middleware.journal.config import ERROR_RATE_WINDOW

log = logging.getLogger("middleware.sla")
CHECK_INTERVAL = 10.0  # seconds


class SlaMonitor:
    """Checks every route that has an ``sla:`` each ``interval`` seconds (:meth:`check` does one pass)."""

    def __init__(self, routes: Callable[[], Iterable[Any]], metrics: Any, *, interval: float = CHECK_INTERVAL,
                 window: float = ERROR_RATE_WINDOW) -> None:
        self.routes = routes  # called at each check: a hot reload's new routes and SLAs apply
        self.metrics = metrics
        self.interval = interval
        self.window = window
        self.started = time.time()
        self._silent: dict[str, bool] = {}
        self._failing: dict[str, bool] = {}
        self._samples: dict[str, deque[tuple[float, float, float]]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sla-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            self.check()
            await asyncio.sleep(self.interval)

    def check(self, now: float | None = None) -> None:
        """One pass over every route with an SLA."""
        now = time.time() if now is None else now
        for route in self.routes():
            sla = getattr(route, "sla", None)
            if sla is None:
                continue
            if sla.silent_after is not None:
                self._check_silence(route.name, sla.silent_after, now)
            if sla.max_error_rate is not None:
                self._check_errors(route.name, sla.max_error_rate, now)

    def _check_silence(self, name: str, limit: float, now: float) -> None:
        last = self.metrics.registry.get_sample_value("middleware_route_last_received_timestamp_seconds",
                                                      {"route": name}) or self.started
        silent = now - last > limit
        self.metrics.sla_silent.labels(name).set(int(silent))
        if silent and not self._silent.get(name):
            self.metrics.sla_silent_breaches.labels(name).inc()
            log.warning("feed silent", extra={"route": name, "silent_for": round(now - last), "silent_after": limit})
        self._silent[name] = silent

    def _check_errors(self, name: str, limit: float, now: float) -> None:
        received = self.metrics.value("middleware_messages_received", route=name)
        failed = self.metrics.total("middleware_dead_lettered", route=name)
        samples = self._samples.setdefault(name, deque())
        samples.append((now, received, failed))
        while len(samples) > 1 and samples[1][0] <= now - self.window:
            samples.popleft()
        _, received_then, failed_then = samples[0]
        handled = received - received_then
        rate = (failed - failed_then) / handled if handled > 0 else 0.0
        self.metrics.sla_error_rate.labels(name).set(rate)
        failing = rate > limit
        if failing and not self._failing.get(name):
            self.metrics.sla_error_breaches.labels(name).inc()
            log.warning("error rate above the route's SLA", extra={"route": name, "error_rate": round(rate, 4),
                                                                  "max_error_rate": limit})
        self._failing[name] = failing
