"""Dead-letter records: the original body unchanged plus headers saying what failed and how to replay.

Headers (all prefixed ``x-mw-``): route, stage (parse/filter/map/validate/deliver), connector,
error-class, error, attempts, first-failure, last-failure, correlation-id, replay-queue (where
``middleware dlq replay`` sends the body back). The original message's own headers are kept
(for example ``x-mw-source-file`` and ``x-mw-batch-position`` of a message split from a batch).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from middleware.broker.base import IncomingMessage, OutgoingMessage

PREFIX = "x-mw-"
REASON_HEADERS = frozenset(PREFIX + name for name in (
    "route", "stage", "connector", "error-class", "error", "attempts", "first-failure", "last-failure",
    "correlation-id", "replay-queue"))
_MAX_ERROR_TEXT = 2000


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dead_letter(
    message: IncomingMessage,
    *,
    route: str,
    stage: str,
    error: BaseException,
    replay_queue: str,
    correlation_id: str | None,
    connector: str | None = None,
    attempts: int = 1,
    first_failure: str | None = None,
) -> OutgoingMessage:
    """The dead-letter message for ``message``, which failed at ``stage`` with ``error``."""
    return dead_letter_body(
        message.body, headers=message.headers, content_type=message.content_type,
        message_id=message.message_id, message_correlation_id=message.correlation_id,
        route=route, stage=stage, error=error, replay_queue=replay_queue, correlation_id=correlation_id,
        connector=connector, attempts=attempts, first_failure=first_failure,
    )


def dead_letter_body(
    body: bytes,
    *,
    route: str,
    stage: str,
    error: BaseException,
    replay_queue: str,
    correlation_id: str | None,
    headers: Mapping[str, Any] | None = None,
    content_type: str | None = None,
    message_id: str | None = None,
    message_correlation_id: str | None = None,
    connector: str | None = None,
    attempts: int = 1,
    first_failure: str | None = None,
) -> OutgoingMessage:
    """The dead-letter message for raw ``body`` that never was a broker message (an ingest gateway's)."""
    now = _now()
    kept = {k: v for k, v in (headers or {}).items() if k not in REASON_HEADERS}  # a replayed message's old reason goes
    kept.update({
        f"{PREFIX}route": route,
        f"{PREFIX}stage": stage,
        f"{PREFIX}error-class": type(error).__name__,
        f"{PREFIX}error": str(error)[:_MAX_ERROR_TEXT],
        f"{PREFIX}attempts": attempts,
        f"{PREFIX}first-failure": first_failure or now,
        f"{PREFIX}last-failure": now,
        f"{PREFIX}replay-queue": replay_queue,
    })
    if connector:
        kept[f"{PREFIX}connector"] = connector
    if correlation_id:
        kept[f"{PREFIX}correlation-id"] = correlation_id
    return OutgoingMessage(
        body=body,
        headers=kept,
        correlation_id=correlation_id or message_correlation_id,
        message_id=message_id,
        content_type=content_type or "application/octet-stream",
    )


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter as read back from its queue."""

    body: bytes
    route: str
    stage: str
    error_class: str
    error: str
    attempts: int
    first_failure: str
    last_failure: str
    replay_queue: str
    correlation_id: str | None
    connector: str | None
    message_id: str | None
    headers: dict[str, Any]

    @classmethod
    def from_message(cls, message: IncomingMessage) -> DeadLetter:
        """Read the ``x-mw-`` headers of a consumed dead-letter message."""
        h = message.headers

        def text(key: str) -> str:
            return str(h.get(PREFIX + key, ""))

        return cls(
            body=message.body, route=text("route"), stage=text("stage"), error_class=text("error-class"),
            error=text("error"), attempts=int(h.get(PREFIX + "attempts", 0) or 0),
            first_failure=text("first-failure"), last_failure=text("last-failure"),
            replay_queue=text("replay-queue"),
            correlation_id=text("correlation-id") or message.correlation_id,
            connector=text("connector") or None,
            message_id=message.message_id, headers=dict(h),
        )
