"""Which files were published, and how far a file being published got (file semantics of ingest).

A file is identified by the SHA-256 of its bytes (:func:`file_digest`). The ledger lives in the
project's ``var/`` folder (or the folder ``MIDDLEWARE_INGEST_LEDGER`` names):

- ``var/ingest-ledger.jsonl``: one JSON line per file published to the end (route, digest, file name,
  records, published, dead-lettered, problems, time). The same digest offered again to the same route
  is recognised (:meth:`Ledger.finished`) and not republished unless forced.
- ``var/ingest-checkpoints/<route>.<digest>``: while a file is published, the last position up to which
  every record is confirmed, rewritten in place after each confirm (a fixed-width number, one
  ``pwrite``: a killed process loses nothing the kernel was handed). Publishing the same file again
  resumes after it; the file is removed when the file is finished. A restart repeats at most the
  records that were in flight (the publisher's window), never loses one.

Durability against a power loss or kernel crash (not only a killed process): a checkpoint is
``fdatasync``-ed at most every ``sync_interval`` seconds (:data:`SYNC_INTERVAL`) and when it is closed,
so such a crash repeats at most the records confirmed in that interval on top of the window; a
checkpoint that lags is only ever behind, never ahead, so it never skips a record. Ledger lines are
fsynced as they are appended, and every file created, renamed or removed here has its directory
fsynced too (:func:`fsync_dir`), so the name survives with the data.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

LEDGER_FILE = "ingest-ledger.jsonl"
CHECKPOINTS = "ingest-checkpoints"
_WIDTH = 20  # digits of a checkpoint (rewritten in place: always the same length)
SYNC_INTERVAL = 0.05  # seconds between a checkpoint's fdatasyncs (one per confirm would cost ~120 µs each)


def fsync_dir(folder: Path) -> None:
    """Make the names created, renamed or removed in ``folder`` durable (POSIX: fsync the directory)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(stream: BinaryIO, chunk: int = 1 << 20) -> str:
    """``sha256:<hex>`` of everything left in ``stream`` (read in chunks: any size)."""
    digest = hashlib.sha256()
    while block := stream.read(chunk):
        digest.update(block)
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class Finished:
    """A ledger line: a file published to the end."""

    route: str
    digest: str
    file: str
    records: int
    published: int
    dead_lettered: int
    at: str


class Checkpoint:
    """The confirmed position of one file being published (see the module docstring)."""

    def __init__(self, path: Path, sync_interval: float = SYNC_INTERVAL) -> None:
        self.path = path
        self.sync_interval = sync_interval
        self._fd: int | None = None
        self._synced_at = float("-inf")  # the first write is synced at once
        self._dirty = False
        self.position = 0
        self.syncs = 0  # fdatasyncs done (the cost of durability, for tests and benchmarks)

    def advance(self, position: int) -> None:
        """Every record up to ``position`` is confirmed."""
        if position <= self.position:
            return
        if self._fd is None:
            self._open()
        assert self._fd is not None
        os.pwrite(self._fd, str(position).rjust(_WIDTH).encode(), 0)
        self.position, self._dirty = position, True
        if time.monotonic() - self._synced_at >= self.sync_interval:
            self._sync()

    def _open(self) -> None:
        folder = self.path.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        existed = self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        if not existed:
            fsync_dir(folder)

    def _sync(self) -> None:
        if self._fd is not None and self._dirty:
            os.fdatasync(self._fd)
            self.syncs += 1
            self._dirty = False
        self._synced_at = time.monotonic()

    def close(self) -> None:
        """Sync what was written and close (the checkpoint stays: the file resumes after it)."""
        if self._fd is not None:
            try:
                self._sync()
            finally:
                os.close(self._fd)
                self._fd = None

    def remove(self) -> None:
        """The file is finished: no resume point is left."""
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.path.parent)


class Ledger:
    """The project's record of published files and resume points (``var/`` of the project)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LEDGER_FILE

    @classmethod
    def of_project(cls, root: Path, env: Mapping[str, str] | None = None) -> Ledger:
        """The ledger of the project in ``root``: its ``var/`` folder, or ``MIDDLEWARE_INGEST_LEDGER``
        (a folder; tests and several checkouts sharing one project point it elsewhere)."""
        folder = (os.environ if env is None else env).get("MIDDLEWARE_INGEST_LEDGER")
        return cls(Path(folder) if folder else root / "var")

    def finished(self, route: str, digest: str) -> Finished | None:
        """The last time this file was published to the end on ``route``, if it was."""
        if not self.path.exists():
            return None
        found: Finished | None = None
        with self.path.open("rb") as lines:
            for line in lines:
                try:
                    entry: Mapping[str, Any] = orjson.loads(line)
                except orjson.JSONDecodeError:  # a line cut short by a crash while appending
                    continue
                if entry.get("route") == route and entry.get("digest") == digest:
                    found = Finished(**{key: entry[key] for key in Finished.__dataclass_fields__})
        return found

    def record(self, route: str, digest: str, file: str, *, records: int, published: int, dead_lettered: int,
               problems: list[str]) -> None:
        """Append that ``file`` was published to the end on ``route``."""
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.folder.parent)
        created = not self.path.exists()
        entry = {"route": route, "digest": digest, "file": file, "records": records, "published": published,
                 "dead_lettered": dead_lettered, "problems": problems,
                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, orjson.dumps(entry) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.folder)

    def checkpoint(self, route: str, digest: str) -> Checkpoint:
        """The resume point of ``digest`` on ``route`` (position 0: nothing confirmed yet)."""
        point = Checkpoint(self.folder / CHECKPOINTS / f"{route}.{digest.removeprefix('sha256:')}")
        try:
            point.position = int(point.path.read_bytes().strip() or 0)
        except (FileNotFoundError, ValueError):
            point.position = 0
        return point
