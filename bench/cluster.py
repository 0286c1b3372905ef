"""Benchmark: the engine on a real 3-node RabbitMQ cluster, one node stopped under load, nothing lost.

Starts the cluster with tests/cluster/cluster.sh (nodes c1..c3 on 5681-5683; the machine's own broker on
5672 is not touched) unless ``--keep-cluster`` finds it running, gives ``middleware run`` engines
(bench/fleet.py) and the publisher the three node URLs (``MIDDLEWARE_BROKER_URL`` comma separated), so
they all start on c1. The route's queues are quorum queues, replicated on the three nodes. ADT A01
messages are published at ``--rate`` per second; once a third are published, node c1 is stopped: the
publisher and the engines reconnect to c2, the quorum queues elect a leader among c2/c3, and the
run checks that every event reaches the local aiohttp sink (duplicates allowed: at-least-once).
Prints the queue's replicas before the stop, events/s, the longest pause at the sink (the failover),
duplicates and lost events. Stops every node it started (and deletes their data) at the end.

Run as root: .venv/bin/python bench/cluster.py [--messages 3000] [--rate 150] [--engines 1] [--keep-cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet import REPO, CountingSink, Fleet, adt_messages

from middleware.errors import BrokerError

CLUSTER = REPO / "tests" / "cluster" / "cluster.sh"
print = functools.partial(print, flush=True)  # lines in order with the engines' stderr


def cluster(*args: str) -> str:
    out = subprocess.run([str(CLUSTER), *args], capture_output=True, text=True, check=False, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"cluster.sh {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout.strip()


def replicas(queue: str, node: str) -> str:
    """The queue's type, leader and members as ``node`` reports them."""
    out = subprocess.run(["rabbitmqctl", "-q", "-n", node, "list_queues", "name", "type", "leader", "members"],
                         capture_output=True, text=True, check=False, timeout=60)
    return next((line for line in out.stdout.splitlines() if line.startswith(queue + "\t")), "(not listed)")


async def run(args: argparse.Namespace) -> int:
    url = cluster("urls")
    sink = CountingSink()
    await sink.start()
    fleet = Fleet(url, sink)
    stopped_at: float | None = None
    try:
        publisher = await fleet.publisher()
        inbound = publisher.queue
        fleet.start(args.engines)
        await fleet.wait_consuming(publisher)
        messages = adt_messages(args.messages, f"C-{uuid.uuid4().hex[:6]}")
        print(f"{args.messages:,} ADT A01 at {args.rate}/s, {args.engines} engine(s), nodes {url}")
        print(f"  inbound queue before the stop: {replicas(inbound, 'c1@localhost')}")
        started = time.monotonic()
        refused = 0
        for n, raw in enumerate(messages):
            while True:  # confirmed (a publish waits through the reconnect to the next node)
                try:
                    await publisher.publish(raw, source="bench")
                    break
                except BrokerError:  # nacked while the queue elects a new leader: send it again, as a sender would
                    refused += 1
                    await asyncio.sleep(0.2)
            if n == len(messages) // 3 and stopped_at is None:
                stopped_at = time.monotonic()
                await asyncio.to_thread(cluster, "stop-node", "1")
                print(f"  node c1 stopped after {n + 1:,} published, {sink.unique:,} delivered "
                      f"({time.monotonic() - stopped_at:.1f} s to stop it)")
            delay = started + (n + 1) / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        published = time.monotonic() - started
        await publisher.broker.close()
        complete = await sink.wait_for(args.messages, args.wait)
        if not complete:
            print(fleet.tail(), file=sys.stderr)
        print(f"  inbound queue after the stop:  {replicas(inbound, 'c2@localhost')}")
        lost = int(args.messages) - sink.unique
        print(f"  publishes refused (nack) and sent again during the failover: {refused}")
        print(f"  published {args.messages:,} in {published:.1f} s; delivered {sink.unique:,} distinct events "
              f"({sink.rate():,.0f}/s), duplicates {sink.duplicates:,}, lost {lost}; "
              f"longest pause at the sink {sink.longest_gap():.1f} s; engines alive {fleet.alive()}/{args.engines}")
        return lost
    finally:
        fleet.stop()
        try:
            await fleet.delete_queues()
        except Exception as exc:  # the cluster is stopped below anyway
            print(f"  queues not deleted: {type(exc).__name__}", file=sys.stderr)
        fleet.remove_outputs()
        await sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=150.0, help="messages published per second")
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the last events")
    parser.add_argument("--keep-cluster", action="store_true", help="use a running cluster and leave it running")
    args = parser.parse_args()
    if not args.keep_cluster:
        print(cluster("start").splitlines()[-1])
    try:
        lost = asyncio.run(run(args))
    finally:
        if not args.keep_cluster:
            print(cluster("stop"))
    if lost:
        raise SystemExit(f"{lost} event(s) lost")


if __name__ == "__main__":
    main()
