"""CloudEvents 1.0 envelopes (structured JSON), deterministic event ids and correlation ids."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from middleware import dates
from middleware.schemas import schema_urn

# Fixed namespace: changing it would change every event id ever issued.
EVENT_ID_NAMESPACE = uuid.UUID("6f1f2e1c-35a4-5d0b-9c39-2f7b8d0c4a11")
_NAMESPACE_BYTES = EVENT_ID_NAMESPACE.bytes


def event_id(route: str, source_identity: Sequence[str], event_type: str, index: int) -> str:
    """UUIDv5 of (route, the message's source identity, event type, index of the event in the message).

    ``source_identity`` is what tells the input apart from every other one (HL7 v2: MSH-3, MSH-4,
    MSH-10, MSH-7; FHIR: resourceType, id, versionId or a content digest; plus batch id and position
    for a record of a batch); ``event_type`` is the full CloudEvents type (``patient.admitted.v1``).
    The same input gives the same ids; a different sender, resource version or event type other ones.
    The parts are JSON-encoded, so no choice of characters in them can make two inputs collide.
    """
    return uuid5_text(orjson.dumps([route, list(source_identity), event_type, index]))


def uuid5_text(name: bytes) -> str:
    """``str(uuid.uuid5(EVENT_ID_NAMESPACE, name))`` for a UTF-8 name, without building a UUID object
    (one per event on the hot path): SHA-1 of namespace + name, version 5 and RFC 4122 variant bits set."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def resolve_correlation_id(amqp_correlation_id: str | None, message_id: str | None,
                           header_correlation_id: str | None) -> str:
    """The AMQP ``correlation_id``, else the message's own id (MSH-10), else the
    ``X-Correlation-ID`` header, else a new UUID."""
    for candidate in (amqp_correlation_id, message_id, header_correlation_id):
        if candidate:
            return candidate
    return str(uuid.uuid4())


def rfc3339(iso: str | None, tz: dt.tzinfo) -> str | None:
    """The envelope ``time`` for an ISO 8601 value: a date-time keeps its fraction digits as sent and
    its offset (a naive one is read in ``tz``, the same rule as ``as: datetime`` in ``data``); a date
    is midnight in ``tz``. None for a year or year-month (no RFC 3339 form) or an invalid value."""
    if not iso:
        return None
    try:
        when = dates.parse(iso)
    except dates.DateFormatError:
        return None
    return rfc3339_when(when, tz)


def rfc3339_when(when: dates.When | None, tz: dt.tzinfo) -> str | None:
    """:func:`rfc3339` for an already checked value (None stays None)."""
    if when is None:
        return None
    if when.precision is dates.Precision.DAY:
        when = when._replace(hour=0, minute=0, second=0)
    elif when.precision is not dates.Precision.DATETIME:
        return None
    return when.in_zone(tz).iso()


def build_event(*, route: str, event_type: str, major: int, index: int, source_identity: Sequence[str],
                data: dict[str, Any], subject: str | None, time: str, correlation_id: str) -> dict[str, Any]:
    """A structured-mode CloudEvent whose ``data`` has already passed its schema."""
    cloud_type = f"{event_type}.v{major}"
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id(route, source_identity, cloud_type, index),
        "type": cloud_type,
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
