"""Benchmark: the journal with a million records, and its cost on the pipeline.

  - fill: a store (SQLite file, and PostgreSQL when --postgres is given) with --records hop records
    (5 per message: received, routed x2 events, delivered x2), written through the store in batches
    (records/s) beside a raw baseline on the same table (sqlite3 executemany / psycopg COPY of the same
    rows in one transaction, no journal code);
  - trace: ``trace(store, id)`` for random MSH-10s, event ids and correlation ids (median / max ms)
    beside a raw baseline (one indexed SELECT by correlation id), plus ``sla_state`` of a route and one
    ``middleware trace MSH-10`` process end to end (interpreter start and project load included);
  - pipeline (--pipeline N): the engine on RabbitMQ with the shipped adt-inbound route delivering to an
    fsynced file, N messages preloaded, journal off / SQLite (/ PostgreSQL), msg/s, each run twice,
    alternating.

Every table and schema it makes is its own (a temporary folder, a random PostgreSQL schema dropped at
the end, random queue prefixes deleted).

Run: .venv/bin/python bench/journal.py [--records 1000000] [--postgres postgresql://postgres@127.0.0.1/test]
     [--pipeline 3000 --url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from middleware.journal import Sla, SqlStore, open_store, sla_state, trace  # noqa: E402
from middleware.journal.records import COLUMNS, Row  # noqa: E402
from middleware.journal.store import TABLE  # noqa: E402

BATCH = 10_000


def rows(messages: int, start: float) -> Iterator[Row]:
    """Five records per message, spread over the last day, in time order."""
    step = 86400.0 / messages
    for n in range(messages):
        at = start + n * step
        cid, mid = f"c-{n:08d}-{uuid.uuid4().hex[:8]}", f"m-{n:08d}"
        base = {"correlation_id": cid, "message_id": mid, "source": "mllp:ehr-adt"}
        yield _row(at, "ingest", "received", **base)
        for e in (0, 1):
            yield _row(at + 0.01, "route", "routed", **base, source_id=f"MSG{n:08d}", event_id=f"e-{n:08d}-{e}",
                       event_type="patient.admitted.v1", received_at=at)
        for e in (0, 1):
            yield _row(at + 0.05, "deliver", "delivered", correlation_id=cid, event_id=f"e-{n:08d}-{e}",
                       connector="bed-board", attempt=1, received_at=at)


def _row(at: float, stage: str, outcome: str, **fields: object) -> Row:
    return tuple([at, "adt-inbound", stage, outcome] + [fields.get(c) for c in COLUMNS[4:]])


def fill(store: SqlStore, messages: int) -> float:
    """Write through the store in batches; records/s."""
    batch: list[Row] = []
    started = time.perf_counter()
    count = 0
    for row in rows(messages, time.time() - 86400):
        batch.append(row)
        if len(batch) == BATCH:
            store.write(batch)
            count += len(batch)
            batch = []
    if batch:
        store.write(batch)
        count += len(batch)
    return count / (time.perf_counter() - started)


def timed(call: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, max) milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def measure(name: str, store: SqlStore, messages: int, url: str, raw_write: Callable[[list[Row]], float]) -> str:
    rate = fill(store, messages)
    sample = list(rows(2000, 0.0))
    raw = raw_write(sample)
    total = store.count()
    pick = random.Random(7)
    ids = [pick.randrange(messages) for _ in range(50)]
    cids = [r[0] for r in store._query(f"SELECT correlation_id FROM {TABLE} WHERE message_id = ? LIMIT 1",
                                        (f"m-{ids[0]:08d}",))]
    out = [f"{name}: {total:,} records; write {rate:,.0f} records/s through the store, raw baseline "
           f"{raw:,.0f} records/s (2,000 of the same rows into an empty table with the same indexes: "
           "plain executemany / COPY)"]
    for label, key in (("MSH-10", lambda n: f"MSG{n:08d}"), ("event id", lambda n: f"e-{n:08d}-1"),
                       ("message id", lambda n: f"m-{n:08d}")):
        keys = iter(ids * 3)
        median, worst = timed(lambda key=key, keys=keys: trace(store, key(next(keys))), 50)
        out.append(f"  trace by {label:<10} median {median:6.2f} ms, max {worst:6.2f} ms")
    median, worst = timed(lambda: store._query(f"SELECT * FROM {TABLE} WHERE correlation_id = ?", cids), 50)
    out.append(f"  raw baseline: one indexed SELECT by correlation id, median {median:6.2f} ms, max {worst:6.2f} ms")
    route = SimpleNamespace(name="adt-inbound", deliver=[SimpleNamespace(connector="bed-board")],
                            sla=Sla(deliver_within=300, silent_after=1800, max_error_rate=0.01))
    first, _ = timed(lambda: sla_state(store, route), 1)
    median, worst = timed(lambda: sla_state(store, route), 5)
    out.append(f"  sla_state (status / console, per route): first call {first:.0f} ms (reads every routed record "
               f"once, then keeps a watermark), later calls median {median:.1f} ms, max {worst:.1f} ms")
    env = {**os.environ, "MIDDLEWARE_JOURNAL_URL": url, "HTTP_INGEST_TOKEN": "bench"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "middleware", "trace", f"MSG{ids[1]:08d}", "--project", str(REPO)],
                          env=env, capture_output=True, text=True)
    cli = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import middleware.cli"], env=env, check=True)
    bare = time.perf_counter() - started
    out.append(f"  `middleware trace MSG...` process end to end {cli:.2f} s (exit {done.returncode}); "
               f"python -c 'import middleware.cli' alone {bare:.2f} s")
    return "\n".join(out)


def sqlite_part(messages: int) -> str:
    import sqlite3

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/journal.db"
        store = open_store(url)

        def raw_write(sample: list[Row]) -> float:
            db = sqlite3.connect(f"{folder}/raw.db", isolation_level=None)
            db.execute(f"CREATE TABLE t ({', '.join(COLUMNS)})")
            for column in ("correlation_id", "message_id", "source_id", "event_id", "route, stage, at", "at"):
                db.execute(f"CREATE INDEX t_{column.replace(', ', '_')} ON t ({column})")  # the journal's indexes
            started = time.perf_counter()
            db.execute("BEGIN")
            db.executemany(f"INSERT INTO t VALUES ({', '.join('?' * len(COLUMNS))})", sample)
            db.execute("COMMIT")
            rate = len(sample) / (time.perf_counter() - started)
            db.close()
            return rate

        try:
            return measure("SQLite", store, messages, url, raw_write)
        finally:
            store.close()


def postgres_part(messages: int, base: str) -> str:
    import psycopg

    schema = f"mw_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(base, autocommit=True)
    admin.execute(f"CREATE SCHEMA {schema}")
    url = f"{base}{'&' if '?' in base else '?'}options={quote(f'-csearch_path={schema}')}"
    store = open_store(url)

    def raw_write(sample: list[Row]) -> float:
        with psycopg.connect(url) as db:
            db.execute(f"CREATE TABLE raw_t (LIKE {TABLE} INCLUDING ALL)")
            started = time.perf_counter()
            with db.cursor() as cursor, cursor.copy(f"COPY raw_t ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in sample:
                    copy.write_row(row)
            db.commit()
            return len(sample) / (time.perf_counter() - started)

    try:
        return measure("PostgreSQL", store, messages, url, raw_write)
    finally:
        store.close()
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


# -- hot-path cost ------------------------------------------------------------------------------------


def hot_path_part(count: int = 20_000) -> str:
    """What the workers' journal hooks cost on the event loop per message (route worker: received,
    2 events published and routed; delivery worker: 2 deliveries), journal on (records queued, the
    writer not running) beside the no-op journal; CPU time of this thread."""
    from middleware.journal import NULL_JOURNAL, Journal, JournalSettings, hooks
    from middleware.observe import Metrics

    event = {"id": "e-1", "type": "patient.admitted.v1", "time": "2026-01-01T12:00:00Z"}
    route = SimpleNamespace(name="adt-inbound", sla=Sla(deliver_within=300))
    message = SimpleNamespace(headers={"x-mw-received-at": time.time(), "x-mw-ingest": "mllp:ehr-adt",
                                       "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                                       "x-mw-event-time": time.time()}, message_id="m-1")
    outcome = SimpleNamespace(correlation_id="c-1", source_id="MSG1", filtered=False, events=[event, event])
    delivery = SimpleNamespace(correlation_id="c-1", event_id="e-1", event_type="patient.admitted.v1")
    results = {}
    for name, journal in (("no-op journal", NULL_JOURNAL),
                          ("journal on", Journal(JournalSettings(max_queue=10 * count, batch_size=10 * count)))):
        worker = SimpleNamespace(route=route, metrics=Metrics(), journal=journal,
                                 connector=SimpleNamespace(name="bed-board"))
        started = time.thread_time()
        for _ in range(count):
            arrival = hooks.route_received(worker, message)
            hooks.event_headers(event, arrival)
            hooks.event_headers(event, arrival)
            hooks.route_finished(worker, message, outcome, arrival)
            hooks.delivered(worker, message, delivery, 1)
            hooks.delivered(worker, message, delivery, 1)
        results[name] = (time.thread_time() - started) / count * 1e6
    off, on = results["no-op journal"], results["journal on"]
    return (f"hot path, per message (route worker + 2 deliveries), CPU: hooks with the no-op journal "
            f"{off:.1f} µs (age and SLA metrics, traceparent), with the journal on {on:.1f} µs "
            f"(+{on - off:.1f} µs: 5 records queued); the background write then costs the writer thread "
            "1/rate of the fill above per record")


# -- pipeline cost ------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU of this process, every thread (the journal writes from a worker thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def pipeline_rate(url: str, messages: list[bytes], journal_url: str | None, out: Path) -> tuple[float, float]:
    """(messages/s, CPU µs per message) while the engine drains the preloaded messages."""
    from pipeline import preload

    from middleware import topology
    from middleware.engine import Engine, declare_route_topology
    from middleware.journal import JournalSettings
    from middleware.project import load_project

    prefix = f"bench-{uuid.uuid4().hex[:6]}."
    project = load_project(REPO, {"MIDDLEWARE_BROKER_URL": url, "MIDDLEWARE_QUEUE_PREFIX": prefix,
                                  "HTTP_INGEST_TOKEN": "bench"})
    route = project.routes["adt-inbound"]
    route = dataclasses.replace(route, deliver=tuple(d for d in route.deliver if d.connector == "bed-board"))
    bed_board = dataclasses.replace(project.connectors["bed-board"], options={"path": str(out)})
    journal = JournalSettings(enabled=journal_url is not None, url=journal_url or "sqlite:///unused")
    settings = dataclasses.replace(project.settings, ingest={}, journal=journal)
    project = dataclasses.replace(project, routes={route.name: route}, settings=settings,
                                  connectors={"bed-board": bed_board})
    engine = Engine(project, gateways=False)
    await engine.broker.connect()
    await declare_route_topology(engine.broker, route, settings)
    await preload(url, engine.topology.route(route.name).inbound, messages, None)
    started, cpu = time.perf_counter(), cpu_seconds()
    await engine.start()
    deadline = time.monotonic() + 120
    while engine.metrics.value("middleware_events_delivered", route="adt-inbound", connector="bed-board") \
            < len(messages):
        if time.monotonic() > deadline:  # the broker went away for good (another test restarting it)
            await engine.stop()
            raise RuntimeError("pipeline run did not finish in 120 s")
        await asyncio.sleep(0.005)
    await engine.stop()  # includes the journal's last flush
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    cleaner = Engine(project, gateways=False).broker
    await cleaner.connect()
    await topology.delete(cleaner, engine.topology)
    await cleaner.close()
    return len(messages) / elapsed, cpu / len(messages) * 1e6


def pipeline_part(count: int, url: str, postgres: str | None) -> str:
    import psycopg
    from mllp import make_messages

    messages = make_messages(count)
    rates: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        schema = f"mw_bench_{uuid.uuid4().hex[:8]}"
        admin = psycopg.connect(postgres, autocommit=True) if postgres else None
        if admin is not None:
            admin.execute(f"CREATE SCHEMA {schema}")
        kinds: dict[str, str | None] = {"off": None, "sqlite": f"sqlite:///{folder}/journal.db"}
        if postgres:
            separator = "&" if "?" in postgres else "?"
            kinds["postgresql"] = f"{postgres}{separator}options=" + quote(f"-csearch_path={schema}")
        try:  # the schema is dropped even when a run fails (the broker went away)
            for _ in range(3):
                for kind, journal_url in kinds.items():
                    out = Path(folder) / f"{kind}.jsonl"
                    rates.setdefault(kind, []).append(asyncio.run(pipeline_rate(url, messages, journal_url, out)))
                    out.unlink()
        finally:
            if admin is not None:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")
                admin.close()
    off = min(c for _, c in rates["off"])
    lines = [f"pipeline: {count} ADT^A01 preloaded on RabbitMQ, adt-inbound -> fsynced file, 3 runs each, "
             "alternating; CPU per message (this process, all threads) is the figure that a loaded machine "
             "disturbs least"]
    for kind, values in rates.items():
        cpu = min(c for _, c in values)
        runs = ", ".join(f"{c:.0f}" for _, c in values)
        lines.append(f"  journal {kind:<10} CPU {cpu:6.0f} µs/message (runs: {runs})"
                     f"; msg/s {', '.join(f'{r:.0f}' for r, _ in values)}"
                     + ("" if kind == "off" else f"; CPU {100 * (cpu - off) / off:+.1f} % vs off"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="journal records to fill (5 per message)")
    parser.add_argument("--postgres", help="a PostgreSQL URL: also fill and time a PostgreSQL journal")
    parser.add_argument("--pipeline", type=int, default=0, help="messages for the pipeline on/off part (0: skip)")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/", help="RabbitMQ for --pipeline")
    parser.add_argument("--skip-fill", action="store_true", help="only the pipeline part")
    args = parser.parse_args()
    from middleware.observe import configure_logging

    configure_logging("WARNING")
    messages = max(1, args.records // 5)
    if not args.skip_fill:
        print(sqlite_part(messages), flush=True)
        if args.postgres:
            print(postgres_part(messages, args.postgres), flush=True)
    print(hot_path_part(), flush=True)
    if args.pipeline:
        print(pipeline_part(args.pipeline, args.url, args.postgres), flush=True)


if __name__ == "__main__":
    main()
