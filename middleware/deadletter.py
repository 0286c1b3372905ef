"""Dead-letter records: the original body unchanged plus headers saying what failed and how to replay.

Headers (all prefixed ``x-mw-``): route, stage (parse/filter/map/validate/deliver), connector,
error-class, error, attempts, first-failure, last-failure, correlation-id, replay-queue (where
``middleware dlq replay`` sends the body back). The original message's own headers are kept
(for example ``x-mw-source-file`` and ``x-mw-batch-position`` of a message split from a batch).

A message the broker itself dead-lettered at its delivery limit (RabbitMQ ``x-death`` with reason
``delivery_limit``; the embedded broker's ``x-mw-delivery-limit-exceeded``: the engine was killed
or lost its connection while handling it each time) carries none of those headers; reading it
presents the same fields, taken from the broker's record (see :meth:`DeadLetter.from_message`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from middleware.broker.base import Broker, IncomingMessage, OutgoingMessage
from middleware.observe import mask_secrets

PREFIX = "x-mw-"
REASON_HEADERS = frozenset(PREFIX + name for name in (
    "route", "stage", "connector", "error-class", "error", "attempts", "first-failure", "last-failure",
    "correlation-id", "replay-queue", "last-error", "parked"))  # the last two: a parked delivery's (delivery.parking)
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
        f"{PREFIX}error": mask_secrets(str(error))[:_MAX_ERROR_TEXT],  # a URL in it may carry a password
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
    def from_message(cls, message: IncomingMessage, *, route: str | None = None,
                     delivery_limit: int | None = None) -> DeadLetter:
        """Read the ``x-mw-`` headers of a consumed dead-letter message.

        Without them, a broker's delivery-limit record is presented the same way (see
        :func:`_from_broker_death`); ``route`` (the route whose dead-letter queue it was read from)
        and ``delivery_limit`` (``engine.delivery_limit``) fill in what that record lacks."""
        h = message.headers

        def text(key: str) -> str:
            return str(h.get(PREFIX + key, ""))

        if not text("stage"):
            death = _broker_death(h)
            if death is not None:
                return _from_broker_death(message, death, route, delivery_limit)
        return cls(
            body=message.body, route=text("route"), stage=text("stage"), error_class=text("error-class"),
            error=text("error"), attempts=int(h.get(PREFIX + "attempts", 0) or 0),
            first_failure=text("first-failure"), last_failure=text("last-failure"),
            replay_queue=text("replay-queue"),
            correlation_id=text("correlation-id") or message.correlation_id,
            connector=text("connector") or None,
            message_id=message.message_id, headers=dict(h),
        )


LIMIT_ERROR_CLASS = "DeliveryLimitExceeded"


def _broker_death(headers: Mapping[str, Any]) -> tuple[str, str] | None:
    """(source queue, time) if the broker dead-lettered this message at its delivery limit, else None."""
    marked = headers.get(DELIVERY_LIMIT_HEADER)
    if marked:
        return str(marked), ""
    deaths = headers.get("x-death")
    for death in deaths if isinstance(deaths, list) else ():
        if isinstance(death, Mapping) and str(death.get("reason", "")) == "delivery_limit":
            when = death.get("time")
            if isinstance(when, dt.datetime):
                stamp = when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            else:
                stamp = str(when or "")
            return str(death.get("queue", "")), stamp
    return None


def _from_broker_death(message: IncomingMessage, death: tuple[str, str], route: str | None,
                       delivery_limit: int | None) -> DeadLetter:
    """A broker-dead-lettered message as a dead letter: stage ``deliver`` if it came from a delivery
    queue (an event: ``x-mw-route`` is set, the connector is in the queue name), else ``parse`` (the
    route worker never finished with it); attempts from the embedded broker's count, else
    ``delivery_limit`` + 1 (RabbitMQ delivers ``x-delivery-count`` 0 … limit), else 0 (unknown)."""
    h = message.headers
    queue, when = death
    event_route = h.get(PREFIX + "route")
    route = str(event_route) if event_route else (route or "")
    connector = None
    if event_route and f"{event_route}.to." in queue:
        connector = queue.split(f"{event_route}.to.", 1)[1]
    count = h.get("x-delivery-count")
    if isinstance(count, int) and count > 0:
        attempts = count
    else:
        attempts = delivery_limit + 1 if delivery_limit is not None else 0
    times = f"{attempts} deliveries" if attempts else "its delivery limit"
    return DeadLetter(
        body=message.body, route=route, stage="deliver" if event_route else "parse",
        error_class=LIMIT_ERROR_CLASS,
        error=(f"dead-lettered by the broker from {queue} after {times} without an ack: the engine "
               "stopped abruptly (killed, crashed or lost its connection) while handling it each time"),
        attempts=attempts, first_failure="", last_failure=when, replay_queue=queue,
        correlation_id=message.correlation_id, connector=connector, message_id=message.message_id,
        headers=dict(h),
    )


# -- reading, replaying and removing dead letters (``middleware dlq``) ---------------------------

REPLAYED_FROM = PREFIX + "replayed-from"
RECEIVED_AT = PREFIX + "received-at"  # when it first came in (middleware.journal.hooks.RECEIVED_AT_HEADER)
REPLAY_COUNT = PREFIX + "replay-count"
DELIVERY_LIMIT_HEADER = PREFIX + "delivery-limit-exceeded"  # the embedded broker's poison-message mark
# broker bookkeeping a replay must not carry back into a work queue (a stale x-delivery-count would
# count against the delivery limit there)
_BROKER_HEADERS = ("x-delivery-count", "x-death", "x-first-death-", "x-last-death-", DELIVERY_LIMIT_HEADER)
DEFAULT_SCAN = 10_000


def _is_broker_header(name: str) -> bool:
    return any(name == h or (h.endswith("-") and name.startswith(h)) for h in _BROKER_HEADERS)


def letter_id(message: IncomingMessage) -> str:
    """A stable id for a dead letter: its message id, else the start of a sha256 of body and headers.

    Broker bookkeeping headers (delivery counts) are left out, so reading a dead letter never
    changes its id."""
    if message.message_id:
        return message.message_id
    headers = {k: v for k, v in message.headers.items() if not _is_broker_header(k)}
    digest = hashlib.sha256(message.body)
    digest.update(json.dumps(headers, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Held:
    """A dead letter fetched from its queue and not settled yet."""

    queue: str
    id: str
    message: IncomingMessage
    letter: DeadLetter


@dataclass
class Browse:
    """Dead letters held (fetched, unacked) from one queue while a command works on them."""

    broker: Broker
    queue: str
    held: list[Held]
    matched: list[Held]
    settled: set[int] = field(default_factory=set)

    async def ack(self, item: Held) -> None:
        """Remove ``item`` from its queue for good."""
        await item.message.ack()
        self.settled.add(id(item))

    async def release(self) -> None:
        """Give back every held dead letter not acked, in its place and unchanged.

        RabbitMQ puts a rejected message back at its position (dead-letter queues are classic
        queues, so no delivery is counted). The embedded spool broker's requeue would rewrite the
        message at the queue's tail with a bumped ``x-delivery-count``; there a held message is
        instead left for :meth:`Broker.close`, which moves its spool file back untouched, so order
        and headers stay as they were."""
        spooled = bool(getattr(self.broker, "spooled", False))
        for item in self.held:
            if id(item) in self.settled:
                continue
            self.settled.add(id(item))
            if not spooled:
                await item.message.reject(requeue=True)


async def browse(broker: Broker, queue: str, limit: int, *,
                 match: Callable[[Held], bool] | None = None, scan: int = DEFAULT_SCAN,
                 route: str | None = None, delivery_limit: int | None = None) -> Browse:
    """Fetch dead letters from ``queue`` and hold them (unacked) until ``limit`` of them match
    ``match`` (every one when None), ``scan`` were fetched or the queue is empty. ``route`` and
    ``delivery_limit`` complete broker-dead-lettered ones (:meth:`DeadLetter.from_message`).

    Nothing is lost if the process dies meanwhile: the broker gives unacked messages back. Call
    :meth:`Browse.release` (then close the broker) when done."""
    result = Browse(broker, queue, [], [])
    try:
        while len(result.matched) < limit and len(result.held) < scan:
            message = await broker.get(queue)
            if message is None:
                break
            letter = DeadLetter.from_message(message, route=route, delivery_limit=delivery_limit)
            item = Held(queue, letter_id(message), message, letter)
            result.held.append(item)
            if match is None or match(item):
                result.matched.append(item)
    except BaseException:
        await result.release()
        raise
    return result


def replay_target(letter: DeadLetter) -> str | None:
    """Where a replay sends the body: ``x-mw-replay-queue``, else the queue a broker's delivery limit
    moved a poison message from."""
    if letter.replay_queue:
        return letter.replay_queue
    marked = letter.headers.get(DELIVERY_LIMIT_HEADER)
    if marked:
        return str(marked)
    deaths = letter.headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping) and deaths[0].get("queue"):
        return str(deaths[0]["queue"])
    return None


def _epoch(stamp: object) -> float | None:
    """An ISO 8601 ``x-mw-first-failure`` as Unix seconds (None when absent or not a date-time)."""
    try:
        return dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp() if stamp else None
    except ValueError:
        return None


def replay_message(message: IncomingMessage, dead_letter_queue: str) -> OutgoingMessage:
    """The message a replay publishes: the body unchanged, the original headers without the failure
    reason (and broker bookkeeping), marked ``x-mw-replayed-from`` and ``x-mw-replay-count``.

    ``x-mw-received-at`` is kept, so ages and ``deliver_within`` count from the first receipt, not
    from the replay; a dead letter without it (written before it was stamped at ingest) gets its
    first failure's time, the latest it can have come in."""
    headers = {k: v for k, v in message.headers.items() if k not in REASON_HEADERS and not _is_broker_header(k)}
    if RECEIVED_AT not in headers:
        first = _epoch(message.headers.get(PREFIX + "first-failure"))
        if first is not None:
            headers[RECEIVED_AT] = f"{first:.6f}"  # as text, as middleware.journal.hooks.stamp writes it
    try:
        count = int(headers.get(REPLAY_COUNT, 0) or 0)
    except (TypeError, ValueError):
        count = 0
    headers[REPLAYED_FROM] = dead_letter_queue
    headers[REPLAY_COUNT] = count + 1
    return OutgoingMessage(body=message.body, headers=headers, correlation_id=message.correlation_id,
                           message_id=message.message_id,
                           content_type=message.content_type or "application/octet-stream")


async def replay(browse_: Browse, item: Held, target: str) -> OutgoingMessage:
    """Publish ``item`` back to ``target``; ack the dead letter only once the broker confirmed it
    (a crash in between duplicates, never loses)."""
    outgoing = replay_message(item.message, browse_.queue)
    await browse_.broker.publish(outgoing, queue=target)
    await browse_.ack(item)
    return outgoing


# -- exporting dead letters ---------------------------------------------------------------------------

def masked_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """``headers`` for display: every text value with the URLs in it masked (an older dead letter's
    ``x-mw-error`` may still carry a password)."""
    return {k: mask_secrets(v) if isinstance(v, str) else v for k, v in headers.items()}


def export_record(item: Held) -> dict[str, Any]:
    """One dead letter as ``dlq export`` writes it: reason, ids, headers (URLs masked) and the exact
    body (``body_base64``, plus ``body_text`` when it is UTF-8)."""
    letter, message = item.letter, item.message
    record: dict[str, Any] = {
        "id": item.id, "queue": item.queue, "route": letter.route, "stage": letter.stage,
        "connector": letter.connector, "error_class": letter.error_class, "error": mask_secrets(letter.error),
        "attempts": letter.attempts, "first_failure": letter.first_failure, "last_failure": letter.last_failure,
        "correlation_id": letter.correlation_id, "replay_queue": replay_target(letter),
        "message_id": message.message_id, "content_type": message.content_type,
        "headers": masked_headers(letter.headers), "bytes": len(letter.body),
        "body_base64": base64.b64encode(letter.body).decode("ascii"),
    }
    with contextlib.suppress(UnicodeDecodeError):
        record["body_text"] = letter.body.decode("utf-8")
    return record


def write_private_file(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write ``data`` to a new file at ``path`` readable by its owner only (0600), fsynced.

    Never through a symbolic link (not even a dangling one) and never over an existing file unless
    ``force``; then a regular file is replaced by a new one renamed over it (never truncated in
    place). Raises OSError, ``strerror`` saying why."""
    if path.is_symlink():
        raise OSError(errno.ELOOP, "it is a symbolic link (not followed)", str(path))
    if path.exists() and not force:
        raise FileExistsError(errno.EEXIST, "it exists (add --force to replace it)", str(path))
    if path.exists() and not path.is_file():
        raise IsADirectoryError(errno.EISDIR, "it is not a regular file", str(path))
    target = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp") if force else path
    # O_EXCL: the file is ours and new; with O_NOFOLLOW no link planted meanwhile is followed
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)
    if target != path:
        os.replace(target, path)  # replaces the name (a link planted meanwhile too), never writes through it
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
