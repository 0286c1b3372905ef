"""Benchmark: the embedded broker (``filesystem://``) consumes as fast with a 100k backlog as with 1k.

For each backlog size a fresh spool folder is seeded: one message is published through the broker
and its file hard-linked under later FIFO names (not fsynced: seeding is not what is timed).
Then a consumer (prefetch 10, the engine's way) starts (lock, recovery, the first scan: "start s")
and takes and acks ``--consume`` more messages; the benchmark prints their consume+ack
messages/s (timed from the first message), how many times the queue folder was listed in all,
and, as the baseline, what one listing + sort of that folder costs: what every get paid before
the in-memory index (so 1 / that figure was the old ceiling in messages/s).

Run: .venv/bin/python bench/embedded_broker.py [--backlogs 1000,100000] [--consume 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from middleware.broker import IncomingMessage, OutgoingMessage, make_broker  # noqa: E402

QUEUE = "bench.work"
BODY = b"MSH|^~\\&|EHR|GHH|ADT|GHH|20260101120000||ADT^A01|MSG1|P|2.5\rPID|1||12345^^^GHH^MR\r" * 4


async def seed(folder: Path, count: int) -> None:
    """``count`` ready messages in ``folder``: one published, the rest links to it under later names."""
    broker = make_broker(f"filesystem://{folder}")
    await broker.connect()
    await broker.declare_queue(QUEUE)
    await broker.publish(OutgoingMessage(BODY, {"x-mw-source-file": "bench"}, "c-0"), queue=QUEUE)
    await broker.close()
    queues = folder / "queues"
    [original] = os.listdir(queues)
    stamp = int(original.split("_")[0])
    data, source = (queues / original).read_bytes(), queues / original
    for n in range(1, count):  # hard links: same bytes, a directory entry each, quick to make
        name = queues / f"{stamp + n:020d}_{n:032x}.{QUEUE}.msg"
        if n % 50_000 == 0:  # a file may have at most 65,000 links on ext4
            name.write_bytes(data)
            source = name
        else:
            os.link(source, name)


def listing_cost(folder: Path) -> float:
    """Seconds for one listing + sort of the queue folder (the old per-get cost), best of 3."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        sorted(os.listdir(folder / "queues"))
        best = min(best, time.perf_counter() - started)
    return best


async def consume(folder: Path, count: int) -> tuple[float, float, int]:
    """Seconds from consume() to the first message (start-up: lock, recovery, first scan), then
    messages/s to consume and ack ``count`` more, and how often the folder was listed in all."""
    listings = 0
    real_listdir = os.listdir
    queues = folder / "queues"

    def counting(path: str | os.PathLike[str] = ".") -> list[str]:
        nonlocal listings
        listings += Path(path) == queues
        return real_listdir(path)

    broker = make_broker(f"filesystem://{folder}")
    await broker.connect()
    await broker.declare_queue(QUEUE)
    done = asyncio.Event()
    acked = 0
    first = 0.0

    async def handle(message: IncomingMessage) -> None:
        nonlocal acked, first
        await message.ack()
        acked += 1
        if acked == 1:
            first = time.perf_counter()
        if acked == count + 1:
            done.set()

    os.listdir = counting  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        consumer = await broker.consume(QUEUE, handle, prefetch=10)
        await done.wait()
        elapsed = time.perf_counter() - first
        await consumer.cancel()
    finally:
        os.listdir = real_listdir
    await broker.close()
    return first - started, count / elapsed, listings


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlogs", default="1000,100000", help="comma-separated backlog sizes")
    parser.add_argument("--consume", type=int, default=2000, help="messages consumed and acked per backlog")
    args = parser.parse_args()
    print(f"embedded broker: consume+ack {args.consume} messages (prefetch 10) with a backlog queued")
    print(f"{'backlog':>9} {'seed s':>7} {'start s':>8} {'msg/s':>8} {'listings':>9} {'old per-get listing':>20}")
    for backlog in (int(b) for b in args.backlogs.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-embedded-") as tmp:
            folder = Path(tmp) / "broker"
            started = time.perf_counter()
            await seed(folder, backlog + args.consume + 1)  # the backlog stays queued throughout
            seeded = time.perf_counter() - started
            cost = listing_cost(folder)
            start, rate, listings = await consume(folder, args.consume)
            print(f"{backlog:>9,} {seeded:>7.1f} {start:>8.2f} {rate:>8,.0f} {listings:>9} "
                  f"{cost * 1000:>11.1f} ms/get (ceiling {1 / cost:,.0f}/s)")


if __name__ == "__main__":
    asyncio.run(main())
