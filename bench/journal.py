"""Benchmark: the journal with a million records, and its cost on the pipeline.

  - fill: a store (SQLite file, and PostgreSQL when --postgres is given) with --records hop records
    (5 per message: received, routed x2 events, delivered x2), written through the store in batches
    (records/s) beside a raw baseline on the same table (sqlite3 executemany / psycopg COPY of the same
    rows in one transaction, no journal code);
  - trace: ``trace(store, id)`` for random MSH-10s, event ids and correlation ids (median / max ms)
    beside a raw baseline (one indexed SELECT by correlation id), plus ``sla_state`` of a route and one
    ``middleware trace MSH-10`` process end to end (interpreter start and project load included);
  - pipeline (--pipeline N): ``middleware run`` on bench/pipeline.py's project (adt-inbound -> http sink
    in its own process), N messages preloaded, journal off / SQLite (/ PostgreSQL) alternating in one run,
    median of --repeat: msg/s and CPU µs per message of the engine process (all threads) and of its
    event-loop thread, start-up taken off; the on - off difference is the journal's cost.

Every table and schema it makes is its own (a temporary folder, a random PostgreSQL schema dropped at
the end, random queue prefixes deleted).

Run: .venv/bin/python bench/journal.py [--records 1000000] [--postgres postgresql://postgres@127.0.0.1/test]
     [--pipeline 3000 --repeat 3 --skip-fill --url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
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


def proc_cpu(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (or of one of its threads: ``tid``) from /proc."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def engine_run(pl: Any, url: str, target: Any, sink: Any, messages: list[bytes] | None,
                     queues: list[str], profile: Path | None = None) -> tuple[float, float, float]:
    """(msg/s at the sink, process CPU s, event-loop thread CPU s) while ``target`` drains the preloaded
    ``messages``; with None, the CPU of starting up on empty queues (taken off the runs). ``profile``:
    py-spy's collapsed stacks of the run (samples holding the GIL only) into this file."""
    await sink.call("POST", "/reset")
    if messages:
        await pl.preload(url, target.inbound, messages)
    target.start()
    pid = target.process.pid
    if profile is not None:
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--gil",
                                "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(profile)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target._profiler = spy  # Target.stop waits for it (py-spy writes when the process exits)
    if messages is None:
        await pl.wait_ready(url, target, queues)
        await asyncio.sleep(1)
        spent = (proc_cpu(pid), proc_cpu(pid, pid))
        target.stop()
        return 0.0, *spent
    deadline = time.monotonic() + 60 + len(messages) / 100
    while True:
        await asyncio.sleep(0.25)
        stats = await sink.call("GET", "/stats")
        if stats["count"] >= len(messages):
            break
        if time.monotonic() > deadline or target.process.poll() is not None:
            raise RuntimeError(f"{target.name}: {stats['count']} of {len(messages)} arrived")
    spent = (proc_cpu(pid), proc_cpu(pid, pid))
    target.stop()
    return (stats["count"] - 1) / (stats["last"] - stats["first"]), *spent


async def pipeline_async(count: int, url: str, postgres: str | None, repeat: int, profile: Path | None) -> str:
    """``middleware run`` (bench/pipeline.py's project: adt-inbound -> http sink in its own process) with
    the journal off, SQLite (and PostgreSQL), alternating in one run on the same preloaded messages."""
    import pipeline as pl
    from mllp import make_messages

    from middleware import topology

    prefix = f"bench-{uuid.uuid4().hex[:6]}."
    sink = pl.Sink(pl.free_port())
    await sink.wait_up()
    base = Path(tempfile.mkdtemp(prefix="bench-journal-"))
    schema = f"mw_bench_{uuid.uuid4().hex[:8]}"
    admin = None
    kinds: dict[str, str | None] = {"off": None, "sqlite": None}
    if postgres:
        import psycopg

        admin = psycopg.connect(postgres, autocommit=True)
        admin.execute(f"CREATE SCHEMA {schema}")
        separator = "&" if "?" in postgres else "?"
        kinds["postgresql"] = f"{postgres}{separator}options=" + quote(f"-csearch_path={schema}")
    launcher = str(Path(sys.executable).parent / "middleware")
    targets, broker, everything = [], None, None
    try:
        for kind, journal_url in kinds.items():
            folder = base / kind
            folder.mkdir()
            pl.make_project(folder, full=False, journal=kind != "off", metrics_port=pl.free_port())
            env = pl.engine_env(folder, url, prefix, sink.url + "/events")
            if journal_url:
                env["MIDDLEWARE_JOURNAL_URL"] = journal_url
            if broker is None:
                inbound, broker, everything = await pl.declare_engine(folder, env)
            targets.append(pl.Target(f"journal {kind}", [launcher, "run", "--project", str(folder), "--log-level",
                                                         "WARNING"], env, inbound))
        queues = [inbound, everything.route("adt-inbound").deliveries["case-management"]]
        idle = {t.name: await engine_run(pl, url, t, sink, None, queues) for t in targets}
        messages = make_messages(count)
        runs: dict[str, list[tuple[float, float, float]]] = {t.name: [] for t in targets}
        for n in range(repeat):
            for target in targets:
                spy = profile / f"{target.name.replace(' ', '-')}.txt" if profile and n == 0 else None
                rate, cpu, loop = await engine_run(pl, url, target, sink, messages, queues, spy)
                print(f"  ({target.name}: {rate:.0f} msg/s, {(cpu - idle[target.name][1]) / count * 1e6:.0f} us/msg)",
                      file=sys.stderr, flush=True)
                runs[target.name].append((rate, (cpu - idle[target.name][1]) / count * 1e6,
                                          (loop - idle[target.name][2]) / count * 1e6))
    finally:
        for target in targets:
            target.stop()
        if broker is not None:
            await topology.delete(broker, everything)
            await broker.close()
        if admin is not None:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
            admin.close()
        sink.stop()
        shutil.rmtree(base, ignore_errors=True)
    off = statistics.median(c for _, c, _ in runs["journal off"])
    lines = [f"pipeline: middleware run, {count} ADT^A01 preloaded, adt-inbound -> http sink (bench/pipeline.py's "
             f"project), journal off / on alternating in one run, median of {repeat}; CPU per message of the "
             "engine process (all threads; start-up taken off) and of its event-loop thread",
             f"  {'':<20} {'msg/s':>7} {'CPU us/msg':>11} {'loop thread':>12} {'vs off':>8}   runs (CPU us/msg)"]
    for name, values in runs.items():
        rate = statistics.median(r for r, _, _ in values)
        cpu = statistics.median(c for _, c, _ in values)
        loop = statistics.median(t for _, _, t in values)
        lines.append(f"  {name:<20} {rate:7.0f} {cpu:11.0f} {loop:12.0f} {cpu - off:+8.0f}   "
                     + " ".join(f"{c:.0f}" for _, c, _ in values))
    return "\n".join(lines)


def pipeline_part(count: int, url: str, postgres: str | None, repeat: int = 3, profile: Path | None = None) -> str:
    return asyncio.run(pipeline_async(count, url, postgres, repeat, profile))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="journal records to fill (5 per message)")
    parser.add_argument("--postgres", help="a PostgreSQL URL: also fill and time a PostgreSQL journal")
    parser.add_argument("--pipeline", type=int, default=0, help="messages for the pipeline on/off part (0: skip)")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/", help="RabbitMQ for --pipeline")
    parser.add_argument("--repeat", type=int, default=3, help="pipeline runs per journal kind (median)")
    parser.add_argument("--profile", type=Path, help="pipeline: py-spy --gil collapsed stacks of each kind's "
                        "first run into this folder (pip install py-spy)")
    parser.add_argument("--skip-fill", action="store_true", help="only the hot-path and pipeline parts")
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
        print(pipeline_part(args.pipeline, args.url, args.postgres, args.repeat, args.profile), flush=True)


if __name__ == "__main__":
    main()
