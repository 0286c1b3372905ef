"""One journal record per hop of a message: ids, route, stage, outcome, times — never a payload."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Column order of the journal table (and of the tuples the writer queues).
COLUMNS = ("at", "route", "stage", "outcome", "correlation_id", "message_id", "source_id", "event_id",
           "event_type", "connector", "attempt", "event_time", "received_at", "error_class", "source", "detail")
ID_COLUMNS = ("correlation_id", "message_id", "source_id", "event_id")  # indexed: what `trace` looks up

# Stages and outcomes written by the engine (H2's parking may add deliver/parked).
INGEST, ROUTE, DELIVER = "ingest", "route", "deliver"
RECEIVED, ROUTED, FILTERED, DEAD_LETTERED = "received", "routed", "filtered", "dead_lettered"
DELIVERED, RETRY, PARKED = "delivered", "retry", "parked"
FINISHED = (DELIVERED, DEAD_LETTERED)  # a delivery hop that ends an event's trip to one connector

Row = tuple[Any, ...]  # values in COLUMNS order


@dataclass(frozen=True)
class Hop:
    """One journal record.

    ``at``: when the hop happened (Unix seconds); ``source_id``: the message's own id (HL7 MSH-10, a
    FHIR resource id); ``received_at``: when the message entered the middleware; ``event_time``: the
    event's business time (CloudEvents ``time``); ``source``: the ingest source (``mllp:ehr-adt``);
    ``detail``: a short non-PHI note (the dead-letter stage, an HTTP status).
    """

    at: float
    route: str
    stage: str
    outcome: str
    correlation_id: str | None = None
    message_id: str | None = None
    source_id: str | None = None
    event_id: str | None = None
    event_type: str | None = None
    connector: str | None = None
    attempt: int | None = None
    event_time: float | None = None
    received_at: float | None = None
    error_class: str | None = None
    source: str | None = None
    detail: str | None = None

    @classmethod
    def from_row(cls, row: Row) -> Hop:
        return cls(*row)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}
