"""The journal on the real PostgreSQL (MIDDLEWARE_TEST_POSTGRES_URL, default the local ``test`` database):
each test writes into a schema of its own, dropped afterwards."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from urllib.parse import quote

import pytest

from middleware.journal import Journal, JournalSettings, Sla, open_store, sla_state, trace

from ..conftest import under_ci

POSTGRES_URL = os.environ.get("MIDDLEWARE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def journal_url() -> Iterator[str]:
    """A journal URL whose tables land in a fresh schema (search_path), dropped after the test."""
    psycopg = pytest.importorskip("psycopg")
    schema = f"mw_journal_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if under_ci():
            raise
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            sep = "&" if "?" in POSTGRES_URL else "?"
            yield f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema}')}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_records_go_in_with_copy_and_are_traced_by_any_id(journal_url: str) -> None:
    journal = Journal(JournalSettings(url=journal_url, flush_interval=0.01))
    await journal.start()
    t0 = time.time() - 100
    for n in range(3):
        cid = f"cid-{n}"
        journal.record("adt-inbound", "ingest", "received", at=t0 + n, correlation_id=cid, message_id=f"m-{n}",
                       source="http:rest")
        journal.record("adt-inbound", "route", "routed", at=t0 + n + 0.1, correlation_id=cid, message_id=f"m-{n}",
                       source_id=f"MSG{n}", event_id=f"ev-{n}", event_type="patient.admitted.v1", received_at=t0 + n)
        if n < 2:
            journal.record("adt-inbound", "deliver", "delivered", at=t0 + n + 0.2, correlation_id=cid,
                           event_id=f"ev-{n}", connector="cdr", attempt=1)
    await journal.stop()
    store = open_store(journal_url, create=False)
    try:
        assert store.count() == 8
        for key in ("cid-1", "m-1", "MSG1", "ev-1"):
            [path] = trace(store, key)
            assert path.correlation_id == "cid-1" and path.events[0].deliveries[0].outcome == "delivered"
        assert store.oldest_pending("adt-inbound", "cdr") == pytest.approx(t0 + 2)
        assert store.last_received("adt-inbound") == pytest.approx(t0 + 2.1)
        route = SimpleNamespace(name="adt-inbound", deliver=[SimpleNamespace(connector="cdr")],
                                sla=Sla(deliver_within=60))
        state = sla_state(store, route)
        assert state.state == "breach" and state.breaches == ["deliver_within"]
        store.prune(t0 + 1.5)
        assert trace(store, "MSG0") == [] and len(trace(store, "MSG2")) == 1
    finally:
        store.close()


async def test_an_unreachable_database_drops_records_and_never_raises() -> None:
    journal = Journal(JournalSettings(url="postgresql://postgres@127.0.0.1:1/none?connect_timeout=1",
                                      flush_interval=0.01))
    await journal.start()
    journal.record("r", "route", "routed", correlation_id="x")
    await journal.stop()
    assert journal.dropped == 1 and journal.written == 0
