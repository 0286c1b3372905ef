"""The journal writer: hop records queued in memory, written in batches by a background task.

:meth:`Journal.record` is what the workers call on the hot path: it appends a tuple to a list and
never waits, raises or touches the store. A background task writes the list in batches from a
worker thread. The queue is bounded: when the store is down or slow, records past ``max_queue``
(and batches the store refused) are dropped and counted (``middleware_journal_dropped_total``),
and the failure is logged once until a write succeeds again. The pipeline never blocks on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from middleware.journal.config import JournalSettings
from middleware.journal.records import Hop, Row
from middleware.journal.store import SqlStore, open_store

log = logging.getLogger("middleware.journal")
PRUNE_EVERY = 3600.0  # seconds between retention passes
STOP_TIMEOUT = 5.0  # seconds stop() waits for the store to take the last records


class NullJournal:
    """The journal when ``journal: {enabled: false}``: records nothing, finds nothing."""

    enabled = False

    def record(self, route: str, stage: str, outcome: str, **fields: Any) -> None:
        """Do nothing."""

    async def start(self) -> None:
        """Do nothing."""

    async def stop(self) -> None:
        """Do nothing."""


class Journal(NullJournal):
    """Hop records to a store, off the hot path (module docstring). ``metrics``: an
    :class:`middleware.observe.Metrics` (for the written / dropped counters), optional."""

    enabled = True

    def __init__(self, settings: JournalSettings, metrics: Any = None, *, store: SqlStore | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._store = store
        self._pending: list[Row] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._stopping = False
        self.dropped = 0
        self.written = 0

    @property
    def store(self) -> SqlStore:
        """The store (opened on first use): what :mod:`middleware.journal.query` reads."""
        if self._store is None:
            self._store = open_store(self.settings.url)
        return self._store

    def record(self, route: str, stage: str, outcome: str, **fields: Any) -> None:
        """Queue one hop (keywords: the other :class:`Hop` fields; ``at`` defaults to now)."""
        if len(self._pending) >= self.settings.max_queue:
            self._drop(1, "queue full")
            return
        get = fields.get
        self._pending.append((get("at") or time.time(), route, stage, outcome, get("correlation_id"),
                              get("message_id"), get("source_id"), get("event_id"), get("event_type"),
                              get("connector"), get("attempt"), get("event_time"), get("received_at"),
                              get("error_class"), get("source"), get("detail")))
        if len(self._pending) >= self.settings.batch_size:
            self._wake.set()

    def hop(self, hop: Hop) -> None:
        """Queue a :class:`Hop` as it is."""
        self.record(**{k: v for k, v in hop.__dict__.items()})

    async def start(self) -> None:
        """Open the store (in a thread), prune by age, start the background writer. A store that
        cannot be opened is logged and the engine runs on, dropping (and counting) the records."""
        try:
            await asyncio.to_thread(lambda: self.store.prune(time.time() - self.settings.retention))
        except Exception as exc:
            self._fail(exc)
        self._task = asyncio.create_task(self._run(), name="journal-writer")

    async def stop(self) -> None:
        """Write what is still queued (the last flush) and stop the background writer. A store that does
        not answer within ``STOP_TIMEOUT`` seconds does not hold up the engine's stop: what is left is
        dropped and counted."""
        task, self._task = self._task, None
        if task is None:
            await self.flush()
        else:
            self._stopping = True
            self._wake.set()
            done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                self._drop(len(self._pending), "store did not answer on stop")
                self._pending.clear()
                self._store = None  # a thread may still be stuck in it: not closed here, it would wait too
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None

    async def flush(self) -> None:
        """Write everything queued now, in batches."""
        while self._pending:
            batch = self._pending[: self.settings.batch_size]
            del self._pending[: self.settings.batch_size]
            try:
                await asyncio.to_thread(self._write, batch)
            except Exception as exc:  # the store is down: drop this batch, never the pipeline
                self._fail(exc)
                self._drop(len(batch), "store failed")
                continue
            self.written += len(batch)
            if self.metrics is not None:
                self.metrics.journal_written.inc(len(batch))
            if self._failing:
                self._failing = False
                log.warning("journal store writes again")

    def _write(self, batch: list[Row]) -> None:
        self.store.write(batch)  # opens the store here, in the worker thread, when it is not open

    async def _run(self) -> None:
        last_prune = time.monotonic()
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.flush_interval)
            self._wake.clear()
            await self.flush()
            if time.monotonic() - last_prune > PRUNE_EVERY:
                last_prune = time.monotonic()
                try:
                    await asyncio.to_thread(self.store.prune, time.time() - self.settings.retention)
                except Exception as exc:
                    self._fail(exc)
        await self.flush()  # stopping: what came in meanwhile

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        if self.metrics is not None:
            self.metrics.journal_dropped.inc(count)
        if not self._failing:
            self._failing = True
            log.warning("journal records dropped", extra={"reason": why, "dropped": count})

    def _fail(self, exc: Exception) -> None:
        if not self._failing:
            self._failing = True
            log.warning("journal store failed; records are dropped until it answers again",
                        extra={"error_class": type(exc).__name__})
            self._store_reset()

    def _store_reset(self) -> None:
        """Forget a broken connection: the next write opens the store again."""
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()


NULL_JOURNAL = NullJournal()


def open_journal(settings: JournalSettings, metrics: Any = None) -> NullJournal:
    """The engine's journal: a :class:`Journal`, or the no-op one when ``journal.enabled`` is false."""
    return Journal(settings, metrics) if settings.enabled else NULL_JOURNAL
