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

Also prints the dead letters (the dead-letter queue is a quorum queue with several broker URLs, so it
can be counted after the stop), the publishes the broker refused (nack) and the adapter sent again, and
what the engines' logs say about refused publishes and messages handed back.

The machine's own RabbitMQ (127.0.0.1:5672) is shared: if it is listening but does not answer an AMQP
handshake within 10 s, no cluster is started; while the cluster runs it is probed every 10 s, and if it
fails twice in a row the cluster is stopped at once (the run then fails); it is checked again at the end.

Run as root: .venv/bin/python bench/cluster.py [--messages 3000] [--rate 150] [--engines 1] [--keep-cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from fleet import REPO, CountingSink, Fleet, adt_messages

from middleware.errors import BrokerError

CLUSTER = REPO / "tests" / "cluster" / "cluster.sh"
print = functools.partial(print, flush=True)  # lines in order with the engines' stderr
LOCAL_BROKER = "amqp://guest:guest@127.0.0.1:5672/"
WATCHED = ("publish refused by the broker, sending it again", "publish interrupted, waiting for the connection",
           "broker unavailable while handling a message; handed back", "dead-lettered",
           "failed on its last allowed delivery", "broker connection restored")


def local_broker() -> str:
    """``answers``, ``absent`` (nothing listens on 5672) or ``NOT ANSWERING`` (listening, no handshake in 10 s)."""
    import aio_pika

    async def probe() -> str:
        try:
            connection = await asyncio.wait_for(aio_pika.connect(LOCAL_BROKER), 10)
        except ConnectionError:
            return "absent"
        except Exception:
            return "NOT ANSWERING"
        await connection.close()
        return "answers"

    return asyncio.run(probe())


class Watchdog(threading.Thread):
    """Stops the cluster if the machine's own RabbitMQ stops answering while it runs (see the docstring)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.tripped = False

    def run(self) -> None:
        failures = 0
        while not self.done.wait(10):
            failures = failures + 1 if local_broker() == "NOT ANSWERING" else 0
            if failures >= 2:
                self.tripped = True
                print("the machine's RabbitMQ on 5672 stopped answering: stopping the cluster now", file=sys.stderr)
                cluster("stop")
                return


class Refusals(logging.Handler):
    """Counts the publishes of this process the broker refused (the adapter sends them again)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage() == WATCHED[0]


def engine_events(folder: Path) -> Counter[str]:
    """How often each of ``WATCHED`` appears in the engines' JSON logs."""
    seen: Counter[str] = Counter()
    for log in folder.glob("engine-*.log"):
        for line in log.read_bytes().splitlines():
            try:
                event = orjson.loads(line).get("event")
            except orjson.JSONDecodeError:
                continue
            if event in WATCHED:
                seen[event] += 1
    return seen


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


async def dead_letters(publisher: Any, url: str) -> str:
    """Messages in the route's dead-letter queue (asked through a fresh connection to the live nodes)."""
    from middleware.broker import make_broker

    broker = make_broker(url)
    await broker.connect()
    try:
        return str((await broker.queue_info(publisher.topology.dead_letter)).messages)
    except BrokerError as exc:  # a classic queue whose node is down
        return f"unknown ({exc})"
    finally:
        await broker.close()


async def run(args: argparse.Namespace, watchdog: Watchdog) -> int:
    url = cluster("urls")
    sink = CountingSink()
    await sink.start()
    fleet = Fleet(url, sink)
    stopped_at: float | None = None
    refusals = Refusals()
    logging.getLogger("middleware.broker").addHandler(refusals)
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
                    if watchdog.tripped:
                        raise SystemExit("the cluster was stopped (the machine's RabbitMQ stopped answering)") from None
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
        dead = await dead_letters(publisher, url)
        print(f"  dead letters: {dead}")
        print(f"  publisher: publishes refused (nack) and sent again by the adapter {refusals.count}, "
              f"given up after its retries and sent again by the bench {refused}")
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
        print(f"  engines' logs: {dict(engine_events(fleet.out)) or 'nothing of note'}")
        if args.logs:
            Path(args.logs).mkdir(parents=True, exist_ok=True)
            for log in fleet.out.glob("engine-*.log"):
                (Path(args.logs) / log.name).write_bytes(log.read_bytes())
        fleet.remove_outputs()
        await sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=150.0, help="messages published per second")
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the last events")
    parser.add_argument("--logs", help="copy the engines' logs into this folder")
    parser.add_argument("--keep-cluster", action="store_true", help="use a running cluster and leave it running")
    args = parser.parse_args()
    before = local_broker()
    if before == "NOT ANSWERING":
        raise SystemExit("the machine's RabbitMQ on 5672 does not answer: no cluster started beside it")
    watchdog = Watchdog()
    try:
        if not args.keep_cluster:
            print(cluster("start").splitlines()[-1])
        watchdog.start()
        lost = asyncio.run(run(args, watchdog))
    finally:
        watchdog.done.set()
        if not args.keep_cluster and not watchdog.tripped:
            print(cluster("stop"))
        print(f"the machine's RabbitMQ on 5672: before {before}, after {local_broker()}")
    if lost:
        raise SystemExit(f"{lost} event(s) lost")


if __name__ == "__main__":
    main()
