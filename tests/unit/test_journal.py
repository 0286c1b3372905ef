"""The journal: batched writes off the hot path, trace by any id, pending ages, SLA state, failures."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from middleware.journal import (
    Journal,
    JournalSettings,
    NullJournal,
    Sla,
    format_age,
    open_journal,
    open_store,
    sla_state,
    trace,
)
from middleware.journal.records import Row
from middleware.journal.store import SqliteStore, SqlStore
from middleware.observe import Metrics


def settings(tmp_path: Path, **overrides: object) -> JournalSettings:
    return JournalSettings(**{"url": f"sqlite:///{tmp_path / 'journal.db'}", "flush_interval": 0.01, **overrides})


def one_message(journal: Journal, *, t0: float, delivered: bool = True) -> None:
    """The hops of one HL7 message with two events, delivered to one connector (one retry)."""
    common = {"correlation_id": "cid-1", "source": "mllp:ehr-adt"}
    journal.record("adt-inbound", "ingest", "received", at=t0, message_id="m-1", **common)
    for n in (1, 2):
        journal.record("adt-inbound", "route", "routed", at=t0 + 0.1, message_id="m-1", source_id="MSG00001",
                       event_id=f"ev-{n}", event_type="patient.admitted.v1", received_at=t0, **common)
        journal.record("adt-inbound", "deliver", "retry", at=t0 + 0.2, event_id=f"ev-{n}", connector="cdr",
                       attempt=1, detail="503", correlation_id="cid-1")
        if delivered:
            journal.record("adt-inbound", "deliver", "delivered", at=t0 + 0.5, event_id=f"ev-{n}",
                           connector="cdr", attempt=2, correlation_id="cid-1", received_at=t0)


async def test_records_are_written_in_batches_and_traced_by_any_id(tmp_path: Path) -> None:
    journal = Journal(settings(tmp_path))
    await journal.start()
    t0 = time.time() - 10
    one_message(journal, t0=t0)
    await asyncio.sleep(0.1)  # the background writer flushes on its own
    assert journal.written == 7
    for key in ("cid-1", "m-1", "MSG00001", "ev-2"):
        [path] = trace(journal.store, key)
        assert path.correlation_id == "cid-1" and path.source == "mllp:ehr-adt" and path.outcome == "routed"
        assert [e.event_id for e in path.events] == ["ev-1", "ev-2"]
        delivery = path.events[1].deliveries[0]
        assert (delivery.connector, delivery.outcome, delivery.attempts, delivery.retries) == ("cdr", "delivered", 2, 1)
        assert delivery.seconds == pytest.approx(0.5)
    assert trace(journal.store, "nothing-like-it") == []
    await journal.stop()


async def test_stop_flushes_what_is_queued(tmp_path: Path) -> None:
    journal = Journal(settings(tmp_path, flush_interval=60.0))
    await journal.start()
    one_message(journal, t0=time.time())
    await journal.stop()
    assert open_store(journal.settings.url).count() == 7


async def test_a_failing_store_drops_and_counts_records_logs_once_and_never_raises(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(SqlStore):
        def write(self, rows: object) -> None:
            raise OSError("disk gone")

        def prune(self, before: float) -> None:
            raise OSError("disk gone")

        def close(self) -> None:
            pass

    metrics = Metrics()
    journal = Journal(settings(tmp_path), metrics, store=Broken())
    journal._store_reset = lambda: None  # type: ignore[method-assign]  # keep the broken store
    with caplog.at_level(logging.WARNING, logger="middleware.journal"):
        await journal.start()
        for _ in range(3):
            one_message(journal, t0=time.time())
            await journal.flush()
        await journal.stop()
    assert journal.dropped == 21
    assert metrics.value("middleware_journal_dropped") == 21
    assert len([r for r in caplog.records if r.name == "middleware.journal"]) == 1


async def test_a_full_queue_drops_new_records_instead_of_growing(tmp_path: Path) -> None:
    journal = Journal(settings(tmp_path, max_queue=5, flush_interval=60.0))
    for n in range(8):
        journal.record("r", "route", "routed", event_id=str(n))
    assert journal.dropped == 3 and len(journal._pending) == 5


def test_disabled_journal_is_a_no_op() -> None:
    journal = open_journal(JournalSettings(enabled=False))
    assert isinstance(journal, NullJournal) and not journal.enabled
    journal.record("r", "route", "routed", correlation_id="x")


async def test_retention_prunes_records_older_than_the_window(tmp_path: Path) -> None:
    journal = Journal(settings(tmp_path, retention=3600.0))
    await journal.start()
    journal.record("r", "route", "routed", at=time.time() - 7200, correlation_id="old")
    journal.record("r", "route", "routed", correlation_id="new")
    await journal.stop()
    again = Journal(settings(tmp_path, retention=3600.0))
    await again.start()  # prunes on start
    assert trace(again.store, "old") == [] and len(trace(again.store, "new")) == 1
    await again.stop()


async def test_oldest_pending_and_sla_state(tmp_path: Path) -> None:
    journal = Journal(settings(tmp_path))
    await journal.start()
    now = time.time()
    one_message(journal, t0=now - 600, delivered=False)  # waiting 10 minutes for cdr
    journal.record("adt-inbound", "ingest", "received", at=now - 30, message_id="m-2", correlation_id="cid-2")
    journal.record("adt-inbound", "route", "dead_lettered", at=now - 20, message_id="m-3", correlation_id="cid-3",
                   error_class="ParseError", detail="parse")
    await journal.flush()
    store = journal.store
    assert store.oldest_pending("adt-inbound", "cdr") == pytest.approx(now - 600)
    assert store.oldest_pending("adt-inbound") == pytest.approx(now - 30)  # m-2 not taken by the route yet
    assert store.last_received("adt-inbound") == pytest.approx(now - 20)
    route = SimpleNamespace(name="adt-inbound", deliver=[SimpleNamespace(connector="cdr")],
                            sla=Sla(deliver_within=300, silent_after=10, max_error_rate=0.01))
    state = sla_state(store, route, now)
    assert state.state == "breach" and set(state.breaches) == {"silent", "deliver_within", "max_error_rate"}
    assert state.oldest_pending["cdr"] == pytest.approx(600, abs=1)
    assert state.error_rate == pytest.approx(0.5)  # m-1 routed, m-3 dead-lettered
    relaxed = SimpleNamespace(**{**route.__dict__, "sla": Sla(deliver_within=3600, silent_after=3600)})
    assert sla_state(store, relaxed, now).state == "ok"
    await journal.stop()


def test_ages_read_for_a_person() -> None:
    assert format_age(0.25) == "250 ms" and format_age(725) == "12m 05s" and format_age(None) == "-"


async def test_oldest_pending_reads_from_a_watermark_and_never_skips_an_unfinished_event(tmp_path: Path) -> None:
    journal = Journal(settings(tmp_path))
    now = time.time()
    for n in range(3):  # finished long ago
        journal.record("r", "route", "routed", at=now - 3600 + n, event_id=f"old-{n}", correlation_id=f"c{n}")
        journal.record("r", "deliver", "delivered", at=now - 3500 + n, event_id=f"old-{n}", connector="k",
                       correlation_id=f"c{n}")
    journal.record("r", "route", "routed", at=now - 600, event_id="waiting", correlation_id="w", received_at=now - 601)
    await journal.flush()
    store = journal.store
    for _ in range(2):  # the second call starts at the watermark, and still finds it
        assert store.oldest_pending("r", "k") == pytest.approx(now - 601)
    [(mark,)] = store._query("SELECT at FROM mw_journal_marks WHERE name = 'r/k'")
    assert now - 3600 < mark <= now - 600
    journal.record("r", "deliver", "delivered", at=now, event_id="waiting", connector="k", correlation_id="w")
    await journal.flush()
    assert store.oldest_pending("r", "k") is None
    [(mark,)] = store._query("SELECT at FROM mw_journal_marks WHERE name = 'r/k'")
    assert mark == pytest.approx(now - 120, abs=5)  # stays MARK_MARGIN behind now
    await journal.stop()


async def test_a_stuck_store_holds_up_nothing_and_every_record_is_written_or_counted(tmp_path: Path) -> None:
    gate = threading.Event()

    class Stuck(SqliteStore):
        def write(self, rows: Sequence[Row]) -> None:
            gate.wait(10)  # the database hangs until the test lets it go
            super().write(rows)

    journal = Journal(settings(tmp_path, max_queue=100, batch_size=10), store=Stuck(tmp_path / "j.db"))
    await journal.start()
    for n in range(20):
        journal.record("r", "route", "routed", event_id=str(n))
    await asyncio.sleep(0.1)  # the writer took a batch and is stuck in the store
    for n in range(500):  # the hot path goes on: nothing waits for the store
        journal.record("r", "route", "routed", event_id=f"more-{n}")
    assert journal.dropped > 0
    gate.set()
    await journal.stop()
    assert journal.written + journal.dropped == 520


def test_a_delivery_recorded_before_its_routing_record_still_joins_its_message() -> None:
    """The route worker records `routed` after its ack; the event may be delivered before that."""
    from middleware.journal import Hop
    from middleware.journal.query import build_paths

    hops = [Hop(1.0, "r", "ingest", "received", "c", "m"),
            Hop(1.2, "r", "deliver", "delivered", "c", event_id="e", connector="k"),
            Hop(1.3, "r", "route", "routed", "c", "m", event_id="e", received_at=1.0)]
    [path] = build_paths(hops)
    assert path.events[0].deliveries[0].outcome == "delivered" and [h.at for h in path.hops] == [1.0, 1.2, 1.3]
