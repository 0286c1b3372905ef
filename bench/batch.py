"""Benchmark: batch files split and published record by record, records/s and peak RSS (issue 10).

X12 part: a generated 834 of ``--members`` member loops (20,000 by default; 100,000 is about 23 MB), written to
a temporary file piece by piece. Each measurement runs in a fresh process of its own, so its peak RSS
(``VmHWM``) is its own:

  - ``split``: ``Format.split`` of ``x12`` alone (no broker): what reading and framing cost;
  - ``publisher``: split + confirmed publish through the one :class:`~middleware.ingest.publisher.Publisher`
    to the ``enrolment-x12`` route's queue on RabbitMQ (the shipped project, its own queue prefix, the
    route's queues deleted afterwards);
  - ``checkpointed`` (CSV part): the same through ``publish_files`` with a ledger, as the watched folder and
    ``publish`` run it: the confirmed position checkpointed (and fsynced) as it goes;
  - ``baseline``: the same split, then a bare aio-pika loop publishing each record with publisher
    confirms (256 in flight) to a plain queue: what any publisher on this broker can do at best.

CSV part: a generated payer roster of ``--csv-mb`` megabytes (10 by default; the issue's 1 GB is a flag
away, too long for the shared development machine), measured the same way through the ``eligibility-batch``
route (``csv`` format, its trailer checked); its baseline reads the file with a plain ``csv.reader`` and
publishes each row (as the same JSON object) with the same bare aio-pika confirmed loop.

``--publish-records N`` publishes only about the first N records of the CSV (split still reads all of it):
the 1 GB roster's memory and rates in minutes (``--members 0 --csv-mb 1024 --publish-records 200000``).

Peak RSS must stay under 200 MB whatever the file size (the splitters read in chunks).

Run: .venv/bin/python bench/batch.py [--members 100000] [--csv-mb 10] [--url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from middleware.formats import SplitInfo, get_format  # noqa: E402
from tests.x12_files import stream_834  # noqa: E402

WINDOW = 256
RSS_LIMIT_MB = 200


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM; wait4's ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


ROUTES = {"x12": "enrolment-x12", "csv": "eligibility-batch"}  # format -> the shipped route measured
CSV_SOURCE = {"trailer": "TRAILER"}


def bench_format(path: Path) -> Any:
    """The format a generated file is read with (the route's options for CSV)."""
    return get_format("csv", CSV_SOURCE) if path.suffix == ".csv" else get_format("x12")


def child_split(path: Path) -> dict[str, float]:
    fmt = bench_format(path)
    started = time.perf_counter()
    with path.open("rb") as stream:
        records = sum(1 for record in fmt.split(stream, SplitInfo()) if record.error is None)
    return {"records": records, "seconds": time.perf_counter() - started}


async def child_publisher(path: Path, url: str, limit: int | None = None,
                          checkpointed: bool = False) -> dict[str, float]:
    """Split + confirmed publish through the Publisher; ``checkpointed``: through ``publish_files`` with a
    ledger, as the watched folder and ``publish`` do (a checkpoint written, and fsynced, per confirm).
    ``limit``: stop after about that many records (the confirms in flight are still counted)."""
    from middleware import topology
    from middleware.broker import make_broker
    from middleware.ingest.ledger import Ledger
    from middleware.ingest.publisher import Published, Publisher, publish_files
    from middleware.project import load_project
    from middleware.topology import Topology

    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    project = load_project(REPO, {**os.environ, "MIDDLEWARE_BROKER_URL": url, "MIDDLEWARE_QUEUE_PREFIX": prefix})
    route = project.routes[ROUTES["csv" if path.suffix == ".csv" else "x12"]]
    broker = make_broker(url)
    await broker.connect()
    try:
        publisher = Publisher(broker, route, project.settings, window=WINDOW)
        await publisher.declare()
        stop = asyncio.Event()
        confirmed = 0

        def count(*_: Path | Published) -> None:
            nonlocal confirmed
            confirmed += 1
            if limit is not None and confirmed >= limit:
                stop.set()

        started = time.perf_counter()
        if checkpointed:
            with tempfile.TemporaryDirectory() as ledger:
                files = await publish_files(publisher, [path], stop=stop, ledger=Ledger(Path(ledger)),
                                            source="bench", on_published=count)
            result = files[0].result
        else:
            with path.open("rb") as stream:
                result = await publisher.publish_stream(stream, source="bench", name=path.name, stop=stop,
                                                        on_published=count)
        seconds = time.perf_counter() - started
    finally:
        await topology.delete(broker, Topology.of([route], prefix))
        await broker.close()
    return {"records": result.published, "seconds": seconds}


async def child_baseline(path: Path, url: str, limit: int | None = None) -> dict[str, float]:
    import aio_pika

    queue_name = f"bench-{uuid.uuid4().hex[:8]}.{path.suffix[1:]}-baseline"
    connection = await aio_pika.connect(url)
    published = 0
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue_name, durable=True)
        in_flight: set[asyncio.Future[object]] = set()
        started = time.perf_counter()
        for raw, headers in itertools.islice(_baseline_records(path), limit):
                message = aio_pika.Message(raw, headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                in_flight.add(asyncio.ensure_future(channel.default_exchange.publish(message, routing_key=queue_name)))
                published += 1
                if len(in_flight) >= WINDOW:
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
        if in_flight:
            for task in (await asyncio.wait(in_flight))[0]:
                task.result()
        seconds = time.perf_counter() - started
        await channel.queue_delete(queue_name)
    finally:
        await connection.close()
    return {"records": published, "seconds": seconds}


def _baseline_records(path: Path) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """What the baseline publishes: X12 records from the format's splitter; CSV rows from a plain csv.reader."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as text:
            rows = csv.reader(text)
            header = next(rows)
            for row in rows:
                if len(row) == len(header):
                    yield orjson.dumps(dict(zip(header, row, strict=True))), {}
        return
    with path.open("rb") as stream:
        for record in get_format("x12").split(stream, SplitInfo()):
            if record.error is None:
                yield record.raw, dict(record.headers)


def checkpoint_cost(records: int) -> list[tuple[str, int, float, int]]:
    """Seconds to checkpoint ``records`` confirms one by one (as ``publish_files`` does), without fsync, with
    the default fdatasync interval and with one fdatasync per confirm (2,000 at most: slow):
    (label, confirms, seconds, syncs)."""
    from middleware.ingest.ledger import SYNC_INTERVAL, Checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, interval, count in (("fsync at close only", float("inf"), records),
                                       (f"fsync every {SYNC_INTERVAL * 1000:.0f} ms", SYNC_INTERVAL, records),
                                       ("fsync every confirm", 0.0, min(records, 2_000))):
            point = Checkpoint(Path(folder) / label.replace(" ", "-"), sync_interval=interval)
            started = time.perf_counter()
            for position in range(1, count + 1):
                point.advance(position)
            point.remove()
            rows.append((label, count, time.perf_counter() - started, point.syncs))
    return rows


def run_child(kind: str, path: Path, url: str, limit: int | None = None) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", kind, "--file", str(path), "--url", url]
    if limit is not None and kind != "split":  # split always reads the whole file
        command += ["--publish-records", str(limit)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def x12_section(members: int, url: str, with_broker: bool) -> bool:
    """Print the X12 rows; False when a peak RSS is over the limit."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "834-bench.x12"
        with path.open("wb") as file:
            for piece in stream_834(members):
                file.write(piece)
        size = path.stat().st_size / 1e6
        print(f"X12 834, {members:,} member loops, {size:.1f} MB")
        print(f"  {'measure':<12} {'records':>9} {'seconds':>8} {'records/s':>10} {'peak RSS MB':>12}")
        kinds = ["split", *(["publisher", "baseline"] if with_broker else [])]
        ok = True
        for kind in kinds:
            result = run_child(kind, path, url)
            rate = result["records"] / result["seconds"]
            print(f"  {kind:<12} {int(result['records']):>9,} {result['seconds']:>8.1f} {rate:>10,.0f} "
                  f"{result['peak_rss_mb']:>12.0f}")
            ok = ok and result["peak_rss_mb"] < RSS_LIMIT_MB
        return ok


def csv_section(megabytes: float, url: str, with_broker: bool, limit: int | None = None) -> bool:
    """Print the CSV rows; False when a peak RSS is over the limit."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "roster-bench.csv"
        rows = 0
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file, lineterminator="\r\n")
            writer.writerow(["member_id", "mrn", "family_name", "given_name", "birth_date", "sex", "payer",
                             "payer_id", "plan", "status", "coverage_start", "coverage_end", "relationship"])
            while file.tell() < megabytes * 1e6:
                rows += 1
                writer.writerow([f"MBR{rows:09d}", f"DEMO-MRN-{rows}", "Okafor", "Ada", "1984-03-12", "F",
                                 "Northwind Health Plan, Inc.", "NWHP1", "Gold PPO\nRider: vision", "active",
                                 "2026-01-01", "", "subscriber"])
            writer.writerow(["TRAILER", rows])
        print(f"CSV roster, {rows:,} rows, {path.stat().st_size / 1e6:.1f} MB")
        print(f"  {'measure':<12} {'records':>9} {'seconds':>8} {'records/s':>10} {'peak RSS MB':>12}")
        if limit is not None:
            print(f"  (split reads the whole file; the others publish its first ~{limit:,} records)")
        ok = True
        for kind in ["split", *(["publisher", "checkpointed", "baseline"] if with_broker else [])]:
            result = run_child(kind, path, url, limit)
            rate = result["records"] / result["seconds"]
            print(f"  {kind:<12} {int(result['records']):>9,} {result['seconds']:>8.1f} {rate:>10,.0f} "
                  f"{result['peak_rss_mb']:>12.0f}")
            ok = ok and result["peak_rss_mb"] < RSS_LIMIT_MB
        # what "checkpointed" adds, without the broker's noise: the checkpoint writes alone
        for label, count, seconds, syncs in checkpoint_cost(min(rows, 50_000)):
            print(f"  checkpoint, {label:<20} {count:>7,} confirms {seconds:6.2f} s "
                  f"({seconds / count * 1e6:7.1f} µs each, {syncs:,} fdatasyncs)")
        return ok


async def rabbitmq_answers(url: str) -> bool:
    import aio_pika

    try:
        connection = await asyncio.wait_for(aio_pika.connect(url), 5)
    except Exception:
        return False
    await connection.close()
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=20_000,
                        help="member loops in the generated 834 (100000 for the figures in docs/ingest.md)")
    parser.add_argument("--csv-mb", type=float, default=10.0,
                        help="size of the generated CSV roster in MB (0: no CSV part)")
    parser.add_argument("--url", default=os.environ.get("MIDDLEWARE_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--publish-records", type=int, default=None, metavar="N",
                        help="CSV part: publish only about the first N records (split still reads the whole "
                             "file): the 1 GB file's memory and rates in minutes instead of hours")
    parser.add_argument("--child", choices=["split", "publisher", "checkpointed", "baseline"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "split":
            result = child_split(args.file)
        elif args.child in ("publisher", "checkpointed"):
            result = asyncio.run(child_publisher(args.file, args.url, args.publish_records,
                                                 checkpointed=args.child == "checkpointed"))
        else:
            result = asyncio.run(child_baseline(args.file, args.url, args.publish_records))
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return
    with_broker = asyncio.run(rabbitmq_answers(args.url))
    if not with_broker:
        print(f"RabbitMQ does not answer at {args.url}: split only")
    ok = x12_section(args.members, args.url, with_broker) if args.members > 0 else True
    if args.csv_mb > 0:
        ok = csv_section(args.csv_mb, args.url, with_broker, args.publish_records) and ok
    if not ok:
        raise SystemExit(f"peak RSS over {RSS_LIMIT_MB} MB")


if __name__ == "__main__":
    main()
