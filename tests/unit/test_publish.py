"""Publishing: the Publisher (split, confirm, dead-letter what cannot be framed, stop and resume) and
the ``publish`` command around it (summary, --from), on the embedded broker."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from middleware.broker import Broker, make_broker
from middleware.deadletter import DeadLetter
from middleware.ingest.ledger import Ledger
from middleware.ingest.publisher import Published, Publisher, publish_files
from middleware.project import load_project

REPO = Path(__file__).resolve().parents[2]
GARBAGE = b"THIS IS NOT HL7\r"


def adt(n: int) -> bytes:
    return (f"MSH|^~\\&|EHR|GHH|ADT|GHH|20260101120000||ADT^A01|MSG{n}|P|2.5\r"
            f"EVN|A01|20260101120000\rPID|1||{n}^^^GHH^MR||DOE^JOHN||19800101|M\rPV1|1|I\r").encode()


def batch(path: Path, count: int, *, preamble: bytes = b"") -> Path:
    path.write_bytes(b"FHS|^~\\&|EHR\rBHS|^~\\&|EHR||||||||B-7\r" + preamble
                     + b"".join(adt(n) for n in range(1, count + 1)) + f"BTS|{count}\rFTS|1\r".encode())
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The shipped project with only its adt-inbound route (what these tests publish to)."""
    folder = tmp_path / "project"
    for name in ("config", "connectors", "schemas"):
        shutil.copytree(REPO / name, folder / name)
    shutil.copytree(REPO / "routes" / "_fragments", folder / "routes" / "_fragments")  # adt-inbound includes one
    shutil.copy(REPO / "routes" / "adt-inbound.yaml", folder / "routes")
    return folder


@pytest.fixture
def env(tmp_path: Path, project: Path) -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith("MIDDLEWARE_")}
    return {**values, "MIDDLEWARE_BROKER_URL": f"filesystem://{tmp_path}/broker", "AUDIT_LOG": str(tmp_path / "a.log"),
            "MW_TEST_PROJECT": str(project)}


def middleware(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "middleware", *args, "--project", env["MW_TEST_PROJECT"]],
                          capture_output=True, text=True, timeout=120, env=env)


async def drain(url: str, queue: str) -> list[tuple[object, bytes, dict[str, object]]]:
    """(batch position, body, headers) of every message on ``queue``, taken off it."""
    broker = make_broker(url)
    await broker.connect()
    found = []
    while (message := await broker.get(queue)) is not None:
        found.append((message.headers.get("x-mw-batch-position"), message.body, message.headers))
        await message.ack()
    await broker.close()
    return found


def test_publish_prints_a_line_per_message_and_a_summary(env: dict[str, str], tmp_path: Path) -> None:
    path = batch(tmp_path / "adt-batch.hl7", 5, preamble=GARBAGE)
    result = middleware(env, "publish", str(path), "--queue", "ehr.adt")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()  # stdout is not a terminal: every record gets its line
    assert [line.split()[1] for line in lines] == [f"{path}#{n}" for n in range(1, 7)]
    assert "dead-lettered: lines before the first MSH" in lines[0]
    [summary] = [line for line in result.stderr.splitlines() if line.startswith("published")]
    assert summary.startswith("published 5 message(s) from 1 file(s) to ehr.adt, 1 dead-lettered at framing, in ")
    url = env["MIDDLEWARE_BROKER_URL"]
    queued = asyncio.run(drain(url, "ehr.adt"))
    assert [(position, body) for position, body, _ in queued] == [(n + 1, adt(n)) for n in range(1, 6)]
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()  # a file's id is its SHA-256
    assert all(h["x-mw-batch-id"] == digest and h["x-mw-batch-sender-id"] == "B-7"
               and h["x-mw-source-file"] == path.name and h["x-mw-ingest"] == "publish" for _, _, h in queued)
    assert (f"{path}: 6 records, 5 published, 1 dead-lettered; control total: BTS-1 declares 5 message(s), "
            "the batch holds 6") in result.stderr.splitlines()  # the unframed preamble is a record too
    [(position, body, headers)] = asyncio.run(drain(url, "adt-inbound.dlq"))
    assert (position, body) == (1, GARBAGE)
    assert headers["x-mw-stage"] == "parse" and headers["x-mw-error-class"] == "FramingError"
    assert headers["x-mw-replay-queue"] == "ehr.adt" and headers["x-mw-correlation-id"] == lines[0].split()[0]


def test_publish_from_resumes_a_batch_at_a_position(env: dict[str, str], tmp_path: Path) -> None:
    path = batch(tmp_path / "adt-batch.hl7", 10)
    result = middleware(env, "publish", str(path), "--queue", "ehr.adt", "--from", "7")
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines()] == [f"{path}#{n}" for n in range(7, 11)]
    assert "published 4 message(s)" in result.stderr
    queued = asyncio.run(drain(env["MIDDLEWARE_BROKER_URL"], "ehr.adt"))
    assert [(position, body) for position, body, _ in queued] == [(n, adt(n)) for n in range(7, 11)]


def test_publish_with_json_prints_one_object_per_message(env: dict[str, str], tmp_path: Path) -> None:
    path = batch(tmp_path / "adt-batch.hl7", 3)
    result = middleware(env, "publish", str(path), "--queue", "ehr.adt", "--json")
    assert result.returncode == 0, result.stderr
    import json

    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["position"], r["queue"], r["dead_lettered"]) for r in rows] == [(n, "ehr.adt", False) for n in (1, 2, 3)]


@pytest.fixture
async def publisher(tmp_path: Path, project: Path) -> Publisher:
    url = f"filesystem://{tmp_path}/broker"
    loaded = load_project(project, {"MIDDLEWARE_BROKER_URL": url})
    broker: Broker = make_broker(url)
    await broker.connect()
    publisher = Publisher(broker, loaded.routes["adt-inbound"], loaded.settings, window=8)
    await publisher.declare()
    return publisher


async def test_a_stopped_stream_says_where_to_resume_and_resuming_there_loses_nothing(
        publisher: Publisher, tmp_path: Path) -> None:
    """Stop part way with publishes in flight: everything before ``resume_from`` is confirmed and
    nothing from it on was taken; publishing again from there completes the batch exactly."""
    path = batch(tmp_path / "adt-batch.hl7", 40)
    stop = asyncio.Event()
    seen: list[Published] = []

    def count(item: Published) -> None:
        seen.append(item)
        if len(seen) == 13:
            stop.set()

    with path.open("rb") as stream:
        first = await publisher.publish_stream(stream, source="test", name=path.name, stop=stop, on_published=count)
    assert first.resume_from is not None and first.published == len(seen) == first.resume_from - 1
    assert [item.position for item in seen] == list(range(1, first.resume_from))
    with path.open("rb") as stream:
        rest = await publisher.publish_stream(stream, source="test", name=path.name, start=first.resume_from)
    assert rest.complete and rest.skipped == first.resume_from - 1 and rest.published == 40 - first.published
    await publisher.broker.close()
    queued = await drain(f"filesystem://{tmp_path}/broker", "ehr.adt")
    assert [position for position, _, _ in queued] == list(range(1, 41))


async def test_a_single_message_is_published_byte_for_byte(publisher: Publisher, tmp_path: Path) -> None:
    raw = adt(1).replace(b"\r", b"\r\n")  # not normalised: the route worker gets what the sender sent
    path = tmp_path / "one.hl7"
    path.write_bytes(raw)
    with path.open("rb") as stream:
        result = await publisher.publish_stream(stream, source="test", name=path.name)
    assert result.complete and result.published == 1 and not result.batch
    await publisher.broker.close()
    [(position, body, headers)] = await drain(f"filesystem://{tmp_path}/broker", "ehr.adt")
    assert (position, body, headers.get("x-mw-source-file")) == (None, raw, None)


async def test_a_record_that_cannot_be_framed_is_dead_lettered_with_its_reason(publisher: Publisher,
                                                                              tmp_path: Path) -> None:
    path = batch(tmp_path / "b.hl7", 1, preamble=GARBAGE)
    with path.open("rb") as stream:
        result = await publisher.publish_stream(stream, source="test", name=path.name)
    assert (result.published, result.dead_lettered) == (1, 1)
    message = await publisher.broker.get("adt-inbound.dlq")
    assert message is not None
    letter = DeadLetter.from_message(message)
    assert letter.body == GARBAGE and letter.stage == "parse" and "before the first MSH" in letter.error
    await message.ack()
    await publisher.broker.close()


def run_on_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run ``middleware`` with stdout and stderr on a pseudo-terminal, as a person at a shell does."""
    import pty

    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "middleware", *args, "--project", env["MW_TEST_PROJECT"]],
                               stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                               env={**env, "TERM": "xterm-256color", "COLUMNS": "160"})
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    return process.wait(60), output.decode(errors="replace")


def test_on_a_terminal_a_batch_shows_a_progress_bar_instead_of_a_line_per_message(
        env: dict[str, str], tmp_path: Path) -> None:
    path = batch(tmp_path / "adt-batch.hl7", 300)
    code, output = run_on_a_terminal(env, "publish", str(path), "--queue", "ehr.adt")
    assert code == 0, output
    assert "msg/s" in output and "adt-batch.hl7" in output  # the bar: file, messages, rate
    assert f"{path}#1" not in output  # no line per message
    assert "published 300 message(s) from 1 file(s) to ehr.adt, 0 dead-lettered at framing" in output
    code, output = run_on_a_terminal(env, "publish", str(path), "--queue", "ehr.adt", "--from", "299", "--verbose")
    assert code == 0, output
    assert f"{path}#299" in output and f"{path}#300" in output


def test_when_piped_there_is_no_progress_bar(env: dict[str, str], tmp_path: Path) -> None:
    path = batch(tmp_path / "adt-batch.hl7", 300)
    result = middleware(env, "publish", str(path), "--queue", "ehr.adt")
    assert result.returncode == 0, result.stderr
    assert "msg/s" not in result.stderr and "\x1b[" not in result.stderr + result.stdout
    assert len(result.stdout.splitlines()) == 300


async def test_one_message_api_for_gateways_sets_source_and_correlation_id(publisher: Publisher,
                                                                           tmp_path: Path) -> None:
    """What a gateway (MLLP, HTTP) calls: one message published as is, or dead-lettered with its reason."""
    from middleware.errors import ParseError

    cid = await publisher.publish(adt(1), source="mllp:adt", correlation_id="MSG1", headers={"x-extra": 1})
    assert cid == "MSG1"
    generated = await publisher.dead_letter(b"\x0bnot hl7", ParseError("no MSH segment"), source="mllp:adt")
    message = await publisher.broker.get("ehr.adt")
    assert message is not None and message.body == adt(1) and message.correlation_id == "MSG1"
    received_at = message.headers.pop("x-mw-received-at")  # when it came in (message age, the journal)
    traceparent = str(message.headers.pop("traceparent"))  # a W3C trace starts here when the caller sent none
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", traceparent)
    assert message.headers == {"x-mw-ingest": "mllp:adt", "x-extra": 1} and abs(float(received_at) - time.time()) < 60
    assert message.content_type == "x-application/hl7-v2+er7" and message.message_id
    await message.ack()
    letter_message = await publisher.broker.get("adt-inbound.dlq")
    assert letter_message is not None
    letter = DeadLetter.from_message(letter_message)
    assert (letter.body, letter.stage, letter.error, letter.correlation_id) == (
        b"\x0bnot hl7", "parse", "no MSH segment", generated)
    assert letter.replay_queue == "ehr.adt" and letter_message.headers["x-mw-ingest"] == "mllp:adt"
    await letter_message.ack()
    await publisher.broker.close()


def test_the_same_file_again_is_reported_and_not_republished_unless_forced(env: dict[str, str],
                                                                         tmp_path: Path) -> None:
    path = batch(tmp_path / "adt-batch.hl7", 3)
    assert middleware(env, "publish", str(path), "--queue", "ehr.adt").returncode == 0
    again = middleware(env, "publish", str(path), "--queue", "ehr.adt")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "" and "published 0 message(s)" in again.stderr
    assert f"{path}: already published to this route at " in again.stderr and "--force" in again.stderr
    url = env["MIDDLEWARE_BROKER_URL"]
    assert [position for position, _, _ in asyncio.run(drain(url, "ehr.adt"))] == [1, 2, 3]  # once
    forced = middleware(env, "publish", str(path), "--queue", "ehr.adt", "--force")
    assert forced.returncode == 0 and "published 3 message(s)" in forced.stderr
    assert [position for position, _, _ in asyncio.run(drain(url, "ehr.adt"))] == [1, 2, 3]


def test_a_different_file_is_not_a_duplicate(env: dict[str, str], tmp_path: Path) -> None:
    assert middleware(env, "publish", str(batch(tmp_path / "a.hl7", 3)), "--queue", "ehr.adt").returncode == 0
    other = middleware(env, "publish", str(batch(tmp_path / "b.hl7", 4)), "--queue", "ehr.adt")
    assert "published 4 message(s)" in other.stderr


async def test_a_file_cut_short_resumes_after_its_checkpoint(publisher: Publisher, tmp_path: Path) -> None:
    """Stopped part way (as a crash would, minus the in-flight window): the ledger's checkpoint holds
    the last confirmed position and the next publish of the same file starts after it, by itself."""
    path = batch(tmp_path / "adt-batch.hl7", 40)
    ledger = Ledger(tmp_path / "var")
    stop = asyncio.Event()
    seen: list[int | None] = []

    def count(_: Path, item: Published) -> None:
        seen.append(item.position)
        if len(seen) == 17:
            stop.set()

    [first] = await publish_files(publisher, [path], stop=stop, on_published=count, ledger=ledger)
    assert first.result.resume_from is not None and first.digest is not None
    assert ledger.checkpoint("adt-inbound", first.digest).position == first.result.resume_from - 1 == len(seen)
    assert ledger.finished("adt-inbound", first.digest) is None
    [rest] = await publish_files(publisher, [path], ledger=ledger)
    assert rest.resumed_from == first.result.resume_from and rest.result.complete
    assert rest.result.published == 40 - len(seen)
    finished = ledger.finished("adt-inbound", first.digest)
    assert finished is not None and finished.file == path.name
    assert not ledger.checkpoint("adt-inbound", first.digest).path.exists()
    [again] = await publish_files(publisher, [path], ledger=ledger)
    assert again.duplicate == finished and again.result.published == 0
    await publisher.broker.close()
    queued = await drain(f"filesystem://{tmp_path}/broker", "ehr.adt")
    assert [position for position, _, _ in queued] == list(range(1, 41))
