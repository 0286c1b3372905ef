"""Benchmark: big inputs split and publish in time linear in their size.

Generates, in a temporary folder, two inputs of about ``--mb`` megabytes each:

  - one HL7 v2 ORU^R01 message whose OBX-5 holds a base64 "PDF" (a single 50 MB segment);
  - an HL7 batch file (FHS/BHS ... BTS/FTS) of ADT^A01 messages (about 340 bytes each: 50 MB is
    about 150,000 messages).

For each it times the split alone (``Format.split`` of ``hl7v2``, reading the file in 64 KiB
chunks), then split + publish through the one :class:`~middleware.ingest.publisher.Publisher`
(confirmed publishes, 256 in flight) on ``memory://`` and on RabbitMQ when it answers (and on the
embedded ``filesystem://`` broker with ``--brokers memory,amqp,filesystem``). Baselines
in the same run: reading the file once (what any linear splitter must at least pay), and bare
confirmed publishes through the broker port (what the broker allows; a batch cannot go faster).
The embedded broker is left out by default: it makes every group of publishes durable on disk
(about 500-1,500 messages/s here), so a 50 MB batch takes minutes there, bound by the disk.

Run: .venv/bin/python bench/big_inputs.py [--mb 50] [--url amqp://guest:guest@127.0.0.1:5672/]
     [--brokers memory,amqp,filesystem]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from middleware.broker import make_broker  # noqa: E402
from middleware.formats import SplitInfo, get_format  # noqa: E402
from middleware.ingest.publisher import Publisher  # noqa: E402
from middleware.project import load_project  # noqa: E402

ADT = ("MSH|^~\\&|EHR|GHH|ADT|GHH|20260101120000||ADT^A01|MSG{n}|P|2.5\r"
       "EVN|A01|20260101120000\r"
       "PID|1||{n}^^^GHH^MR||DOE^JOHN^Q||19800101|M|||1 MAIN ST^^SPRINGFIELD^IL^62701\r"
       "PV1|1|I|WARD^101^A||||1234^SMITH^JANE|||MED||||1|||||V{n}\r"
       "NK1|1|DOE^JANE^M|SPO^Spouse|1 MAIN ST^^SPRINGFIELD^IL^62701|(555)555-0100\r"
       "AL1|1|DA|PCN^Penicillin|SV|Hives\r")


def make_single(path: Path, megabytes: int) -> None:
    """One ORU^R01 with a ``megabytes`` MB base64 document in OBX-5 (no line break inside it)."""
    pdf = base64.b64encode(os.urandom(megabytes * 1_000_000 * 3 // 4))
    path.write_bytes(b"MSH|^~\\&|LIS|GHH|EHR|GHH|20260101120000||ORU^R01|PDF-1|P|2.5\r"
                     b"PID|1||12345^^^GHH^MR||DOE^JANE\rOBR|1|ORD-1|FIL-1|PDF^Report\r"
                     b"OBX|1|ED|PDF^Report||^application^pdf^Base64^" + pdf + b"||||||F\r")


def make_batch(path: Path, megabytes: int) -> int:
    """An enveloped batch of ADT^A01 messages of about ``megabytes`` MB; returns the message count."""
    count = 0
    with path.open("wb") as out:
        out.write(b"FHS|^~\\&|EHR|GHH||||||||FILE-1\rBHS|^~\\&|EHR|GHH||||||||BATCH-1\r")
        while out.tell() < megabytes * 1_000_000:
            count += 1
            out.write(ADT.format(n=count).encode())
        out.write(f"BTS|{count}\rFTS|1\r".encode())
    return count


def read_once(path: Path) -> float:
    started = time.perf_counter()
    with path.open("rb") as stream:
        while stream.read(1 << 16):
            pass
    return time.perf_counter() - started


def split_only(path: Path) -> tuple[float, int]:
    started = time.perf_counter()
    with path.open("rb") as stream:
        records = sum(1 for _ in get_format("hl7v2").split(stream, SplitInfo()))
    return time.perf_counter() - started, records


def adt_project(folder: Path) -> Path:
    """The shipped project with only its adt-inbound route, copied into ``folder``."""
    for name in ("config", "connectors", "schemas"):
        shutil.copytree(REPO / name, folder / name)
    (folder / "routes").mkdir()
    shutil.copy(REPO / "routes" / "adt-inbound.yaml", folder / "routes")
    return folder


async def publish(url: str, path: Path, prefix: str, project_folder: Path) -> tuple[float, int]:
    """Seconds to split and publish ``path`` (confirmed) to adt-inbound's queue on ``url``."""
    project = load_project(project_folder, {**os.environ, "MIDDLEWARE_BROKER_URL": url,
                                            "MIDDLEWARE_QUEUE_PREFIX": prefix})
    route = project.routes["adt-inbound"]
    broker = make_broker(url)
    await broker.connect()
    publisher = Publisher(broker, route, project.settings)
    try:
        await publisher.declare()
        started = time.perf_counter()
        with path.open("rb") as stream:
            result = await publisher.publish_stream(stream, source="bench", name=path.name)
        elapsed = time.perf_counter() - started
    finally:
        if url.startswith("amqp"):
            from middleware.engine import project_queues

            for queue in [*project_queues(project), *(f"{prefix}{r}.dlq" for r in project.routes)]:
                await broker.delete_queue(queue)
            await broker.delete_exchange(f"{prefix}middleware.events")
        await broker.close()
    return elapsed, result.published


async def raw_publish_rate(url: str, count: int = 20_000) -> float:
    """Baseline: messages/s of bare confirmed publishes (360-byte bodies, 256 in flight) through the
    broker port, no splitting, no headers: what the broker itself allows from one Python process."""
    from middleware.broker import OutgoingMessage

    broker = make_broker(url)
    await broker.connect()
    queue = f"bench-{uuid.uuid4().hex[:6]}.raw"
    await broker.declare_queue(queue)
    message = OutgoingMessage(ADT.format(n=1).encode())
    slots = asyncio.Semaphore(256)

    async def one() -> None:
        async with slots:
            await broker.publish(message, queue=queue)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    elapsed = time.perf_counter() - started
    await broker.delete_queue(queue)
    await broker.close()
    return count / elapsed


async def rabbitmq_answers(url: str) -> bool:
    broker = make_broker(url)
    try:
        await asyncio.wait_for(broker.connect(), 5)
    except Exception:
        return False
    await broker.close()
    return True


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=50, help="size of each generated input in MB")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/", help="RabbitMQ to publish to")
    parser.add_argument("--brokers", default="memory,amqp", help="of memory, amqp, filesystem (the embedded one)")
    args = parser.parse_args()
    wanted = args.brokers.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-big-") as tmp:
        brokers = ["memory://"] if "memory" in wanted else []
        if "amqp" in wanted:
            if await rabbitmq_answers(args.url):
                brokers.append(args.url)
            else:
                print(f"RabbitMQ at {args.url} does not answer: left out")
        if "filesystem" in wanted:
            brokers.append(f"filesystem://{tmp}/broker")
        single, batch = Path(tmp) / "single.hl7", Path(tmp) / "batch.hl7"
        project = adt_project(Path(tmp) / "project")
        make_single(single, args.mb)
        count = make_batch(batch, args.mb)
        print(f"inputs: one {single.stat().st_size / 1e6:.0f} MB ORU^R01 (base64 PDF in OBX-5); "
              f"a {batch.stat().st_size / 1e6:.0f} MB batch of {count:,} ADT^A01")
        print(f"{'input':<8} {'read once s':>11} {'split s':>8} {'records':>8}  split + publish (confirmed)")
        for label, path in (("single", single), ("batch", batch)):
            split_seconds, records = split_only(path)
            figures = []
            for url in brokers:
                prefix = f"bench-{uuid.uuid4().hex[:6]}."
                seconds, published = await publish(url, path, prefix, project)
                scheme = url.split(":")[0]
                figures.append(f"{scheme}: {seconds:.1f} s ({published / seconds:,.0f} msg/s)")
            print(f"{label:<8} {read_once(path):>11.2f} {split_seconds:>8.2f} {records:>8,}  {'; '.join(figures)}")
        baselines = [f"{url.split(':')[0]}: {await raw_publish_rate(url):,.0f} msg/s" for url in brokers]
        print(f"baseline, bare confirmed publishes of 20,000 ADT bodies (256 in flight): {'; '.join(baselines)}")


if __name__ == "__main__":
    asyncio.run(main())
