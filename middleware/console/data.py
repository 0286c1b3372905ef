"""What the console shows, gathered in one place: per-route figures, dead-letter groups, replay,
reveal and trace.

Sources: queue depths from :class:`middleware.depths.DepthSampler` (the embedded spool's folder also
gives the oldest message's age), counters and gauges from the engine's
:class:`~middleware.observe.Metrics` (rates, last received, silent feeds, breakers), the journal when it
is on (SLA state, the oldest message's age where the broker cannot tell, trace; through
:mod:`middleware.journal.query`), dead letters through :mod:`middleware.deadletter` (the functions
``middleware dlq`` uses) and the audit log of :mod:`middleware.audit`. A figure no source gives is
None, shown as "—".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from middleware.audit import AuditLog
from middleware.broker import make_broker
from middleware.deadletter import Browse, Held, browse, replay, replay_target
from middleware.depths import DepthSampler
from middleware.errors import BrokerError
from middleware.observe import Metrics, mask_secrets
from middleware.project import Project
from middleware.topology import Topology

log = logging.getLogger("middleware.console")
T = TypeVar("T")
RATE_WINDOW = 60.0  # seconds of counter history rates are computed over
DEAD_LETTER_SCAN = 1000  # dead letters read per page view (the rest are counted, not grouped)
COUNTERS = ("received", "delivered", "dead_lettered")
_COUNTER_NAMES = {"received": "middleware_messages_received", "delivered": "middleware_events_delivered",
                  "dead_lettered": "middleware_dead_lettered"}


@dataclass
class Extras:
    """What a running engine adds to queues and counters: its journal, when enabled."""

    journal: Any = None  # a middleware.journal.Journal (``enabled``): SLA state, oldest age, trace


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
    sla_state: str | None  # ok, breach (what is breached), or None: no SLA / no journal
    last_received: float | None
    silent: bool
    breakers: dict[str, str | None] = field(default_factory=dict)

    @property
    def state(self) -> str:
        """The row's state in words (never colour alone): silent, sla breach, breaker open, or ok."""
        if self.silent:
            return "silent"
        if self.sla_state and self.sla_state.startswith("breach"):
            return "sla breach"
        if any(state == "open" for state in self.breakers.values()):
            return "breaker open"
        return "ok"


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

    def __init__(self, project: Project, metrics: Metrics, extras: Extras | None = None,
                 depths: DepthSampler | None = None) -> None:
        self.project = project
        self.settings = project.settings
        self.metrics = metrics
        self.topology = Topology.of(project.routes.values(), self.settings.queue_prefix)
        self.extras = extras or Extras()
        self.depths = depths or DepthSampler(project, metrics)
        self.rates = RateTracker(metrics)
        self.audit = AuditLog(self.settings.audit_path)
        self._dead_letter_lock = asyncio.Lock()  # one browse at a time: two would hide letters from each other
        self._journal_failed = False

    # -- routes page ---------------------------------------------------------------------------------

    async def routes(self) -> list[RouteRow]:
        """Every route with its depths, rates, age, SLA state, last input and breakers."""
        statuses = await self.depths.sample()
        totals, rates = self.rates.sample()
        health = await self._journal_health()
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
            sla = health.get(name)
            if not ages and sla is not None and sla.oldest_pending:
                ages = list(sla.oldest_pending.values())  # the broker cannot tell (RabbitMQ): the journal can
            last = self._gauge("middleware_route_last_received_timestamp_seconds", route=name)
            if sla is not None and sla.last_received is not None:
                last = max(last or 0.0, sla.last_received)
            silent = self._gauge("middleware_sla_feed_silent", route=name) == 1 or bool(sla and sla.silent)

            def rate(counter: str, route_name: str = name) -> float | None:
                return None if rates is None else round(rates[counter].get(route_name, 0.0), 2)

            rows.append(RouteRow(
                route=name, description=route.description, inbound_depth=inbound.messages,
                delivery_depth=delivery_depth, dead_letters=status.dead_letters,
                oldest_age=max(ages) if ages else None,
                received_per_s=rate("received"), delivered_per_s=rate("delivered"),
                dead_lettered_per_s=rate("dead_lettered"),
                received_total=int(totals["received"].get(name, 0)),
                delivered_total=int(totals["delivered"].get(name, 0)),
                sla_state=_sla_text(sla), last_received=last, silent=silent,
                breakers={rule.connector: self._breaker(rule.connector) for rule in route.deliver}))
        return rows

    def _gauge(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def _breaker(self, connector: str) -> str | None:
        value = self._gauge("middleware_breaker_open", connector=connector)
        return None if value is None else ("open" if value else "closed")

    async def _journal_health(self) -> dict[str, Any]:
        """route -> the journal's SlaState (:func:`middleware.journal.query.sla_state`); {} without a
        journal or when its store fails (logged once)."""
        journal = self.extras.journal
        if journal is None or not getattr(journal, "enabled", False):
            return {}
        from middleware.journal.query import sla_state

        def read() -> dict[str, Any]:
            return {name: sla_state(journal.store, route) for name, route in self.project.routes.items()}

        try:
            health = await asyncio.to_thread(read)
        except Exception as exc:  # the journal is an aid: the page shows what else it knows
            if not self._journal_failed:
                log.warning("console: cannot read the journal", extra={"error_class": type(exc).__name__})
            self._journal_failed = True
            return {}
        self._journal_failed = False
        return health

    async def close(self) -> None:
        """Close the depth sampler's broker connection."""
        await self.depths.close()

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
            try:
                await broker.connect()
            except BaseException:  # cancelled or failed: leave no reconnecting connection behind
                with contextlib.suppress(Exception):
                    await broker.close()
                raise
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

    async def replay_group(self, route: str, stage: str, error_class: str, *, who: str, client: str,
                           limit: int = DEAD_LETTER_SCAN) -> int:
        """Replay the dead letters of ``route`` that failed at ``stage`` with ``error_class`` (at most
        ``limit``: the count the operator confirmed); audited.

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

        count, _ = await self._hold(route, match, limit, work)
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

    @property
    def journal_enabled(self) -> bool:
        return bool(self.extras.journal is not None and getattr(self.extras.journal, "enabled", False))

    async def trace(self, wanted: str) -> list[dict[str, Any]] | None:
        """The journal's paths for an id (correlation id, message id, MSH-10, event id), as
        :meth:`MessagePath.to_dict` gives them; None when no journal is on."""
        if not self.journal_enabled:
            return None
        from middleware.journal.query import trace

        journal = self.extras.journal
        return await asyncio.to_thread(lambda: [path.to_dict() for path in trace(journal.store, wanted)])

def console_extras(engine: Any) -> Extras:
    """What a running engine adds (see :class:`Extras`)."""
    journal = getattr(engine, "journal", None)
    return Extras(journal=journal if getattr(journal, "enabled", False) else None)


def _sla_text(state: Any) -> str | None:
    """``ok``, ``breach: silent, deliver_within``, or None (no SLA configured, or no journal)."""
    if state is None or state.sla is None:
        return None
    breaches = state.breaches
    return f"breach: {', '.join(breaches)}" if breaches else "ok"
