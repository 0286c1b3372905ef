"""``type: file``: append each event as one JSON line, fsynced before the delivery is acked."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from middleware.delivery.base import Connector, ConnectorSpec, Delivery, register
from middleware.errors import DeliveryError

log = logging.getLogger("middleware.delivery")


class _GroupWriter:
    """Appends lines to one file with group commit: the lines queued while a write+fsync runs go
    out together in the next one, and each sender resumes only after the fsync covering its line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def open(self) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    async def append(self, line: bytes) -> None:
        """Return once ``line`` is on disk (fsynced); raises ``OSError`` if it could not be written."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((line, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"fsync {self.path.name}")
        await done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write, b"".join(line for line, _ in batch))
            except OSError as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    def _write(self, data: bytes) -> None:
        self.open()
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


_WRITERS: dict[Path, _GroupWriter] = {}


SPEC: dict[str, Any] = {  # the keys of a connectors/<name>.yaml with type: file
    "type": "object",
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "minLength": 1,
                 "description": "file that gets one JSON line per event, fsynced before the ack; relative to "
                                "the project folder"},
    },
}


@register("file", SPEC)
class FileConnector(Connector):
    """Appends to ``path`` (relative paths are resolved against the project folder by the loader).

    Every connector writing the same file shares one writer, so lines never interleave. Writes are
    group-committed: one write and one fsync for all the events that arrived meanwhile, and no
    delivery is acked before the fsync that covers it. Delivery is at-least-once: a crash between
    fsync and ack repeats the line on redelivery; consumers dedupe on the event ``id``.
    """

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        self.path = Path(str(spec.options["path"])).resolve()
        self._writer = _WRITERS.setdefault(self.path, _GroupWriter(self.path))

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._writer.open)
        except OSError as exc:  # not fatal: each send retries, then dead-letters with the reason
            log.warning("cannot open file connector target", extra={"connector": self.name, "error": exc.strerror})

    async def send(self, delivery: Delivery) -> None:
        line = delivery.body
        if b"\n" in line:  # keep one event per line whatever the producer's formatting
            line = orjson.dumps(orjson.loads(line))
        try:
            await self._writer.append(line + b"\n")
        except OSError as exc:
            raise DeliveryError(f"{self.name}: cannot write {self.path}: {exc.strerror or exc}",
                                retryable="connection" in self.spec.retry.retry_on,
                                hint="check the disk and the folder's permissions") from None

    async def close(self) -> None:
        if _WRITERS.get(self.path) is self._writer:
            del _WRITERS[self.path]
        self._writer.close()

    def describe(self) -> str:
        return f"file {self.path}"
