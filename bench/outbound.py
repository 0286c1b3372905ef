"""Benchmark: what a delivery's ``when:`` / ``map:`` and the ``fhir`` connector cost per event (issue 11).

CPU part (one core, no I/O), on the A01 event the shipped adt-inbound route makes of its sample:

  - ``baseline``: ``orjson.loads`` + ``orjson.dumps`` of the event: the least any reshaping costs;
  - ``when``: :meth:`Outbound.prepare` with ``when: {type: patient.admitted}`` (the event passes unchanged);
  - ``when + map``: the same with a six-target map (paths, a template, a constant, an indexed target);
  - ``fhir maps``: the fhir connector's built-in map (Patient + Encounter transaction Bundle) and its JSON.

Send part: ``--events`` deliveries, ``--in-flight`` at a time, to a local aiohttp server answering 200
(nothing validated), through the ``http`` connector (the CloudEvent as it is) and the ``fhir`` connector
(the Bundle built per event): what the FHIR mapping adds on the wire path.

Run: .venv/bin/python bench/outbound.py [--n 20000] [--events 5000] [--in-flight 50]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from middleware.delivery import ConnectorSpec, Delivery, RetryPolicy, make_connector
from middleware.delivery.fhir_maps import resources_for
from middleware.delivery.outbound import Outbound, compile_map, compile_when
from middleware.project import load_project
from middleware.route import transform

REPO = Path(__file__).resolve().parents[1]
MAP = {"mrn": "data.patient.mrn", "name": {"template": "{data.patient.name.given} {data.patient.name.family}"},
       "bed": "data.encounter.location.bed", "kind": {"value": "admission"}, "identifier[0].value": "id",
       "since": {"path": "data.encounter.admitted_at", "as": "datetime"}}


def admitted_event() -> dict[str, Any]:
    project = load_project(REPO, {}, offline=True)
    raw = (REPO / "samples" / "adt-inbound" / "a01-admit.hl7").read_bytes()
    return transform(project.route("adt-inbound"), raw).events[0]


def rate(n: int, work: Callable[[], object]) -> float:
    started = time.perf_counter()
    for _ in range(n):
        work()
    return n / (time.perf_counter() - started)


async def send_rate(kind: str, url: str, event: dict[str, Any], events: int, in_flight: int) -> float:
    connector = make_connector(ConnectorSpec(kind, kind, {"url": url}, RetryPolicy(attempts=1)))
    await connector.start()
    delivery = Delivery(body=orjson.dumps(event), event_id=event["id"], correlation_id="c", route="adt-inbound",
                        event_type=event["type"])
    gate = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with gate:
            await connector.send(delivery)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(events)))
    elapsed = time.perf_counter() - started
    await connector.close()
    return events / elapsed


async def send_part(event: dict[str, Any], events: int, in_flight: int) -> list[tuple[str, float]]:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        await send_rate("http", f"{base}/warmup", event, 200, in_flight)
        return [("http connector (CloudEvent)", await send_rate("http", f"{base}/events", event, events, in_flight)),
                ("fhir connector (Bundle)", await send_rate("fhir", f"{base}/fhir", event, events, in_flight))]
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="events per CPU measurement")
    parser.add_argument("--events", type=int, default=5000, help="deliveries per send measurement")
    parser.add_argument("--in-flight", type=int, default=50)
    args = parser.parse_args()
    event = admitted_event()
    body = orjson.dumps(event)
    when = Outbound(when=compile_when({"type": "patient.admitted"}))
    mapped = Outbound(when=when.when, map=compile_map(MAP))
    assert when.prepare(body) is not None and mapped.prepare(body) is not None
    rows = [("baseline: orjson loads + dumps", rate(args.n, lambda: orjson.dumps(orjson.loads(body)))),
            ("when (type)", rate(args.n, lambda: when.prepare(body))),
            ("when + map (6 targets)", rate(args.n, lambda: mapped.prepare(body))),
            ("fhir maps: Patient + Encounter Bundle", rate(args.n, lambda: orjson.dumps(
                [e.bundle_entry() for e in resources_for(orjson.loads(body))])))]
    print(f"{'per event, one core':40} {'events/s':>12}")
    for name, value in rows:
        print(f"{name:40} {value:12,.0f}")
    print(f"\n{'send, ' + str(args.in_flight) + ' in flight, local 200 sink':40} {'events/s':>12}")
    for name, value in asyncio.run(send_part(event, args.events, args.in_flight)):
        print(f"{name:40} {value:12,.0f}")


if __name__ == "__main__":
    main()
