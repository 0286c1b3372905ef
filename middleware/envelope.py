"""CloudEvents 1.0 envelopes (structured JSON), deterministic event ids and correlation ids."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any
from zoneinfo import ZoneInfo

from middleware.schemas import schema_urn

# Fixed namespace: changing it would change every event id ever issued.
EVENT_ID_NAMESPACE = uuid.UUID("6f1f2e1c-35a4-5d0b-9c39-2f7b8d0c4a11")


def event_id(route: str, source_message_id: str, index: int) -> str:
    """UUIDv5 of (route, source message id, event index): the same input yields the same id."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{route}\x1f{source_message_id}\x1f{index}"))


def resolve_correlation_id(amqp_correlation_id: str | None, message_id: str | None,
                           header_correlation_id: str | None) -> str:
    """The AMQP ``correlation_id``, else the message's own id (MSH-10), else the
    ``X-Correlation-ID`` header, else a new UUID."""
    for candidate in (amqp_correlation_id, message_id, header_correlation_id):
        if candidate:
            return candidate
    return str(uuid.uuid4())


def rfc3339(iso: str | None, tz: ZoneInfo) -> str | None:
    """Turn an ISO 8601 date or date-time into RFC 3339; naive times are read in ``tz``.

    Returns None for partial dates ("1980", "1980-01") that have no RFC 3339 form.
    """
    if not iso or len(iso) < 10:
        return None
    try:
        moment = dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return moment.isoformat().replace("+00:00", "Z")


def build_event(*, route: str, event_type: str, major: int, index: int, source_message_id: str,
                data: dict[str, Any], subject: str | None, time: str, correlation_id: str) -> dict[str, Any]:
    """A structured-mode CloudEvent whose ``data`` has already passed its schema."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id(route, source_message_id, index),
        "type": f"{event_type}.v{major}",
        "source": f"urn:middleware:route:{route}",
        "time": time,
        "datacontenttype": "application/json",
        "dataschema": schema_urn(event_type, major),
        "correlationid": correlation_id,
        "data": data,
    }
    if subject:
        event["subject"] = subject
    return event
