"""Circuit breaker per connector (DESIGN promise 5: a dead sink never stalls the others).

:class:`CircuitBreaker` is the state machine: ``failures`` retryable failures in a row open it (a
non-retryable answer means the sink is up and leaves the count alone); while open, a probe is due
every ``probe_every`` seconds; one success closes it.

:class:`ConnectorGate` acts on it for one connector: it owns the connector's delivery consumers
(:class:`PausableConsumer`). When the breaker opens they are cancelled (no new work is taken; the
handlers in flight see the open breaker, stop retrying and park their messages), and every
``probe_every`` one message is taken from one of the connector's delivery queues and tried once;
a success closes the breaker and the consumers start again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from middleware.broker.base import Broker, Consumer, Handler, IncomingMessage
from middleware.delivery.base import BreakerPolicy
from middleware.errors import DeliveryError, EngineStopping
from middleware.observe import Metrics

log = logging.getLogger("middleware.breaker")

CLOSED, OPEN = "closed", "open"
IDLE_POLL = 0.05  # seconds between looks at a cancelled consumer's handlers before it is closed
PARKED_REFRESH = 15.0  # seconds between reads of the delay queues' depths (the parked gauge)
RESUME_RETRY = 1.0  # seconds between tries to subscribe again after the breaker closed
STOP_WAIT = 5.0  # seconds stop() waits for its cancelled background tasks (a shutdown must not hang on one)
Probe = Callable[[IncomingMessage], Awaitable[bool]]  # try one message once; True if the sink took it


class CircuitBreaker:
    """Counts a connector's consecutive retryable failures; open after ``policy.failures`` of them."""

    def __init__(self, connector: str, policy: BreakerPolicy, *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str], None] | None = None) -> None:
        self.connector = connector
        self.policy = policy
        self.clock = clock
        self.on_change = on_change
        self.state = CLOSED
        self.failures = 0  # retryable failures in a row
        self.opened_at: float | None = None
        self.last_probe: float | None = None

    @property
    def is_open(self) -> bool:
        return self.state == OPEN

    def record(self, error: DeliveryError | None) -> None:
        """One send's outcome: None (accepted) closes; a retryable error counts toward opening."""
        if error is None:
            self.failures = 0
            if self.state == OPEN:
                self._set(CLOSED)
        elif error.retryable:
            self.failures += 1
            if self.state == CLOSED and self.failures >= self.policy.failures:
                self.opened_at = self.last_probe = self.clock()
                self._set(OPEN)

    def probe_due(self) -> bool:
        """True while open when ``probe_every`` has passed since it opened or was last probed."""
        return self.is_open and self.clock() - (self.last_probe or 0.0) >= self.policy.probe_every

    def probed(self) -> None:
        """A probe was made (whatever its outcome): the next one is due ``probe_every`` from now."""
        self.last_probe = self.clock()

    def _set(self, state: str) -> None:
        self.state = state
        if self.on_change is not None:
            self.on_change(state)


class PausableConsumer(Consumer):
    """A broker subscription that can be paused (cancelled) and resumed (subscribed again)."""

    def __init__(self, broker: Broker, queue: str, handler: Handler, prefetch: int) -> None:
        self.broker = broker
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self._current: Consumer | None = None
        self._retired: list[Consumer] = []  # paused: cancelled, closed once their handlers are done
        self._stopped = False

    async def start(self) -> None:
        """Subscribe (again); nothing happens once stopped or while subscribed."""
        if not self._stopped and self._current is None:
            self._current = await self.broker.consume(self.queue, self.handler, prefetch=self.prefetch)

    async def pause(self) -> None:
        """Take no new work; the handlers in flight finish, then the subscription closes."""
        consumer, self._current = self._current, None
        if consumer is None:
            return
        await consumer.cancel()
        self._retired.append(consumer)
        while consumer.in_flight and not self._stopped:
            await asyncio.sleep(IDLE_POLL)
        if consumer in self._retired:
            self._retired.remove(consumer)
            await consumer.close()

    @property
    def paused(self) -> bool:
        return self._current is None

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in (*self._retired, *([self._current] if self._current else [])))

    def _all(self) -> list[Consumer]:
        return [*self._retired, *([self._current] if self._current else [])]

    async def cancel(self) -> None:
        self._stopped = True
        await asyncio.gather(*(consumer.cancel() for consumer in self._all()))

    async def close(self) -> None:
        self._stopped = True
        consumers, self._retired, self._current = self._all(), [], None
        for consumer in consumers:
            await consumer.close()


class ConnectorGate:
    """One connector's breaker acting on its delivery consumers: pause when open, probe, resume."""

    def __init__(self, connector: str, policy: BreakerPolicy, broker: Broker, metrics: Metrics, *,
                 refresh_every: float = PARKED_REFRESH) -> None:
        self.connector = connector
        self.refresh_every = refresh_every
        self.broker = broker
        self.metrics = metrics
        self.breaker = CircuitBreaker(connector, policy, on_change=self._changed)
        self.consumers: list[PausableConsumer] = []
        self.probes: list[tuple[str, Probe]] = []  # (delivery queue, try one of its messages once)
        self.delays: list[tuple[str, list[str]]] = []  # (route, its delay queues to this connector)
        self._prober: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._switch = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False  # every loop below ends on it (stop() cancels only what did not end)
        self._stopping = asyncio.Event()  # wakes the loops' pauses
        metrics.breaker_open.labels(connector).set(0)

    async def consume(self, queue: str, handler: Handler, prefetch: int, probe: Probe, *, route: str = "",
                      delay_queues: Sequence[str] = ()) -> PausableConsumer:
        """Subscribe ``handler`` to delivery queue ``queue`` (of ``route``, parking in ``delay_queues``)."""
        consumer = PausableConsumer(self.broker, queue, handler, prefetch)
        self.consumers.append(consumer)
        self.probes.append((queue, probe))
        self.delays.append((route, list(delay_queues)))
        await consumer.start()
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_parked(), name=f"parked {self.connector}")
        return consumer

    async def _refresh_parked(self) -> None:
        """Keep ``middleware_parked_messages`` at the sum of each delivery's delay queue depths."""
        while not self._stopped:
            for route, queues in list(self.delays):
                if self._stopped:
                    return
                try:
                    depths = [(await self.broker.queue_info(queue)).messages for queue in queues]
                except Exception as exc:  # broker away or queue gone: the next round reads again
                    log.debug("cannot read delay queue depths", extra={"connector": self.connector,
                                                                       "error_class": type(exc).__name__})
                    continue
                self.metrics.parked_messages.labels(route, self.connector).set(sum(depths))
            await self._pause(self.refresh_every)

    def _changed(self, state: str) -> None:
        opened = state == OPEN
        self.metrics.breaker_open.labels(self.connector).set(1 if opened else 0)
        if opened:
            self.metrics.breaker_opened.labels(self.connector).inc()
            log.warning("breaker opened: deliveries paused, probing", extra={
                "connector": self.connector, "failures": self.breaker.failures,
                "probe_every": self.breaker.policy.probe_every})
        else:
            down = time.monotonic() - self.breaker.opened_at if self.breaker.opened_at is not None else None
            log.info("breaker closed: deliveries resumed", extra={
                "connector": self.connector, "open_seconds": round(down, 3) if down is not None else None})
        task = asyncio.get_running_loop().create_task(self._apply(opened), name=f"breaker switch {self.connector}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, opened: bool) -> None:
        async with self._switch:
            if opened != self.breaker.is_open or self._stopped:  # changed again meanwhile: the next _apply acts
                return
            if opened:
                await asyncio.gather(*(consumer.pause() for consumer in self.consumers))
                if self._prober is None or self._prober.done():
                    self._prober = asyncio.create_task(self._probe_loop(), name=f"breaker probe {self.connector}")
            else:
                await self._resume()

    async def _resume(self) -> None:
        """Subscribe every paused consumer again; a broker that refuses now is tried again (the
        deliveries must not stay paused behind a closed breaker)."""
        while not self.breaker.is_open and not self._stopped:
            try:
                for consumer in self.consumers:
                    await consumer.start()
                return
            except Exception as exc:
                log.warning("cannot resume deliveries yet; trying again", extra={
                    "connector": self.connector, "error_class": type(exc).__name__})
                await self._pause(RESUME_RETRY)

    async def _probe_loop(self) -> None:
        """While open: every ``probe_every``, try one message of the next delivery queue that has one."""
        turn = 0
        while self.breaker.is_open and not self._stopped:
            wait = self.breaker.policy.probe_every - (self.breaker.clock() - (self.breaker.last_probe or 0.0))
            await self._pause(max(wait, IDLE_POLL))
            if self._stopped:
                return
            if not self.breaker.probe_due():
                continue
            for offset in range(len(self.probes)):
                queue, probe = self.probes[(turn + offset) % len(self.probes)]
                message = await self._take(queue)
                if message is None:
                    continue
                turn += offset + 1
                self.breaker.probed()
                log.info("breaker probe", extra={"connector": self.connector, "queue": queue})
                await self._try(probe, message)
                break

    async def _take(self, queue: str) -> IncomingMessage | None:
        try:
            return await self.broker.get(queue)
        except Exception as exc:  # the broker is away: the next probe tries again
            log.warning("breaker probe could not take a message", extra={
                "connector": self.connector, "queue": queue, "error_class": type(exc).__name__})
            return None

    async def _try(self, probe: Probe, message: IncomingMessage) -> None:
        try:
            await probe(message)  # the worker records the outcome on the breaker, parks on failure
        except EngineStopping:  # not a failure of the message: it goes back uncounted
            if not message.settled:
                await message.hand_back()
        except asyncio.CancelledError:  # the gate stops: the same, then stop
            if not message.settled:
                await asyncio.shield(message.hand_back())
            raise
        except Exception:
            log.exception("breaker probe failed", extra={"connector": self.connector})
            if not message.settled:
                with contextlib.suppress(Exception):
                    await message.reject(requeue=True)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when stop() is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def stop(self) -> None:
        """Stop probing and refreshing (the engine cancels and closes the consumers).

        The background loops are told to end and given ``STOP_WAIT`` to finish what they are doing:
        cancelling a depth read or a probe's basic.get in the middle is what once made a SIGTERM hang
        (aiormq turns a channel open cancelled mid-way into a connection error, CHANNEL_ERROR
        "expected 'channel.open'", which closes the connection and reaches the caller instead of the
        cancel, so the refresh loop took it for a broker hiccup and went on). What is still running
        then is cancelled, waited for ``STOP_WAIT`` more, and logged if it is still there."""
        self._stopped = True
        self._stopping.set()
        tasks = [task for task in (self._prober, self._refresher, *self._tasks) if task is not None and not task.done()]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=STOP_WAIT)
        for task in pending:
            task.cancel()
        if pending:
            finished, pending = await asyncio.wait(pending, timeout=STOP_WAIT)
            done |= finished
        for task in done:  # retrieved: an error on the way out is no news
            if not task.cancelled() and task.exception() is not None:
                log.debug("breaker task ended with an error while stopping", extra={
                    "connector": self.connector, "task": task.get_name(),
                    "error_class": type(task.exception()).__name__})
        if pending:
            log.warning("breaker tasks still running after stop; left to end on their own", extra={
                "connector": self.connector, "tasks": sorted(task.get_name() for task in pending)})
