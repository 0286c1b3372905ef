"""End to end on the real RabbitMQ: `middleware publish` -> route worker -> delivery -> a real HTTP sink."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from middleware.broker import naming
from middleware.broker.base import Broker
from middleware.deadletter import DeadLetter
from middleware.engine import Engine
from middleware.project import Project

from ..conftest import Sink
from .conftest import REPO

pytestmark = pytest.mark.rabbitmq
SAMPLES = REPO / "samples" / "adt-inbound"
Cli = Callable[..., subprocess.CompletedProcess[str]]


async def dead_letters(broker: Broker, project: Project, expected: int, timeout: float = 20.0) -> list[DeadLetter]:
    """Wait until the adt-inbound dead-letter queue holds ``expected`` messages; return them (acked)."""
    queue = naming.dead_letter_queue("adt-inbound", project.settings.queue_prefix)
    deadline = asyncio.get_running_loop().time() + timeout
    while (await broker.queue_info(queue)).messages < expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"dead-letter queue has {(await broker.queue_info(queue)).messages}, want {expected}")
        await asyncio.sleep(0.1)
    letters = []
    while (message := await broker.get(queue)) is not None:
        letters.append(DeadLetter.from_message(message))
        await message.ack()
    return letters


async def publish(cli: Cli, *files: Path) -> list[str]:
    result = await asyncio.to_thread(cli, "publish", *map(str, files), "--queue", "ehr.adt")
    return [line.split()[0] for line in result.stdout.splitlines()]


async def test_a01_published_with_the_cli_reaches_the_http_sink(engine: Engine, sink: Sink, cli: Cli,
                                                                tmp_path: Path) -> None:
    [correlation_id] = await publish(cli, SAMPLES / "a01-admit.hl7")
    await sink.wait_for(1)
    headers, body = sink.requests[0]
    event = json.loads(body)
    assert headers["Content-Type"] == "application/cloudevents+json"
    assert headers["X-Correlation-ID"] == correlation_id
    assert headers["Idempotency-Key"] == event["id"]
    assert event["type"] == "patient.admitted.v1"
    assert event["correlationid"] == correlation_id
    assert event["subject"] == "Patient/MRN-4711"
    assert event["data"]["encounter"]["location"] == {"point_of_care": "WARD7", "room": "0712", "bed": "B",
                                                      "facility": "GHH"}
    # the file connector got the same event, fsynced as one JSON line
    for _ in range(100):
        if (tmp_path / "bed-board.jsonl").exists():
            break
        await asyncio.sleep(0.05)
    [line] = (tmp_path / "bed-board.jsonl").read_text().splitlines()
    assert json.loads(line) == event


async def test_malformed_message_dead_letters_at_parse_with_original_body(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, sink: Sink) -> None:
    [correlation_id] = await publish(cli, SAMPLES / "malformed-no-msh.hl7")
    [letter] = await dead_letters(broker, rabbit_project, 1)
    assert letter.body == (SAMPLES / "malformed-no-msh.hl7").read_bytes()
    assert letter.stage == "parse"
    assert letter.route == "adt-inbound"
    assert letter.error_class == "ParseError"
    assert "MSH" in letter.error
    assert letter.correlation_id == correlation_id
    assert letter.replay_queue == rabbit_project.settings.queue_prefix + "ehr.adt"
    assert letter.attempts == 1 and letter.first_failure and letter.last_failure
    assert sink.requests == []


async def test_sink_answering_400_dead_letters_at_deliver_without_retry(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, sink: Sink) -> None:
    sink.script = [400]
    [correlation_id] = await publish(cli, SAMPLES / "a04-register.hl7")
    [letter] = await dead_letters(broker, rabbit_project, 1)
    assert len(sink.requests) == 1  # 4xx is not retried
    assert letter.stage == "deliver"
    assert letter.connector == "case-management"
    assert letter.error_class == "DeliveryError"
    assert "400" in letter.error
    assert letter.attempts == 1
    assert letter.correlation_id == correlation_id
    assert letter.body == sink.requests[0][1]  # the event exactly as it was offered to the sink
    assert letter.replay_queue == naming.delivery_queue("adt-inbound", "case-management",
                                                        rabbit_project.settings.queue_prefix)


async def test_sink_answering_503_twice_then_200_receives_the_event_once(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, sink: Sink) -> None:
    sink.script = [503, 503]
    await publish(cli, SAMPLES / "a08-update.hl7")
    await sink.wait_for(3)
    await asyncio.sleep(0.5)
    assert len(sink.requests) == 3
    accepted = [body for _, body in sink.requests[2:]]
    assert len(accepted) == 1
    assert {h["Idempotency-Key"] for h, _ in sink.requests} == {json.loads(accepted[0])["id"]}
    assert engine.metrics.value("middleware_events_delivered", route="adt-inbound", connector="case-management") == 1
    assert engine.metrics.value("middleware_delivery_retries", route="adt-inbound", connector="case-management") == 2
    dlq = naming.dead_letter_queue("adt-inbound", rabbit_project.settings.queue_prefix)
    assert (await broker.queue_info(dlq)).messages == 0


async def test_run_drains_on_sigterm_and_exits_zero(broker: Broker, rabbit_env: dict[str, str], sink: Sink,
                                                    cli: Cli, tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "middleware", "run", "--project", str(REPO)],
                               env=rabbit_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path)
    try:
        await publish(cli, SAMPLES / "a01-admit.hl7")
        await sink.wait_for(1, timeout=30)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(entry["event"] == "engine stopped" for entry in logs)
    routed = [entry for entry in logs if entry["event"] == "routed"]
    assert routed and routed[0]["route"] == "adt-inbound" and routed[0]["correlation_id"]
    # no PHI in logs: the patient's name and birth date never appear
    assert "Müller" not in stderr and "19840312" not in stderr


async def test_run_with_a_taken_listener_port_fails_cleanly(broker: Broker, rabbit_env: dict[str, str],
                                                            tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**rabbit_env, "MLLP_PORT": str(port)}
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "middleware", "run", "--project", str(REPO)],
            env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]  # stderr is JSON lines (--log-format json)
    [line] = [entry["event"] for entry in entries if entry["level"] == "error"]
    assert str(port) in line and "config/middleware.yaml" in line


async def test_batch_file_is_split_and_its_malformed_message_dead_letters_alone(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, sink: Sink, tmp_path: Path) -> None:
    batch = REPO / "samples" / "results-inbound" / "batch-lab-results.hl7"
    result = await asyncio.to_thread(cli, "publish", str(batch), "--queue", "lis.results")
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines] == [f"{batch}#{n}" for n in (1, 2, 3)]
    await sink.wait_for(2)
    await asyncio.sleep(0.3)
    ids = sorted(json.loads(body)["data"]["order"]["filler_id"] for _, body in sink.requests)
    assert ids == ["LAB-78", "LAB-80"]  # messages 1 and 3 went through
    queue = naming.dead_letter_queue("results-inbound", rabbit_project.settings.queue_prefix)
    for _ in range(100):
        if (await broker.queue_info(queue)).messages:
            break
        await asyncio.sleep(0.1)
    message = await broker.get(queue)
    assert message is not None
    letter = DeadLetter.from_message(message)
    await message.ack()
    assert letter.stage == "parse" and letter.route == "results-inbound"
    assert message.headers["x-mw-source-file"] == batch.name and message.headers["x-mw-batch-position"] == 2
    assert message.headers["x-mw-batch-id"] == "sha256:" + hashlib.sha256(batch.read_bytes()).hexdigest()
    assert message.headers["x-mw-batch-sender-id"] == "BATCH-20261124-1"  # BHS-11
    assert letter.correlation_id == lines[1].split()[0]
    assert letter.body.startswith(b"MSH|^~|LIS") and b"DEMO-ORU-B002" in letter.body
