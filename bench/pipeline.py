"""Benchmark: the whole engine beside a hand-written aio-pika + aiohttp pipeline of the same shape (issue 14).

Both move the same HL7 ADT^A01 messages (unique MSH-10 each), in the same run, over two broker hops to
an HTTP sink in its own process:

  - engine: ``middleware run`` in its own process on a temporary project (the shipped adt-inbound route
    delivering to the ``case-management`` http connector pointed at the sink; a unique queue prefix):
    inbound queue -> parse, filter, map, validate, CloudEvent -> events exchange (confirm) -> ack;
    delivery queue -> POST -> ack.
  - bare: the same two hops written by hand in its own process: aio-pika consume (prefetch 200) ->
    publish to a topic exchange with a confirm -> ack; consume (prefetch 200) -> aiohttp POST -> ack;
    no parsing, mapping or validation. Same queue kinds (quorum) and exchange type (topic).

Throughput: N messages are preloaded into the inbound queue, then the process starts; msg/s is taken
at the sink from the first arrival to the last (start-up excluded); median of ``--repeat`` runs,
engine and bare alternating. ``--latency``: a paced publisher (publish -> sink arrival, monotonic clock
shared by the processes) at several fractions of the measured maximum, rate -> p50/p99/max, for both.
Peak RSS of the engine process (``/proc/<pid>/status`` VmHWM) in every mode. ``--minutes M``: every
shipped route, the journal and the console on, a paced publisher at ``--rate`` for M minutes; RSS every
minute. Deletes every queue and exchange it declared (random ``bench-`` prefix).

Run: .venv/bin/python bench/pipeline.py [--messages 5000] [--repeat 3] [--latency] [--journal]
     .venv/bin/python bench/pipeline.py --messages 20000 --repeat 1 --flamegraph docs/images/flamegraph-engine.svg
     .venv/bin/python bench/pipeline.py --minutes 10 --rate 500
     .venv/bin/python bench/pipeline.py --minutes 5 --rate 150 --tracemalloc /tmp/snaps   (then bench/memtrace.py diff)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mllp import make_messages  # noqa: E402  (the same ADT^A01 generator as the MLLP benchmark)

URL = "amqp://guest:guest@127.0.0.1:5672/"
BARE_PREFETCH = 200
EVENT_KEY = "patient.admitted.v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# -- the sink (own process) -----------------------------------------------------------------------

def run_sink(port: int) -> None:
    from aiohttp import web

    state: dict[str, Any] = {"count": 0, "first": None, "last": None, "arrivals": {}}

    async def event(request: web.Request) -> web.Response:
        await request.read()
        now = time.monotonic()
        state["count"] += 1
        state["first"] = state["first"] or now
        state["last"] = now
        correlation = request.headers.get("X-Correlation-ID", "")
        if correlation.startswith("lat-"):
            state["arrivals"][correlation] = now
        return web.Response(status=200)

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(state)

    async def reset(_: web.Request) -> web.Response:
        state.update(count=0, first=None, last=None, arrivals={})
        return web.Response(status=204)

    app = web.Application()
    app.add_routes([web.post("/events", event), web.get("/stats", stats), web.post("/reset", reset)])
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- the bare pipeline (own process) --------------------------------------------------------------

def bare_names(prefix: str) -> tuple[str, str, str]:
    return f"{prefix}bare.in", f"{prefix}bare.events", f"{prefix}bare.to.sink"


async def bare_pipeline(url: str, prefix: str, sink: str) -> None:
    import aio_pika
    import aiohttp

    inbound, exchange_name, delivery = bare_names(prefix)
    connection = await aio_pika.connect_robust(url)
    publish_channel = await connection.channel(publisher_confirms=True)
    exchange = await publish_channel.get_exchange(exchange_name, ensure=False)
    session = aiohttp.ClientSession()

    async def hop(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await exchange.publish(aio_pika.Message(message.body, correlation_id=message.correlation_id,
                                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                               routing_key=EVENT_KEY)
        await message.ack()

    async def deliver(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with session.post(sink, data=message.body,
                                headers={"X-Correlation-ID": message.correlation_id or ""}) as answer:
            await answer.read()
            if answer.status < 300:
                await message.ack()
            else:
                await message.reject(requeue=True)

    for name, handler in ((inbound, hop), (delivery, deliver)):
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=BARE_PREFETCH)
        queue = await channel.get_queue(name, ensure=False)
        await queue.consume(handler)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await connection.close()
    await session.close()


# -- set-up and clean-up (bench process) ----------------------------------------------------------

class Target:
    """One side of the comparison: how to start it, where to publish, what to delete."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], inbound: str) -> None:
        self.name, self.command, self.env, self.inbound = name, command, env, inbound
        self.process: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0.0
        self.profile: Path | None = None  # the next run is sampled by py-spy into this flame graph (SVG)
        self._profiler: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.DEVNULL)
        if self.profile is not None:
            self._profiler = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                                               str(self.process.pid), "--rate", "200", "--nonblocking",
                                               "--output", str(self.profile)]
                                              + (["--format", "raw"] if self.profile.suffix == ".txt" else []),
                                              stdout=subprocess.DEVNULL)
            self.profile = None

    def cpu(self) -> float:
        """User + system CPU seconds of the process so far."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def sample(self) -> float:
        assert self.process is not None
        current = rss_mb(self.process.pid)
        self.peak_rss = max(self.peak_rss, rss_mb(self.process.pid, "VmHWM"), current)
        return current

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.sample()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._profiler is not None:  # py-spy writes the SVG when the process it samples exits
            self._profiler.wait(60)
            self._profiler = None
        self.process = None


def make_project(folder: Path, *, full: bool, journal: bool, metrics_port: int, prefetch: int | None = None) -> None:
    """A copy of the shipped project: adt-inbound -> case-management only, unless ``full``."""
    for part in ("config", "connectors", "schemas"):
        shutil.copytree(REPO / part, folder / part)
    shutil.copytree(REPO / "routes", folder / "routes", ignore=shutil.ignore_patterns("tests"))
    settings = yaml.safe_load((REPO / "config" / "middleware.yaml").read_text())
    settings["metrics"] = {"host": "127.0.0.1", "port": metrics_port}
    settings["journal"]["enabled"] = journal
    if prefetch:
        settings["engine"]["prefetch"] = prefetch
    if not full:
        settings.pop("ingest", None)
        for route in (folder / "routes").glob("*.yaml"):
            if route.name != "adt-inbound.yaml":
                route.unlink()
        adt = yaml.safe_load((REPO / "routes" / "adt-inbound.yaml").read_text())
        adt["deliver"] = [{"to": "case-management"}]
        (folder / "routes" / "adt-inbound.yaml").write_text(yaml.safe_dump(adt, sort_keys=False))
    (folder / "config" / "middleware.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))


def engine_env(folder: Path, url: str, prefix: str, sink: str) -> dict[str, str]:
    return {**os.environ, "MIDDLEWARE_BROKER_URL": url, "MIDDLEWARE_QUEUE_PREFIX": prefix,
            "CASE_MANAGEMENT_URL": sink, "CDR_URL": sink, "FHIR_URL": sink.rsplit("/", 1)[0] + "/fhir",
            "BED_BOARD_PATH": str(folder / "out" / "bed-board.jsonl"),
            "EVENT_ARCHIVE_PATH": str(folder / "out" / "archive.jsonl"),
            "MLLP_PORT": str(free_port()), "HTTP_INGEST_PORT": str(free_port()),
            "HTTP_INGEST_TOKEN": uuid.uuid4().hex, "CONSOLE_TOKEN": uuid.uuid4().hex,
            "AUDIT_LOG": str(folder / "var" / "audit.log")}


async def declare_engine(folder: Path, env: dict[str, str]) -> tuple[str, Any, Any]:
    """Declare the engine project's topology (so messages can be preloaded); inbound queue, broker, topology."""
    from middleware import topology
    from middleware.broker.amqp import AmqpBroker
    from middleware.project import load_project

    project = load_project(folder, env)
    broker = AmqpBroker(env["MIDDLEWARE_BROKER_URL"])
    await broker.connect()
    everything = topology.Topology.of(project.routes.values(), project.settings.queue_prefix)
    for route_topology in everything:
        await topology.declare(broker, route_topology, project.settings.delivery_limit)
    return everything.route("adt-inbound").inbound, broker, everything


async def declare_bare(url: str, prefix: str) -> None:
    import aio_pika

    inbound, exchange_name, delivery = bare_names(prefix)
    quorum = {"x-queue-type": "quorum", "x-delivery-limit": 10}
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.declare_queue(inbound, durable=True, arguments=quorum)
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(delivery, durable=True, arguments=quorum)
        await queue.bind(exchange, EVENT_KEY)


async def delete_bare(url: str, prefix: str) -> None:
    import aio_pika

    inbound, exchange_name, delivery = bare_names(prefix)
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(inbound)
        await channel.queue_delete(delivery)
        await channel.exchange_delete(exchange_name)


async def preload(url: str, queue: str, messages: list[bytes]) -> None:
    import aio_pika

    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        for start in range(0, len(messages), 500):
            await asyncio.gather(*(channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue)
                for body in messages[start:start + 500]))


async def consumers(url: str, queue: str) -> int:
    import aio_pika

    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count or 0)


# -- measurements ---------------------------------------------------------------------------------

class Sink:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, __file__, "--role", "sink", "--port", str(port)])

    async def call(self, method: str, path: str) -> Any:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.request(method, self.url + path) as answer:
            return await answer.json() if answer.status == 200 else None

    async def wait_up(self) -> None:
        for _ in range(100):
            try:
                await self.call("POST", "/reset")
                return
            except (TimeoutError, OSError):
                await asyncio.sleep(0.1)
        raise RuntimeError("the sink did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


async def wait_ready(url: str, target: Target, queues: list[str]) -> None:
    for _ in range(600):
        if target.process is None or target.process.poll() is not None:
            raise RuntimeError(f"{target.name} exited early")
        if all([await consumers(url, queue) for queue in queues]):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{target.name} did not start consuming")


async def startup_cpu(url: str, target: Target, queues: list[str]) -> float:
    """CPU seconds the process spends starting up on empty queues (taken off the per-message cost)."""
    target.start()
    await wait_ready(url, target, queues)
    await asyncio.sleep(1)
    spent = target.cpu()
    target.stop()
    return spent


async def throughput(url: str, target: Target, sink: Sink, messages: list[bytes]) -> tuple[float, float]:
    """Preload, start the process: msg/s at the sink from first to last arrival, process CPU seconds."""
    await sink.call("POST", "/reset")
    await preload(url, target.inbound, messages)
    target.start()
    deadline = time.monotonic() + 60 + len(messages) / 100
    while True:
        await asyncio.sleep(0.25)
        target.sample()
        stats = await sink.call("GET", "/stats")
        if stats["count"] >= len(messages):
            break
        if time.monotonic() > deadline or (target.process and target.process.poll() is not None):
            raise RuntimeError(f"{target.name}: {stats['count']} of {len(messages)} arrived")
    spent = target.cpu()
    target.stop()
    return (stats["count"] - 1) / (stats["last"] - stats["first"]), spent


async def paced(url: str, queue: str, rate: float, seconds: float, tag: str) -> dict[str, float]:
    """Publish ``rate`` msg/s for ``seconds`` (confirms pipelined); correlation id -> publish time."""
    import aio_pika

    template = make_messages(1)[0]
    sent: dict[str, float] = {}
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        pending: set[asyncio.Task[Any]] = set()
        start = time.monotonic()
        for n in range(int(rate * seconds)):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            correlation = f"lat-{tag}-{n}"
            body = template.replace(b"BENCH-0", correlation.encode())
            sent[correlation] = time.monotonic()
            task = asyncio.create_task(channel.default_exchange.publish(aio_pika.Message(
                body, correlation_id=correlation, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
    return sent


async def latency(url: str, target: Target, sink: Sink, rate: float, seconds: float) -> tuple[float, ...]:
    await sink.call("POST", "/reset")
    sent = await paced(url, target.inbound, rate, seconds, f"{target.name}{rate:.0f}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        target.sample()
        stats = await sink.call("GET", "/stats")
        if len(stats["arrivals"]) >= len(sent):
            break
        await asyncio.sleep(0.2)
    waits = sorted((arrived - sent[c]) * 1000 for c, arrived in stats["arrivals"].items() if c in sent)
    cuts = statistics.quantiles(waits, n=100, method="inclusive")
    return cuts[49], cuts[98], waits[-1], len(waits) / len(sent)


async def main_async(args: argparse.Namespace) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:6]}."
    sink = Sink(free_port())
    await sink.wait_up()
    folder = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    full = args.minutes > 0
    make_project(folder, full=full, journal=args.journal, metrics_port=free_port(), prefetch=args.prefetch)
    env = engine_env(folder, args.url, prefix, sink.url + "/events")
    inbound, broker, topology_ = await declare_engine(folder, env)
    launcher = [str(Path(sys.executable).parent / "middleware")]
    if args.uvloop:  # the same CLI on uvloop's event loop (pip install uvloop)
        launcher = [sys.executable, "-c", "import sys, uvloop; uvloop.install(); sys.argv[0] = 'middleware'; "
                    "from middleware.cli import main; main()"]
    if args.tracemalloc:  # tracemalloc snapshots a minute apart (bench/memtrace.py diff compares them)
        launcher = [sys.executable, str(Path(__file__).with_name("memtrace.py")), "record",
                    "--interval", str(args.snapshot_interval), str(args.tracemalloc), "--"]
    engine = Target("engine", [*launcher, "run", "--project", str(folder), "--log-level", "WARNING"], env, inbound)
    await declare_bare(args.url, prefix)
    bare = Target("bare", [sys.executable, __file__, "--role", "bare", "--url", args.url, "--prefix", prefix,
                           "--sink", sink.url + "/events"], dict(os.environ), bare_names(prefix)[0])
    delivery = topology_.route("adt-inbound").deliveries.get("case-management", "")
    variants = [Target(f"engine {v}", engine.command, {**env, **dict([v.split("=", 1)])}, inbound)
                for v in args.variant]  # A/B: the same engine with one environment variable changed
    try:
        if full:
            await memory_run(args, engine, sink)
            return
        messages = make_messages(args.messages)
        queues = {"engine": [engine.inbound, delivery], "bare": [bare.inbound, bare_names(prefix)[2]]}
        queues.update({v.name: queues["engine"] for v in variants})
        targets = [engine, *variants, bare]
        idle = {t.name: await startup_cpu(args.url, t, queues[t.name]) for t in targets}
        if args.flamegraph:
            engine.profile = args.flamegraph
        rates: dict[str, list[float]] = {t.name: [] for t in targets}
        cpu: dict[str, list[float]] = {t.name: [] for t in targets}
        for _ in range(args.repeat):
            for target in targets:
                rate, spent = await throughput(args.url, target, sink, messages)
                rates[target.name].append(rate)
                cpu[target.name].append((spent - idle[target.name]) / len(messages) * 1e6)
        engine_rate, bare_rate = statistics.median(rates["engine"]), statistics.median(rates["bare"])
        engine_cpu, bare_cpu = statistics.median(cpu["engine"]), statistics.median(cpu["bare"])
        print(f"pipeline benchmark: {args.messages} ADT^A01 preloaded, median of {args.repeat}, "
              f"RabbitMQ {args.url}, journal {'on' if args.journal else 'off'}, "
              f"engine prefetch {args.prefetch or 'as configured'}{', engine on uvloop' if args.uvloop else ''}")
        print(f"{'':44} {'median msg/s':>12} {'CPU us/msg':>10}  runs (msg/s)")
        print(f"{'engine (middleware run, adt-inbound -> http)':44} {engine_rate:12.0f} {engine_cpu:10.0f}  "
              + " ".join(f"{r:.0f}" for r in rates["engine"]))
        for variant in variants:
            print(f"{variant.name:44} {statistics.median(rates[variant.name]):12.0f} "
                  f"{statistics.median(cpu[variant.name]):10.0f}  " + " ".join(f"{r:.0f}" for r in rates[variant.name]))
        print(f"{'bare (aio-pika + aiohttp, same two hops)':44} {bare_rate:12.0f} {bare_cpu:10.0f}  "
              + " ".join(f"{r:.0f}" for r in rates["bare"]))
        print(f"engine / bare: {engine_rate / bare_rate:.2f}   (runs: "
              + " ".join(f"{e / b:.2f}" for e, b in zip(rates["engine"], rates["bare"], strict=True)) + ")")
        for variant in variants:
            print(f"{variant.name} / bare: {statistics.median(rates[variant.name]) / bare_rate:.2f}, CPU "
                  f"{variant.name} / engine: {statistics.median(cpu[variant.name]) / engine_cpu:.2f}")
        print(f"engine peak RSS: {engine.peak_rss:.0f} MB")
        if args.latency:
            top = args.max_rate or engine_rate
            print(f"\nlatency, publish -> sink arrival (ms), {args.seconds:.0f} s per rate; max = {top:.0f} msg/s")
            print(f"{'rate':>6} {'% max':>6} | {'engine p50':>10} {'p99':>7} {'max':>7} | "
                  f"{'bare p50':>8} {'p99':>7} {'max':>7}")
            figures: dict[str, dict[float, tuple[float, ...]]] = {"engine": {}, "bare": {}}
            for target in (engine, bare):
                target.start()
                await wait_ready(args.url, target, [target.inbound, delivery if target is engine
                                                    else bare_names(prefix)[2]])
                for share in args.shares:
                    figures[target.name][share] = await latency(args.url, target, sink, top * share, args.seconds)
                target.stop()
            for share in args.shares:
                e, b = figures["engine"][share], figures["bare"][share]
                print(f"{top * share:6.0f} {share * 100:5.0f}% | {e[0]:10.1f} {e[1]:7.1f} {e[2]:7.1f} | "
                      f"{b[0]:8.1f} {b[1]:7.1f} {b[2]:7.1f}")
            print(f"engine peak RSS: {engine.peak_rss:.0f} MB")
    finally:
        engine.stop()
        bare.stop()
        from middleware import topology

        await topology.delete(broker, topology_)
        await broker.close()
        await delete_bare(args.url, prefix)
        sink.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def memory_run(args: argparse.Namespace, engine: Target, sink: Sink) -> None:
    """Every shipped route, journal and console on; paced ADT load; RSS every minute."""
    engine.start()
    await wait_ready(args.url, engine, [engine.inbound])
    print(f"memory run: every shipped route, journal {'on' if args.journal else 'off'}, console on, "
          f"{args.rate:.0f} msg/s ADT^A01 for {args.minutes} min")
    print(f"{'minute':>6} {'RSS MB':>7} {'peak MB':>8} {'delivered':>10} {'p50 ms':>7} {'p99 ms':>7}")
    for minute in range(1, args.minutes + 1):
        await sink.call("POST", "/reset")
        publisher = asyncio.create_task(paced(args.url, engine.inbound, args.rate, 60, f"m{minute}"))
        while not publisher.done():
            await asyncio.sleep(args.sample)
            engine.sample()
        sent = publisher.result()
        await asyncio.sleep(1)
        stats = await sink.call("GET", "/stats")
        waits = [(a - sent[c]) * 1000 for c, a in stats["arrivals"].items() if c in sent]
        cuts = statistics.quantiles(waits, n=100, method="inclusive") if len(waits) > 1 else [0.0] * 99
        print(f"{minute:6} {engine.sample():7.0f} {engine.peak_rss:8.0f} {stats['count']:10} "
              f"{cuts[49]:7.1f} {cuts[98]:7.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--role", choices=["bench", "sink", "bare"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    parser.add_argument("--url", default=URL)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--journal", action=argparse.BooleanOptionalAction, default=False,
                        help="the engine's journal (default off for throughput; the --minutes run turns it on)")
    parser.add_argument("--prefetch", type=int, default=0, help="the engine's engine.prefetch (default: the "
                        "shipped config's)")
    parser.add_argument("--uvloop", action="store_true", help="run the engine on uvloop (pip install uvloop)")
    parser.add_argument("--latency", action="store_true", help="also the paced latency curve")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE", help="also run the "
                        "engine with this environment variable set (A/B in the same run; repeatable)")
    parser.add_argument("--max-rate", type=float, default=0.0, help="latency rates as shares of this "
                        "(default: the engine's measured maximum)")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 0.9])
    parser.add_argument("--seconds", type=float, default=5.0, help="paced publishing per latency rate")
    parser.add_argument("--flamegraph", type=Path, help="py-spy flame graph (SVG) of the engine's first "
                        "throughput run (pip install py-spy; start-up is in it, so use many --messages); "
                        "a .txt path gets py-spy's collapsed stacks instead")
    parser.add_argument("--minutes", type=int, default=0, help="memory run: every route, journal, console")
    parser.add_argument("--rate", type=float, default=500.0, help="memory run: publish rate")
    parser.add_argument("--tracemalloc", type=Path, help="memory run: the engine under bench/memtrace.py, "
                        "a tracemalloc snapshot into this folder every --snapshot-interval s (slows it 2-3x)")
    parser.add_argument("--snapshot-interval", type=float, default=60.0)
    parser.add_argument("--sample", type=float, default=5.0, help="memory run: RSS sampling interval (s)")
    args = parser.parse_args()
    if args.role == "sink":
        run_sink(args.port)
    elif args.role == "bare":
        asyncio.run(bare_pipeline(args.url, args.prefix, args.sink))
    else:
        if args.minutes:
            args.journal = True
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
