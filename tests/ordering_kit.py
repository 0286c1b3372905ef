"""Pieces shared by the ordering tests and bench/ordering.py: a small project with one (un)ordered
delivery, a sink that records arrival order, and the order check.

The project's route reads JSON ``{"mrn": "P07", "seq": 12}`` from queue ``visits`` and gives one
``visit.recorded`` v1 event (``patient.mrn``, ``seq``) delivered over HTTP to ``$ORDER_SINK_URL``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import orjson
from aiohttp import web

from middleware.broker.base import Broker, OutgoingMessage
from tests.local_http import LocalHttpServer

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "urn:middleware:schema:visit.recorded:1",
    "title": "visit.recorded v1",
    "type": "object",
    "required": ["patient", "seq"],
    "properties": {
        "patient": {"type": "object", "required": ["mrn"], "properties": {"mrn": {"type": "string"}}},
        "seq": {"type": "integer"},
    },
}


def write_project(root: Path, *, partitions: int | None = 8, key: str = "patient.mrn", prefetch: int = 20,
                  delivery_limit: int = 10, max_age: str = "24h") -> Path:
    """A project under ``root``: the ``visits`` route, ordered by ``key`` over ``partitions``
    (None: an ordinary delivery). Broker, prefix and sink URL come from the environment."""
    (root / "config").mkdir(parents=True)
    (root / "routes").mkdir()
    (root / "connectors").mkdir()
    (root / "schemas" / "visit.recorded").mkdir(parents=True)
    (root / "config" / "middleware.yaml").write_text(
        "broker:\n  url: ${MIDDLEWARE_BROKER_URL}\n"
        f"engine:\n  prefetch: {prefetch}\n  delivery_limit: {delivery_limit}\n  drain_timeout: 5\n"
        "metrics:\n  port: 0\n"
        "journal:\n  enabled: false\n")
    ordering = f"\n    ordering: {{key: {key}, partitions: {partitions}}}" if partitions else ""
    (root / "routes" / "visits.yaml").write_text(
        "route: visits\n"
        "source: {queue: visits, format: json}\n"
        "events:\n"
        "  - type: visit.recorded\n    version: 1\n    subject: Patient/{patient.mrn}\n"
        "    map:\n      patient.mrn: {path: mrn, required: true}\n      seq: {path: seq, as: int}\n"
        f"deliver:\n  - to: order-sink{ordering}\n")
    (root / "connectors" / "order-sink.yaml").write_text(
        "connector: order-sink\ntype: http\nurl: ${ORDER_SINK_URL}\ntimeout: 5\n"
        "retry:\n  attempts: 3\n  backoff: {initial: 0.05, max: 0.2, multiplier: 2, jitter: 0}\n"
        f"  max_age: {max_age}\n")
    (root / "schemas" / "visit.recorded" / "1.json").write_text(json.dumps(SCHEMA, indent=2))
    return root


def visits(patients: int, per_patient: int) -> list[tuple[str, int]]:
    """``(mrn, seq)`` in publish order: patients interleaved, seq 0.. per patient."""
    return [(f"P{p:03d}", seq) for seq in range(per_patient) for p in range(patients)]


async def publish_visits(broker: Broker, queue: str, items: Iterable[tuple[str, int]]) -> None:
    """Publish each visit to ``queue``, one confirmed publish after the other (the publish order)."""
    for mrn, seq in items:
        await broker.publish(OutgoingMessage(orjson.dumps({"mrn": mrn, "seq": seq}), content_type="application/json",
                                             message_id=f"{mrn}-{seq}"), queue=queue)


class OrderSink(LocalHttpServer):
    """A local HTTP sink recording ``(mrn, seq)`` of each accepted event in arrival order.

    ``fail[(mrn, seq)] = n``: answer ``fail_status`` (503) to that event's first ``n`` requests;
    ``fail_while[(mrn, seq)] = predicate``: answer it while the predicate holds.
    ``delay``: seconds before answering each request.
    """

    def __init__(self) -> None:
        super().__init__()
        self.accepted: list[tuple[str, int]] = []
        self.requests = 0
        self.fail: dict[tuple[str, int], int] = {}
        self.fail_status = 503
        self.fail_while: dict[tuple[str, int], Callable[[], bool]] = {}
        self.failed_at: dict[tuple[str, int], list[float]] = defaultdict(list)
        self.delay = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        data = orjson.loads(await request.read())["data"]
        item = (data["patient"]["mrn"], int(data["seq"]))
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail.get(item, 0) > 0 or (item in self.fail_while and self.fail_while[item]()):
            self.fail[item] = max(self.fail.get(item, 0) - 1, 0)
            self.failed_at[item].append(asyncio.get_running_loop().time())
            return web.Response(status=self.fail_status, text="no")
        self.accepted.append(item)
        return web.Response(status=200, text="ok")

    async def wait_for(self, items: Iterable[tuple[str, int]], timeout: float) -> None:
        """Until every item was accepted at least once (AssertionError after ``timeout`` seconds)."""
        wanted = set(items)
        deadline = asyncio.get_running_loop().time() + timeout
        while not wanted <= set(self.accepted):
            if asyncio.get_running_loop().time() > deadline:
                missing = wanted - set(self.accepted)
                raise AssertionError(f"{len(missing)} of {len(wanted)} events never accepted, "
                                     f"e.g. {sorted(missing)[:5]}")
            await asyncio.sleep(0.05)


def per_key(items: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    """Sequence numbers per patient, in the order given."""
    result: dict[str, list[int]] = defaultdict(list)
    for mrn, seq in items:
        result[mrn].append(seq)
    return dict(result)


def without_consecutive_duplicates(seqs: Sequence[int]) -> list[int]:
    """``seqs`` with each run of equal neighbours kept once: at-least-once delivery may repeat the
    event in flight when a process dies, right after itself and never later."""
    return [s for i, s in enumerate(seqs) if i == 0 or seqs[i - 1] != s]


def order_report(published: Sequence[tuple[str, int]], accepted: Sequence[tuple[str, int]]) -> dict[str, object]:
    """``{"out_of_order": [mrn...], "missing": n, "duplicates": n}``: a patient is out of order when
    its accepted sequence, consecutive duplicates removed, is not exactly its published one."""
    sent, got = per_key(published), per_key(accepted)
    wrong = sorted(mrn for mrn, seqs in sent.items() if without_consecutive_duplicates(got.get(mrn, [])) != seqs)
    return {"out_of_order": wrong, "missing": len(set(published) - set(accepted)),
            "duplicates": len(accepted) - len(set(accepted))}


def start_engine(project: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``middleware run`` on ``project`` as its own process (logs discarded)."""
    return subprocess.Popen([sys.executable, "-m", "middleware", "run", "--project", str(project)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
