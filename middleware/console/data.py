"""What the console shows, gathered in one place: per-route figures, dead-letter groups, replay,
reveal and trace.

Sources: queue depths through the broker port (or the embedded spool's folder, which also gives the
oldest message's age), counters from the engine's :class:`~middleware.observe.Metrics`, dead letters
through :mod:`middleware.deadletter` (the functions ``middleware dlq`` uses), and the audit log of
:mod:`middleware.audit`. Figures no source gives yet (SLA state, last received, breaker, oldest age
on RabbitMQ, trace) are None and shown as "—"; :class:`Extras` is where they are wired in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from middleware.audit import AuditLog
from middleware.broker import make_broker
from middleware.broker.base import Broker
from middleware.cli.status import RouteStatus, fill_from_broker, fill_from_spool, route_queues, spool_folder
from middleware.deadletter import Browse, Held, browse, replay, replay_target
from middleware.errors import BrokerError
from middleware.observe import Metrics, mask_secrets
from middleware.project import Project
from middleware.topology import Topology

T = TypeVar("T")
RATE_WINDOW = 60.0  # seconds of counter history rates are computed over
DEAD_LETTER_SCAN = 1000  # dead letters read per page view (the rest are counted, not grouped)
COUNTERS = ("received", "delivered", "dead_lettered")
_COUNTER_NAMES = {"received": "middleware_messages_received", "delivered": "middleware_events_delivered",
                  "dead_lettered": "middleware_dead_lettered"}


@dataclass
class Extras:
    """Figures other parts of the engine provide; each returns None when it cannot tell."""

    oldest_age: Callable[[str], float | None] = lambda route: None  # seconds, for brokers that cannot say
    sla_state: Callable[[str], str | None] = lambda route: None  # "ok", "breach", ...
    last_received: Callable[[str], float | None] = lambda route: None  # Unix time
    silent_after: Callable[[str], float | None] = lambda route: None  # seconds without input = silent feed
    breaker: Callable[[str, str], str | None] = lambda route, connector: None  # "closed", "open", "half-open"
    trace: Callable[[str], Any] | None = None  # id -> list of hop dicts; None: no journal


@dataclass
class RouteRow:
    """One line of the routes page."""

    route: str
    description: str
    inbound_depth: int | None
    delivery_depth: int | None
    dead_letters: int | None
    oldest_age: float | None
    received_per_s: float | None
    delivered_per_s: float | None
    dead_lettered_per_s: float | None
    received_total: int
    delivered_total: int
    sla_state: str | None
    last_received: float | None
    silent: bool
    breakers: dict[str, str | None] = field(default_factory=dict)

    @property
    def state(self) -> str:
        """The row's state in words (never colour alone): silent, breach, breaker open, or ok / unknown."""
        if self.silent:
            return "silent"
        if self.sla_state and self.sla_state != "ok":
            return self.sla_state
        if any(state == "open" for state in self.breakers.values()):
            return "breaker open"
        return self.sla_state or "ok"


@dataclass
class Group:
    """Dead letters of one route that failed at the same stage with the same error class."""

    stage: str
    error_class: str
    count: int = 0
    first_seen: str = ""
    last_seen: str = ""
    connectors: set[str] = field(default_factory=set)
    example_error: str = ""

    def add(self, item: Held) -> None:
        letter = item.letter
        self.count += 1
        first = letter.first_failure or letter.last_failure
        if first and (not self.first_seen or first < self.first_seen):
            self.first_seen = first
        if letter.last_failure and letter.last_failure > self.last_seen:
            self.last_seen = letter.last_failure
            self.example_error = mask_secrets(letter.error)[:300]
        if letter.connector:
            self.connectors.add(letter.connector)


@dataclass
class DeadLetters:
    """A route's dead-letter queue as the console shows it (no bodies)."""

    route: str
    depth: int
    groups: list[Group]
    letters: list[dict[str, Any]]
    scanned: int


def group_letters(items: list[Held]) -> list[Group]:
    """Dead letters grouped by (stage, error class), most recent last-seen first."""
    groups: dict[tuple[str, str], Group] = {}
    for item in items:
        key = (item.letter.stage, item.letter.error_class)
        groups.setdefault(key, Group(*key)).add(item)
    return sorted(groups.values(), key=lambda g: (g.last_seen, g.count), reverse=True)


def letter_summary(item: Held) -> dict[str, Any]:
    """A dead letter's ids and reason, never its body."""
    letter = item.letter
    return {"id": item.id, "stage": letter.stage, "error_class": letter.error_class,
            "error": mask_secrets(letter.error)[:300], "connector": letter.connector, "attempts": letter.attempts,
            "first_failure": letter.first_failure, "last_failure": letter.last_failure,
            "correlation_id": letter.correlation_id, "replay_queue": replay_target(letter),
            "bytes": len(letter.body)}


class RateTracker:
    """Per-route rates from snapshots of the engine's counters, kept over :data:`RATE_WINDOW`."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.clock = clock
        self.history: deque[tuple[float, dict[str, dict[str, float]]]] = deque()

    def totals(self) -> dict[str, dict[str, float]]:
        """counter -> route -> total now."""
        result: dict[str, dict[str, float]] = {name: {} for name in COUNTERS}
        wanted = {f"{metric}_total": name for name, metric in _COUNTER_NAMES.items()}
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                name = wanted.get(sample.name)
                if name:
                    route = sample.labels.get("route", "")
                    result[name][route] = result[name].get(route, 0.0) + sample.value
        return result

    def sample(self) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]] | None]:
        """(totals now, per-second rates over the window or None on the first sample)."""
        now, totals = self.clock(), self.totals()
        while self.history and now - self.history[0][0] > RATE_WINDOW:
            self.history.popleft()
        rates = None
        if self.history and now - self.history[0][0] >= 0.5:
            then, before = self.history[0]
            elapsed = now - then
            rates = {name: {route: max(value - before[name].get(route, 0.0), 0.0) / elapsed
                            for route, value in totals[name].items()} for name in COUNTERS}
        self.history.append((now, totals))
        return totals, rates


class ConsoleData:
    """Gathers and acts for the console; one per engine."""

    def __init__(self, project: Project, metrics: Metrics, extras: Extras | None = None) -> None:
        self.project = project
        self.settings = project.settings
        self.topology = Topology.of(project.routes.values(), self.settings.queue_prefix)
        self.extras = extras or Extras()
        self.rates = RateTracker(metrics)
        self.audit = AuditLog(self.settings.audit_path)
        self._info_broker: Broker | None = None
        self._dead_letter_lock = asyncio.Lock()  # one browse at a time: two would hide letters from each other

    # -- routes page ---------------------------------------------------------------------------------

    async def routes(self) -> list[RouteRow]:
        """Every route with its depths, rates, age, SLA state, last input and breakers."""
        statuses = route_queues(self.project)
        await self._fill_depths(statuses)
        totals, rates = self.rates.sample()
        now = time.time()
        rows = []
        for status in statuses:
            name = status.route
            route = self.project.routes[name]
            inbound = next(q for q in status.queues if q.role == "inbound")
            deliveries = [q for q in status.queues if q.role == "delivery"]
            delivery_depth = (sum(q.messages or 0 for q in deliveries)
                              if all(q.messages is not None or not q.declared for q in deliveries) else None)
            ages = [q.oldest_age_seconds for q in status.queues
                    if q.role != "dead-letter" and q.oldest_age_seconds is not None]
            oldest = max(ages) if ages else self.extras.oldest_age(name)
            last = self.extras.last_received(name)
            silent_after = self.extras.silent_after(name)
            silent = bool(silent_after and (last is None or now - last > silent_after))

            def rate(counter: str, route_name: str = name) -> float | None:
                return None if rates is None else round(rates[counter].get(route_name, 0.0), 2)

            rows.append(RouteRow(
                route=name, description=route.description, inbound_depth=inbound.messages,
                delivery_depth=delivery_depth, dead_letters=status.dead_letters, oldest_age=oldest,
                received_per_s=rate("received"), delivered_per_s=rate("delivered"),
                dead_lettered_per_s=rate("dead_lettered"),
                received_total=int(totals["received"].get(name, 0)),
                delivered_total=int(totals["delivered"].get(name, 0)),
                sla_state=self.extras.sla_state(name), last_received=last, silent=silent,
                breakers={rule.connector: self.extras.breaker(name, rule.connector) for rule in route.deliver}))
        return rows

    async def _fill_depths(self, statuses: list[RouteStatus]) -> None:
        folder = spool_folder(self.settings.broker_url)
        if folder is not None:
            await asyncio.to_thread(fill_from_spool, statuses, folder)
            return
        try:
            broker = await self._broker()
            await fill_from_broker(statuses, broker)
        except (BrokerError, OSError, TimeoutError):
            await self._drop_broker()  # reconnect at the next refresh; depths stay unknown meanwhile
            for status in statuses:
                for queue in status.queues:
                    queue.messages = None

    async def _broker(self) -> Broker:
        if self._info_broker is None:
            broker = make_broker(self.settings.broker_url, self.settings.broker_tls)
            await asyncio.wait_for(broker.connect(), 10)
            self._info_broker = broker
        return self._info_broker

    async def _drop_broker(self) -> None:
        broker, self._info_broker = self._info_broker, None
        if broker is not None:
            with contextlib.suppress(Exception):
                await broker.close()

    async def close(self) -> None:
        """Close the broker connection used for queue depths."""
        await self._drop_broker()

    # -- dead letters ----------------------------------------------------------------------------------

    def dead_letter_queue(self, route: str) -> str:
        """The route's dead-letter queue; KeyError for an unknown route."""
        return self.topology.route(route).dead_letter

    async def _hold(self, route: str, match: Callable[[Held], bool] | None, limit: int,
                    work: Callable[[Browse], Awaitable[T]]) -> tuple[T, int]:
        """Hold ``route``'s dead letters (as ``middleware dlq`` does, on a connection of its own), run
        ``work``, give back what it did not settle."""
        queue = self.dead_letter_queue(route)
        async with self._dead_letter_lock:
            broker = make_broker(self.settings.broker_url, self.settings.broker_tls)
            await broker.connect()
            held: Browse | None = None
            try:
                try:
                    depth = (await broker.queue_info(queue)).messages
                except BrokerError:
                    depth = 0  # not declared yet: nothing dead-lettered
                if depth:
                    held = await browse(broker, queue, limit, match=match, scan=DEAD_LETTER_SCAN, route=route,
                                        delivery_limit=self.settings.delivery_limit)
                else:
                    held = Browse(broker, queue, [], [])
                return await work(held), depth
            finally:
                try:
                    if held is not None:
                        with contextlib.suppress(Exception):
                            await held.release()
                finally:
                    await broker.close()

    async def dead_letters(self, route: str) -> DeadLetters:
        """The route's dead letters grouped by stage and error class (first :data:`DEAD_LETTER_SCAN` read)."""
        async def work(held: Browse) -> tuple[list[Group], list[dict[str, Any]], int]:
            return group_letters(held.matched), [letter_summary(i) for i in held.matched], len(held.held)

        (groups, letters, scanned), depth = await self._hold(route, None, DEAD_LETTER_SCAN, work)
        return DeadLetters(route, depth, groups, letters, scanned)

    async def replay_group(self, route: str, stage: str, error_class: str, *, who: str, client: str) -> int:
        """Replay every dead letter of ``route`` that failed at ``stage`` with ``error_class``; audited.

        The audit log is checked first (AuditError: nothing is replayed); the record lists what was
        replayed even if a later replay failed. Returns how many were replayed."""
        self.audit.check()

        def match(item: Held) -> bool:
            return item.letter.stage == stage and item.letter.error_class == error_class

        async def work(held: Browse) -> int:
            done: list[tuple[str, str]] = []
            try:
                for item in held.matched:
                    target = replay_target(item.letter)
                    if target:
                        await replay(held, item, target)
                        done.append((item.id, target))
            finally:
                self.audit.append("console replay", [i for i, _ in done], routes=[route], stage=stage,
                                  error_class=error_class, to=sorted({t for _, t in done}),
                                  console_user=who, client=client)
            return len(done)

        count, _ = await self._hold(route, match, DEAD_LETTER_SCAN, work)
        return count

    async def reveal(self, route: str, letter_id: str, *, who: str, client: str) -> tuple[dict[str, Any], bytes]:
        """One dead letter's summary and body; audited before the body is returned.

        Raises KeyError when no dead letter of the route has that id."""
        self.audit.check()

        def match(item: Held) -> bool:
            return item.id == letter_id

        async def work(held: Browse) -> tuple[dict[str, Any], bytes] | None:
            if not held.matched:
                return None
            item = held.matched[0]
            return {**letter_summary(item), "content_type": item.message.content_type}, item.letter.body

        found, _ = await self._hold(route, match, 1, work)
        if found is None:
            raise KeyError(letter_id)
        self.audit.append("console reveal", [letter_id], routes=[route], console_user=who, client=client)
        return found

    # -- trace -----------------------------------------------------------------------------------------

    async def trace(self, wanted: str) -> list[dict[str, Any]] | None:
        """The journal's hops for an id (correlation id, MSH-10, event id); None when no journal is on."""
        if self.extras.trace is None:
            return None
        result = self.extras.trace(wanted)
        if asyncio.iscoroutine(result):
            result = await result
        return list(result or [])


def console_extras(engine: Any) -> Extras:
    """The figures a running engine can give beyond queues and counters (see :class:`Extras`)."""
    return Extras()
