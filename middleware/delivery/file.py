"""``type: file``: append each event as one JSON line, fsynced before the delivery is acked."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import orjson

from middleware.delivery.base import Connector, ConnectorSpec, Delivery, register
from middleware.errors import DeliveryError

log = logging.getLogger("middleware.delivery")
_LOCKS: dict[Path, asyncio.Lock] = {}


@register("file")
class FileConnector(Connector):
    """Appends to ``path`` (relative paths are resolved against the project folder by the loader).

    Several connectors or workers writing the same file share one lock, so lines never interleave.
    Delivery is at-least-once: a crash between fsync and ack repeats the line on redelivery;
    consumers dedupe on the event ``id``.
    """

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        self.path = Path(str(spec.options["path"])).resolve()
        self._fd: int | None = None

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._open)
        except OSError as exc:  # not fatal: each send retries, then dead-letters with the reason
            log.warning("cannot open file connector target", extra={"connector": self.name, "error": exc.strerror})

    def _open(self) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    async def send(self, delivery: Delivery) -> None:
        line = delivery.body
        if b"\n" in line:  # keep one event per line whatever the producer's formatting
            line = orjson.dumps(orjson.loads(line))
        lock = _LOCKS.setdefault(self.path, asyncio.Lock())
        async with lock:
            try:
                await asyncio.to_thread(self._append, line + b"\n")
            except OSError as exc:
                raise DeliveryError(f"{self.name}: cannot write {self.path}: {exc.strerror or exc}",
                                    retryable="connection" in self.spec.retry.retry_on,
                                    hint="check the disk and the folder's permissions") from None

    def _append(self, line: bytes) -> None:
        self._open()
        assert self._fd is not None
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    async def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def describe(self) -> str:
        return f"file {self.path}"
