"""Journal stores: SQLite (embedded default, stdlib ``sqlite3``) and PostgreSQL (``psycopg`` 3).

Both are synchronous and thread-safe (one connection behind a lock): the writer calls them from a
worker thread, never on the event loop. The SQL is shared; only DDL, placeholders and the bulk
insert differ (SQLite ``executemany`` in one transaction, PostgreSQL ``COPY``).
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from middleware.errors import MiddlewareError
from middleware.journal.records import (
    COLUMNS,
    DEAD_LETTERED,
    DELIVER,
    FINISHED,
    ID_COLUMNS,
    INGEST,
    ROUTE,
    ROUTED,
    Hop,
    Row,
)

log = logging.getLogger("middleware.journal")
TABLE = "mw_journal"
MARKS = "mw_journal_marks"  # per (route, connector): every record routed before ``at`` was finished
MARK_MARGIN = 120.0  # seconds the watermark stays behind now
_SELECT = ", ".join(COLUMNS)
_INDEXES = [f"CREATE INDEX IF NOT EXISTS {TABLE}_{c} ON {TABLE} ({c})" for c in ID_COLUMNS] + [
    f"CREATE INDEX IF NOT EXISTS {TABLE}_route_stage_at ON {TABLE} (route, stage, at)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_at ON {TABLE} (at)",
    f"CREATE TABLE IF NOT EXISTS {MARKS} (name TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL)",
]


class JournalError(MiddlewareError):
    """The journal store cannot be opened or queried."""


class SqlStore:
    """What both stores share: the queries behind ``trace``, ``status`` and the console."""

    placeholder = "?"

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # -- driver-specific ---------------------------------------------------------------------------

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    def write(self, rows: Sequence[Row]) -> None:
        """Insert ``rows`` (tuples in :data:`COLUMNS` order) in one transaction."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return self._execute(self._sql(sql), params)

    def prune(self, before: float) -> None:
        """Delete records older than ``before`` (Unix seconds): retention by age."""
        self._query(f"DELETE FROM {TABLE} WHERE at < ?", (before,))

    def correlation_ids(self, key: str, limit: int = 20) -> list[str]:
        """Correlation ids of the messages ``key`` names: a correlation id, message id, MSH-10 /
        resource id or event id (senders reuse MSH-10s, so one key may name several messages)."""
        parts = " UNION ".join(f"SELECT correlation_id FROM {TABLE} WHERE {c} = ?" for c in ID_COLUMNS)
        rows = self._query(f"SELECT correlation_id FROM ({parts}) AS found "
                           f"WHERE correlation_id IS NOT NULL LIMIT ?", (*([key] * len(ID_COLUMNS)), limit))
        return [str(r[0]) for r in rows]

    def hops(self, correlation_ids: Iterable[str]) -> list[Hop]:
        """Every record of these correlation ids, oldest first."""
        ids = list(correlation_ids)
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        rows = self._query(f"SELECT {_SELECT} FROM {TABLE} WHERE correlation_id IN ({marks}) ORDER BY at, id", ids)
        return [Hop.from_row(tuple(r)) for r in rows]

    def last_received(self, route: str) -> float | None:
        """When ``route`` last took in a message (at a gateway or at its route worker), Unix seconds."""
        found = [r[0] for stage in (INGEST, ROUTE)
                 for r in self._query(f"SELECT MAX(at) FROM {TABLE} WHERE route = ? AND stage = ?", (route, stage))
                 if r[0] is not None]
        return max(found) if found else None

    def oldest_pending(self, route: str, connector: str | None = None, since: float = 0.0) -> float | None:
        """When the oldest message still on its way entered the middleware (Unix seconds), or None.

        With ``connector``: the oldest event routed since ``since`` with no delivered / dead-lettered
        record for that connector. Without: the oldest message taken in by a gateway since ``since``
        that its route worker has not finished. Read where the broker cannot tell a queue's head age.

        The search starts at a watermark kept in the store (``mw_journal_marks``): everything routed
        before it was finished when last looked at, so a later call reads only what came after (a
        million finished records are read once, not at every ``status``). The watermark stays
        ``MARK_MARGIN`` seconds behind now, for records of other engines still in their write batch."""
        mark = f"{route}/{connector or ''}"  # names are [a-z0-9_-]: no clash
        found = self._query(f"SELECT at FROM {MARKS} WHERE name = ?", (mark,))
        start = max(since, float(found[0][0]) if found else since)
        row = self._oldest_pending(route, connector, start)
        through = min(row[0] if row else time.time(), time.time() - MARK_MARGIN)
        if through > start:
            try:
                self._query(f"INSERT INTO {MARKS} (name, at) VALUES (?, ?) "
                            "ON CONFLICT (name) DO UPDATE SET at = excluded.at", (mark, through))
            except Exception as exc:  # a read-only journal (an operator's status): slower next time, still right
                log.debug("journal watermark not saved", extra={"error_class": type(exc).__name__})
        if row is None:
            return None
        at, received_at = row
        return float(received_at if received_at is not None else at)

    def _oldest_pending(self, route: str, connector: str | None, since: float) -> Row | None:
        if connector is not None:
            rows = self._query(
                f"SELECT r.at, r.received_at FROM {TABLE} r WHERE r.route = ? AND r.stage = ? AND r.at >= ? "
                f"AND r.outcome = ? AND NOT EXISTS (SELECT 1 FROM {TABLE} d WHERE d.event_id = r.event_id "
                f"AND d.stage = ? AND d.connector = ? AND d.outcome IN (?, ?)) ORDER BY r.at LIMIT 1",
                (route, ROUTE, since, ROUTED, DELIVER, connector, *FINISHED))
        else:
            rows = self._query(
                f"SELECT r.at, r.received_at FROM {TABLE} r WHERE r.route = ? AND r.stage = ? AND r.at >= ? "
                f"AND r.outcome <> ? AND NOT EXISTS (SELECT 1 FROM {TABLE} d WHERE d.message_id = r.message_id "
                f"AND d.stage = ?) ORDER BY r.at LIMIT 1",
                (route, INGEST, since, DEAD_LETTERED, ROUTE))
        return tuple(rows[0]) if rows else None

    def outcome_counts(self, route: str, since: float) -> dict[tuple[str, str], int]:
        """Messages per (stage, outcome) of ``route`` since ``since``; routed messages counted once
        (a message with three events writes three routed records)."""
        counts: dict[tuple[str, str], int] = {}
        for stage in (INGEST, ROUTE, DELIVER):  # per stage: each read is a range of the (route, stage, at) index
            rows = self._query(f"SELECT outcome, COUNT(DISTINCT COALESCE(message_id, event_id, correlation_id)) "
                               f"FROM {TABLE} WHERE route = ? AND stage = ? AND at >= ? GROUP BY outcome",
                               (route, stage, since))
            counts.update({(stage, str(o)): int(n) for o, n in rows})
        return counts

    def count(self) -> int:
        return int(self._query(f"SELECT COUNT(*) FROM {TABLE}")[0][0])


# rows per INSERT: 256 x 16 columns stays under SQLite's 32,766 variables (999 before SQLite 3.32)
_CHUNKS = (256, 64, 16, 4, 1) if sqlite3.sqlite_version_info >= (3, 32) else (32, 8, 2, 1)


@functools.cache
def _insert_sql(rows: int) -> str:
    """``INSERT ... VALUES (?, ...), ...`` for ``rows`` rows: one text per size, so sqlite3's statement
    cache keeps each prepared."""
    one = "(" + ", ".join("?" * len(COLUMNS)) + ")"
    return f"INSERT INTO {TABLE} ({_SELECT}) VALUES " + ", ".join([one] * rows)


class SqliteStore(SqlStore):
    """The embedded journal: one SQLite file in WAL mode (readers never wait for the writer)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY, at REAL NOT NULL, "
                             "route TEXT, stage TEXT, outcome TEXT, correlation_id TEXT, message_id TEXT, "
                             "source_id TEXT, event_id TEXT, event_type TEXT, connector TEXT, attempt INTEGER, "
                             "event_time REAL, received_at REAL, error_class TEXT, source TEXT, detail TEXT)")
            for ddl in _INDEXES:
                self._db.execute(ddl)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"journal: cannot open SQLite file {path}: {exc}",
                               hint="check journal.url in config/middleware.yaml and the folder's permissions") from exc

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._db.execute(sql, params).fetchall()

    def write(self, rows: Sequence[Row]) -> None:
        """One transaction of multi-row INSERTs, ``_CHUNKS`` rows at a time: sqlite3 releases the GIL
        around each statement's step, so a batch costs the event loop a handful of GIL switches, not
        one per row as ``executemany`` did."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                start = 0
                for size in _CHUNKS:
                    while len(rows) - start >= size:
                        chunk = rows[start:start + size]
                        self._db.execute(_insert_sql(size), [value for row in chunk for value in row])
                        start += size
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresStore(SqlStore):
    """The journal in PostgreSQL (psycopg 3): batches go in with ``COPY``."""

    placeholder = "%s"

    def __init__(self, url: str) -> None:
        super().__init__()
        import psycopg  # optional dependency: pip install 'middleware[postgres]'

        self._psycopg = psycopg
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=10)
            with self._db.cursor() as cursor:
                cursor.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id BIGSERIAL PRIMARY KEY, "
                               "at DOUBLE PRECISION NOT NULL, route TEXT, stage TEXT, outcome TEXT, "
                               "correlation_id TEXT, message_id TEXT, source_id TEXT, event_id TEXT, event_type TEXT, "
                               "connector TEXT, attempt INTEGER, event_time DOUBLE PRECISION, "
                               "received_at DOUBLE PRECISION, error_class TEXT, source TEXT, detail TEXT)")
                for ddl in _INDEXES:
                    cursor.execute(ddl)
        except psycopg.Error as exc:
            raise JournalError(f"journal: cannot open PostgreSQL database: {exc}",
                               hint="check journal.url in config/middleware.yaml (postgresql://user@host/db)") from exc

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._db.cursor() as cursor:
            cursor.execute(sql, params)  # SQL built from constants, values always as parameters
            return list(cursor.fetchall()) if cursor.description else []

    def write(self, rows: Sequence[Row]) -> None:
        with self._lock, self._db.transaction(), self._db.cursor() as cursor, \
                cursor.copy(f"COPY {TABLE} ({_SELECT}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(url: str, *, create: bool = True) -> SqlStore:
    """The store for a ``journal.url``: ``sqlite:///<absolute path>`` or ``postgresql://...``. With
    ``create`` false (readers: trace, status), a SQLite file that does not exist is a JournalError."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        path = Path(url[len("sqlite:///"):])
        if not create and not path.exists():
            raise JournalError(f"no journal at {path} yet", hint="it is written by `middleware run` (journal: in "
                                                                 "config/middleware.yaml)")
        return SqliteStore(path)
    if scheme in ("postgresql", "postgres"):
        try:
            return PostgresStore(url)
        except ImportError as exc:
            raise JournalError("journal: a postgresql:// URL needs psycopg",
                               hint="pip install 'middleware[postgres]'") from exc
    raise JournalError(f"journal: unsupported URL scheme {scheme!r}", hint="use sqlite:/// or postgresql://")
