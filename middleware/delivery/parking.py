"""Parking a delivery on the broker while its sink is down (DESIGN promise 5).

When the retries in process are used up on a retryable outcome, the message is published (with a
confirm) to one of its delivery's delay queues, then the original is acked. The delay queue's TTL
sends it back to the delivery queue, where it is tried again. Its failure history travels in
headers, so retries stop at the policy's ``max_age`` and its dead letter (DESIGN promise 7) tells
the whole story:

- ``x-mw-attempts``: sends so far, every round included;
- ``x-mw-first-failure`` / ``x-mw-last-failure``: RFC 3339 UTC times;
- ``x-mw-last-error``: the last error (secrets masked), ``x-mw-parked``: times parked so far.

The tier waited is ``delays[parked]`` (the last tier repeats), or the first tier at least as long
as the sink's ``Retry-After``. These are pure functions plus :func:`park`, so a worker with other
needs (an ordered partition retries in place) can call or bypass them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from middleware.broker.base import Broker, IncomingMessage, OutgoingMessage
from middleware.durations import format_duration
from middleware.errors import DeliveryError
from middleware.observe import mask_secrets

ATTEMPTS = "x-mw-attempts"
FIRST_FAILURE = "x-mw-first-failure"
LAST_FAILURE = "x-mw-last-failure"
LAST_ERROR = "x-mw-last-error"
PARKED = "x-mw-parked"
_MAX_ERROR_TEXT = 500
# set by the broker on the way through a delay queue: not carried into the next park
_BROKER_HEADERS = frozenset({"x-death", "x-delivery-count", "x-first-death-exchange", "x-first-death-queue",
                             "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                             "x-last-death-reason", "x-mw-due"})


def timestamp(at: dt.datetime) -> str:
    """``at`` as the RFC 3339 UTC text used in failure headers (milliseconds, ``Z``)."""
    return at.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _time(value: object) -> dt.datetime | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    try:
        parsed = dt.datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None
    return parsed.replace(tzinfo=dt.UTC) if parsed is not None and parsed.tzinfo is None else parsed


def _count(value: object) -> int:
    try:
        return max(int(value), 0) if value is not None else 0  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class History:
    """What earlier rounds of a delivery left in its headers (all zero / None on its first delivery)."""

    attempts: int = 0
    first_failure: dt.datetime | None = None
    parked: int = 0
    last_error: str | None = None

    @classmethod
    def of(cls, headers: Mapping[str, Any]) -> History:
        """Read the failure headers; unreadable values count as absent (a message is never refused for them)."""
        error = headers.get(LAST_ERROR)
        return cls(_count(headers.get(ATTEMPTS)), _time(headers.get(FIRST_FAILURE)), _count(headers.get(PARKED)),
                   error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error) if error else None)


def not_sent(connector: str, last_error: str | None) -> DeliveryError:
    """Why a delivery is parked without a try: its connector's breaker is open (no send: 0 attempts)."""
    error = DeliveryError(f"{connector}: not sent, the circuit breaker is open"
                          + (f" (last error: {last_error})" if last_error else ""), retryable=True,
                          hint="the sink keeps failing; deliveries resume once a probe gets through")
    error.attempts = 0
    return error


def gave_up(error: DeliveryError, first_failure: dt.datetime, now: dt.datetime, max_age: float | None) -> DeliveryError:
    """``error`` as the final one of a delivery retried for ``max_age`` (not retryable any more)."""
    failing = format_duration(round((now - first_failure).total_seconds()))
    final = DeliveryError(f"{error.message}; still failing {failing} after the first failure "
                          f"(retry.max_age {format_duration(max_age)})", retryable=False, status=error.status,
                          route=error.route, correlation_id=error.correlation_id,
                          hint="the sink failed for longer than the connector's retry.max_age: fix it, then "
                               "replay the dead letters")
    final.attempts = error.attempts
    return final


def expired(first_failure: dt.datetime, max_age: float | None, now: dt.datetime) -> bool:
    """True once a delivery has been failing for ``max_age`` seconds (never for None: ``forever``)."""
    return max_age is not None and (now - first_failure).total_seconds() >= max_age


def tier(delays: Sequence[int], parked: int, retry_after: float | None = None) -> int:
    """Seconds to wait on the broker: ``delays[parked]`` (the last one repeats), and at least the
    sink's ``Retry-After`` where a tier that long exists (else the longest)."""
    wait = delays[min(parked, len(delays) - 1)]
    if retry_after:
        longer = [d for d in sorted(set(delays)) if d >= retry_after]
        wait = max(wait, longer[0] if longer else max(delays))
    return wait


def parked_message(message: IncomingMessage, *, attempts: int, first_failure: dt.datetime, now: dt.datetime,
                   error: BaseException, parked: int) -> OutgoingMessage:
    """The copy of ``message`` to park: body, ids and headers unchanged, the failure headers updated."""
    headers = {k: v for k, v in message.headers.items() if k not in _BROKER_HEADERS}
    headers.update({ATTEMPTS: attempts, FIRST_FAILURE: timestamp(first_failure), LAST_FAILURE: timestamp(now),
                    LAST_ERROR: mask_secrets(str(error))[:_MAX_ERROR_TEXT], PARKED: parked})
    return OutgoingMessage(body=message.body, headers=headers, correlation_id=message.correlation_id,
                           message_id=message.message_id,
                           content_type=message.content_type or "application/octet-stream")


async def park(broker: Broker, message: IncomingMessage, queue: str, copy: OutgoingMessage) -> None:
    """Publish ``copy`` to delay queue ``queue`` and wait for the confirm, then ack ``message``.

    A crash in between leaves both (at-least-once: the sink may see the event twice, and dedupes
    it by its ``Idempotency-Key``); a failed publish raises and leaves ``message`` unacked."""
    await broker.publish(copy, queue=queue)
    await message.ack()
