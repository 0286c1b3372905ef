"""What the journal answers: a message's path (``middleware trace``, the console's trace search) and a
route's SLA state (``middleware status``, the console). Pure functions over a store's records.

Stable API (the console relies on it)::

    paths = trace(store, "MSG00001")             # list[MessagePath], [] when nothing is found
    state = sla_state(store, route, now=time.time())  # SlaState
    store.oldest_pending(route_name, connector)  # Unix seconds the oldest undelivered message came in
    store.last_received(route_name)              # Unix seconds the route last took a message in
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from middleware.journal.config import ERROR_RATE_WINDOW, Sla
from middleware.journal.records import (
    DEAD_LETTERED,
    DELIVER,
    DELIVERED,
    INGEST,
    PARKED,
    RETRY,
    ROUTE,
    ROUTED,
    Hop,
)
from middleware.journal.store import SqlStore

PENDING_WINDOW = 7 * 86400.0  # seconds: how far back status looks for undelivered messages


@dataclass
class DeliveryPath:
    """An event's trip to one connector: every attempt, retry, parking and its end."""

    connector: str
    outcome: str = "pending"  # delivered | dead_lettered | pending (retrying or parked, not finished)
    attempts: int = 0
    retries: int = 0
    parked: int = 0
    first_at: float | None = None
    last_at: float | None = None
    seconds: float | None = None  # from the message's receipt to the end of this delivery
    error_class: str | None = None
    detail: str | None = None  # the last status or note (breaker, HTTP status)


@dataclass
class EventPath:
    event_id: str
    event_type: str | None
    routed_at: float
    event_time: float | None = None
    deliveries: list[DeliveryPath] = field(default_factory=list)


@dataclass
class MessagePath:
    """One inbound message: source -> route -> events -> deliveries -> dead letters."""

    correlation_id: str
    route: str
    message_id: str | None = None
    source_id: str | None = None  # MSH-10 / resource id
    source: str | None = None  # ingest source (mllp:<listener>, http:<listener>, publish, ...)
    received_at: float | None = None
    routed_at: float | None = None
    outcome: str = "pending"  # routed | filtered | dead_lettered | pending (not taken by its route yet)
    error_class: str | None = None
    events: list[EventPath] = field(default_factory=list)
    dead_letters: list[Hop] = field(default_factory=list)
    hops: list[Hop] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, times as Unix seconds."""
        return {
            "correlation_id": self.correlation_id, "route": self.route, "message_id": self.message_id,
            "source_id": self.source_id, "source": self.source, "received_at": self.received_at,
            "routed_at": self.routed_at, "outcome": self.outcome, "error_class": self.error_class,
            "events": [{**{k: v for k, v in e.__dict__.items() if k != "deliveries"},
                        "deliveries": [d.__dict__ for d in e.deliveries]} for e in self.events],
            "dead_letters": [h.to_dict() for h in self.dead_letters],
            "hops": [h.to_dict() for h in self.hops],
        }


def trace(store: SqlStore, key: str, limit: int = 20) -> list[MessagePath]:
    """The path of every message ``key`` names (correlation id, message id, MSH-10 / resource id or
    event id), oldest first; at most ``limit`` correlation ids."""
    return build_paths(store.hops(store.correlation_ids(key, limit)))


def build_paths(hops: list[Hop]) -> list[MessagePath]:
    """Group records (oldest first) into message paths: ingest and route records by inbound message,
    delivery records under their event."""
    paths: dict[str, MessagePath] = {}
    events: dict[str, tuple[MessagePath, EventPath]] = {}
    for hop in hops:  # inbound first: a delivery may be recorded before its routing record's time
        if hop.stage in (INGEST, ROUTE):
            key = hop.message_id or hop.correlation_id or ""
            path = paths.get(key)
            if path is None:
                path = paths[key] = MessagePath(hop.correlation_id or "", hop.route, hop.message_id)
            _take_inbound(path, hop, events)
    for hop in hops:
        if hop.stage in (INGEST, ROUTE):
            continue
        if hop.stage == DELIVER and hop.event_id in events:
            path, event = events[hop.event_id]
            path.hops.append(hop)
            _take_delivery(path, event, hop)
        else:  # a delivery whose routing record is gone (pruned, or journal was off then)
            key = f"event:{hop.event_id}"
            path = paths.get(key) or paths.setdefault(key, MessagePath(hop.correlation_id or "", hop.route,
                                                                       outcome=ROUTED))
            event = EventPath(hop.event_id or "", hop.event_type, hop.at)
            path.events.append(event)
            events[hop.event_id or ""] = (path, event)
            path.hops.append(hop)
            _take_delivery(path, event, hop)
    for path in paths.values():
        path.hops.sort(key=lambda h: h.at)
    return sorted(paths.values(), key=lambda p: p.hops[0].at if p.hops else 0.0)


def _take_inbound(path: MessagePath, hop: Hop, events: dict[str, tuple[MessagePath, EventPath]]) -> None:
    path.hops.append(hop)
    path.source_id = path.source_id or hop.source_id
    path.source = path.source or hop.source
    path.received_at = path.received_at or hop.received_at or (hop.at if hop.stage == INGEST else None)
    if hop.stage == INGEST:
        if hop.outcome == DEAD_LETTERED:
            path.outcome, path.error_class = DEAD_LETTERED, hop.error_class
            path.dead_letters.append(hop)
        return
    path.routed_at = path.routed_at or hop.at
    path.outcome = hop.outcome
    if hop.outcome == DEAD_LETTERED:
        path.error_class = hop.error_class
        path.dead_letters.append(hop)
    elif hop.outcome == ROUTED and hop.event_id and hop.event_id not in events:
        event = EventPath(hop.event_id, hop.event_type, hop.at, hop.event_time)
        path.events.append(event)
        events[hop.event_id] = (path, event)


def _take_delivery(path: MessagePath, event: EventPath, hop: Hop) -> None:
    delivery = next((d for d in event.deliveries if d.connector == hop.connector), None)
    if delivery is None:
        delivery = DeliveryPath(hop.connector or "", first_at=hop.at)
        event.deliveries.append(delivery)
    delivery.last_at = hop.at
    delivery.attempts = max(delivery.attempts, hop.attempt or 1)
    delivery.detail = hop.detail or delivery.detail
    if hop.outcome == RETRY:
        delivery.retries += 1
    elif hop.outcome == PARKED:
        delivery.parked += 1
    elif hop.outcome in (DELIVERED, DEAD_LETTERED):
        delivery.outcome = hop.outcome
        start = path.received_at or event.routed_at
        delivery.seconds = hop.at - start
        if hop.outcome == DEAD_LETTERED:
            delivery.error_class = hop.error_class
            path.dead_letters.append(hop)


# -- SLA ------------------------------------------------------------------------------------------


@dataclass
class SlaState:
    """A route's SLA as the journal shows it. ``None`` in a field: not configured or not known."""

    route: str
    sla: Sla | None
    last_received: float | None = None
    silent: bool | None = None  # no message for longer than silent_after
    oldest_pending: dict[str, float] = field(default_factory=dict)  # "inbound" or connector -> age (s)
    deliver_breached: bool | None = None  # some message waits longer than deliver_within
    error_rate: float | None = None  # dead letters / messages over the last ERROR_RATE_WINDOW
    error_breached: bool | None = None

    @property
    def state(self) -> str:
        """``ok``, ``breach`` (a limit is exceeded), or ``-`` (no SLA configured)."""
        if self.sla is None:
            return "-"
        return "breach" if any((self.silent, self.deliver_breached, self.error_breached)) else "ok"

    @property
    def breaches(self) -> list[str]:
        return [name for name, on in (("silent", self.silent), ("deliver_within", self.deliver_breached),
                                      ("max_error_rate", self.error_breached)) if on]

    def to_dict(self) -> dict[str, Any]:
        return {"route": self.route, "state": self.state, "breaches": self.breaches,
                "sla": self.sla.__dict__ if self.sla else None, "last_received": self.last_received,
                "silent": self.silent, "oldest_pending_seconds": self.oldest_pending,
                "error_rate": self.error_rate}


def sla_state(store: SqlStore, route: Any, now: float | None = None) -> SlaState:
    """The SLA state of a compiled ``route`` (its ``name``, ``deliver`` and optional ``sla``)."""
    now = time.time() if now is None else now
    sla: Sla | None = getattr(route, "sla", None)
    state = SlaState(route.name, sla, store.last_received(route.name))
    since = now - PENDING_WINDOW
    for connector in [None, *(d.connector for d in route.deliver)]:
        oldest = store.oldest_pending(route.name, connector, since)
        if oldest is not None:
            state.oldest_pending[connector or "inbound"] = max(0.0, now - oldest)
    counts = store.outcome_counts(route.name, now - ERROR_RATE_WINDOW)
    handled = sum(n for (stage, _), n in counts.items() if stage == ROUTE)
    failed = sum(n for (_, outcome), n in counts.items() if outcome == DEAD_LETTERED)
    state.error_rate = failed / handled if handled else None
    if sla is None:
        return state
    if sla.silent_after is not None:
        state.silent = state.last_received is None or now - state.last_received > sla.silent_after
    if sla.deliver_within is not None:
        state.deliver_breached = any(age > sla.deliver_within for age in state.oldest_pending.values())
    if sla.max_error_rate is not None:
        state.error_breached = state.error_rate is not None and state.error_rate > sla.max_error_rate
    return state
