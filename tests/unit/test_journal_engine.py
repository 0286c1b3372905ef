"""The engine writes a journal record at each hop (publisher, route worker, delivery worker) and the
trace of a message shows its path; the SLA monitor counts silent feeds and error-rate breaches once."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from middleware.broker import make_broker
from middleware.engine import Engine
from middleware.ingest.publisher import Publisher
from middleware.journal import JournalSettings, Sla, trace
from middleware.journal.monitor import SlaMonitor
from middleware.observe import Metrics
from middleware.project import Project, load_project

REPO = Path(__file__).resolve().parents[2]


def adt(n: int) -> bytes:
    return (f"MSH|^~\\&|EHR|GHH|ADT|GHH|20260101120000||ADT^A01|JRN{n}|P|2.5\r"
            f"EVN|A01|20260101120000\rPID|1||{n}^^^GHH^MR||DOE^JOHN||19800101|M\rPV1|1|I\r").encode()


def adt_only(tmp_path: Path, *, enabled: bool = True) -> Project:
    """The shipped adt-inbound route delivering to a file only, with a journal in tmp_path."""
    project = load_project(REPO, {"HTTP_INGEST_TOKEN": "t"})
    route = project.routes["adt-inbound"]
    route = dataclasses.replace(route, deliver=tuple(d for d in route.deliver if d.connector == "bed-board"))
    bed_board = dataclasses.replace(project.connectors["bed-board"], options={"path": str(tmp_path / "out.jsonl")})
    journal = JournalSettings(enabled=enabled, url=f"sqlite:///{tmp_path / 'journal.db'}", flush_interval=0.05)
    settings = dataclasses.replace(project.settings, ingest={}, journal=journal)
    return dataclasses.replace(project, routes={route.name: route}, connectors={"bed-board": bed_board},
                               settings=settings)


async def run(project: Project, *messages: bytes) -> tuple[Engine, list[str]]:
    """Run the engine on ``messages`` until idle; the engine (stopped) and each message's correlation id."""
    engine = Engine(project, broker=make_broker("memory://"), gateways=False)
    await engine.start()
    publisher = Publisher(engine.broker, project.routes["adt-inbound"], project.settings, journal=engine.journal)
    cids = [await publisher.publish(raw, source="mllp:test") for raw in messages]
    for _ in range(200):
        await asyncio.sleep(0.02)
        if await engine.is_idle():
            break
    await engine.stop()
    return engine, cids


async def test_a_delivered_message_is_traced_from_ingest_to_delivery(tmp_path: Path) -> None:
    engine, _ = await run(adt_only(tmp_path), adt(1))
    store = engine.journal.store  # type: ignore[attr-defined]
    [path] = trace(store, "JRN1")  # by MSH-10
    assert path.source == "mllp:test" and path.outcome == "routed" and path.source_id == "JRN1"
    [event] = path.events
    assert event.event_type == "patient.admitted.v1" and event.event_time is not None
    [delivery] = event.deliveries
    assert delivery.connector == "bed-board" and delivery.outcome == "delivered" and delivery.attempts == 1
    assert delivery.seconds is not None and 0 <= delivery.seconds < 10
    assert [p.correlation_id for p in trace(store, event.event_id)] == [path.correlation_id]  # by event id
    assert [p.correlation_id for p in trace(store, path.correlation_id)] == [path.correlation_id]
    assert engine.metrics.registry.get_sample_value("middleware_delivery_message_age_seconds_count",
                                                    {"route": "adt-inbound", "connector": "bed-board"}) == 1
    assert engine.metrics.registry.get_sample_value("middleware_route_last_received_timestamp_seconds",
                                                    {"route": "adt-inbound"}) > time.time() - 60


async def test_a_dead_lettered_message_is_traced_with_its_error_class(tmp_path: Path) -> None:
    no_pid = b"MSH|^~\\&|EHR|GHH|ADT|GHH|20260101120000||ADT^A01|JRN9|P|2.5\r"  # mrn required: a map error
    engine, [cid] = await run(adt_only(tmp_path), no_pid)
    [path] = trace(engine.journal.store, cid)  # type: ignore[attr-defined]
    assert path.outcome == "dead_lettered" and path.error_class == "MappingError" and path.source == "mllp:test"
    assert [h.detail for h in path.dead_letters] == ["map"] and path.events == []


async def test_journal_off_writes_nothing(tmp_path: Path) -> None:
    engine, _ = await run(adt_only(tmp_path, enabled=False), adt(2))
    assert not engine.journal.enabled and not (tmp_path / "journal.db").exists()
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 1


def test_sla_monitor_counts_a_silent_feed_and_an_error_rate_breach_once() -> None:
    metrics = Metrics()
    route = dataclasses.replace(load_project(REPO, {"HTTP_INGEST_TOKEN": "t"}).routes["adt-inbound"],
                                sla=Sla(silent_after=60, max_error_rate=0.1))
    monitor = SlaMonitor(lambda: [route], metrics, window=300)
    now = time.time()
    monitor.check(now)
    for later in (now + 61, now + 62):
        monitor.check(later)
    assert metrics.value("middleware_sla_silent_feed_breaches", route="adt-inbound") == 1
    assert metrics.registry.get_sample_value("middleware_sla_feed_silent", {"route": "adt-inbound"}) == 1
    metrics.last_received.labels("adt-inbound").set(now + 62)
    metrics.received.labels("adt-inbound").inc(10)
    metrics.dead_lettered.labels("adt-inbound", "parse").inc(3)
    monitor.check(now + 63)
    monitor.check(now + 64)
    assert metrics.registry.get_sample_value("middleware_sla_feed_silent", {"route": "adt-inbound"}) == 0
    assert metrics.value("middleware_sla_error_rate_breaches", route="adt-inbound") == 1
    assert metrics.registry.get_sample_value("middleware_sla_error_rate", {"route": "adt-inbound"}) == 0.3
