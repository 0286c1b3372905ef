"""`middleware dlq ...` on the real RabbitMQ: dead letters made by the engine, inspected and acted on by the CLI."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import getpass
import json
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from middleware.broker import naming
from middleware.broker.base import Broker, OutgoingMessage
from middleware.deadletter import DeadLetter, letter_id
from middleware.engine import Engine
from middleware.project import Project

from ..conftest import Sink
from .conftest import REPO

pytestmark = pytest.mark.rabbitmq
SAMPLES = REPO / "samples" / "adt-inbound"
MALFORMED = SAMPLES / "malformed-no-msh.hl7"
Cli = Callable[..., subprocess.CompletedProcess[str]]


def dlq_name(project: Project, route: str = "adt-inbound") -> str:
    return naming.dead_letter_queue(route, project.settings.queue_prefix)


async def run(cli: Cli, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The CLI in a thread, so the engine in this event loop keeps working meanwhile."""
    return await asyncio.to_thread(cli, *args, check=check)


async def publish(cli: Cli, path: Path) -> str:
    result = await run(cli, "publish", str(path), "--queue", "ehr.adt")
    [line] = result.stdout.splitlines()
    return line.split()[0]


async def wait_depth(broker: Broker, queue: str, expected: int, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (depth := (await broker.queue_info(queue)).messages) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{queue} holds {depth}, want {expected}")
        await asyncio.sleep(0.1)


async def drain(broker: Broker, queue: str) -> list[tuple[str, DeadLetter]]:
    """Every dead letter in ``queue``, in order, as (id, letter); acked."""
    letters = []
    while (message := await broker.get(queue)) is not None:
        letters.append((letter_id(message), DeadLetter.from_message(message)))
        await message.ack()
    return letters


async def listed(cli: Cli, *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((await run(cli, "dlq", "list", "--json", *args)).stdout)
    return rows


async def parse_and_deliver_dead_letters(cli: Cli, broker: Broker, project: Project, sink: Sink) -> tuple[str, str]:
    """One parse-stage and one deliver-stage dead letter in adt-inbound's queue; their correlation ids."""
    parse_cid = await publish(cli, MALFORMED)
    await wait_depth(broker, dlq_name(project), 1)
    sink.script = [400]
    deliver_cid = await publish(cli, SAMPLES / "a04-register.hl7")
    await wait_depth(broker, dlq_name(project), 2)
    return parse_cid, deliver_cid


async def test_list_and_show_filter_mask_and_leave_the_queue_as_it_was(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, sink: Sink) -> None:
    parse_cid, deliver_cid = await parse_and_deliver_dead_letters(cli, broker, rabbit_project, sink)
    rows = await listed(cli)
    assert [(r["stage"], r["correlation_id"]) for r in rows] == [("parse", parse_cid), ("deliver", deliver_cid)]
    assert rows[1]["connector"] == "case-management" and rows[1]["error_class"] == "DeliveryError"
    assert rows[0]["replay_queue"] == rabbit_project.settings.queue_prefix + "ehr.adt"
    table = (await run(cli, "dlq", "list")).stdout
    assert "parse" in table and "deliver" in table and rows[0]["id"] in table
    assert "MRN-0000" not in table and "forgot" not in table  # never the body
    # filters
    assert [r["stage"] for r in await listed(cli, "--stage", "parse")] == ["parse"]
    assert [r["stage"] for r in await listed(cli, "--route", "adt-inbound", "--error", "400")] == ["deliver"]
    assert [r["correlation_id"] for r in await listed(cli, "--correlation-id", deliver_cid)] == [deliver_cid]
    assert await listed(cli, "--route", "orders-inbound") == []
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    assert await listed(cli, "--since", future) == []
    assert len(await listed(cli, "--since", "2000-01-01")) == 2
    assert [r["stage"] for r in await listed(cli, "--limit", "1")] == ["parse"]
    # show: masked unless --reveal
    masked = (await run(cli, "dlq", "show", rows[0]["id"])).stdout
    size = MALFORMED.stat().st_size
    assert f"<{size} bytes, masked: use --reveal>" in masked and "MRN-0000" not in masked
    assert "stage:" in masked and "ParseError" in masked
    revealed = (await run(cli, "dlq", "show", rows[0]["id"], "--reveal")).stdout
    assert "PID|1||MRN-0000^^^GHH^MR" in revealed.splitlines()
    shown = json.loads((await run(cli, "dlq", "show", rows[1]["id"], "--json")).stdout)
    assert shown["headers"]["x-mw-stage"] == "deliver" and "body_base64" not in shown
    missing = await run(cli, "dlq", "show", "no-such-id", check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")
    # nothing moved: same depth, same order, same content
    await wait_depth(broker, dlq_name(rabbit_project), 2)
    letters = await drain(broker, dlq_name(rabbit_project))
    assert [i for i, _ in letters] == [r["id"] for r in rows]
    assert letters[0][1].body == MALFORMED.read_bytes()


async def test_replay_of_a_deliver_dead_letter_reaches_the_fixed_sink(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, sink: Sink) -> None:
    sink.script = [400]
    correlation_id = await publish(cli, SAMPLES / "a04-register.hl7")
    await wait_depth(broker, dlq_name(rabbit_project), 1)
    assert len(sink.requests) == 1
    sink.script = []  # the sink is fixed: 200 from now on
    dry = await run(cli, "dlq", "replay", "--all", "--stage", "deliver", "--dry-run")
    assert "would replay 1" in dry.stdout
    await asyncio.sleep(0.3)
    assert len(sink.requests) == 1 and (await broker.queue_info(dlq_name(rabbit_project))).messages == 1
    result = await run(cli, "dlq", "replay", "--all", "--stage", "deliver", "--json")
    [row] = json.loads(result.stdout)
    assert row["to"] == naming.delivery_queue("adt-inbound", "case-management", rabbit_project.settings.queue_prefix)
    assert row["replay_count"] == 1 and row["correlation_id"] == correlation_id
    await sink.wait_for(2)
    (first_headers, first), (headers, body) = sink.requests
    assert body == first and headers["Idempotency-Key"] == first_headers["Idempotency-Key"]
    assert headers["X-Correlation-ID"] == correlation_id
    await asyncio.sleep(0.3)
    assert (await broker.queue_info(dlq_name(rabbit_project))).messages == 0


async def test_replay_of_a_parse_dead_letter_goes_back_inbound_and_dead_letters_again(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, sink: Sink) -> None:
    correlation_id = await publish(cli, MALFORMED)
    await wait_depth(broker, dlq_name(rabbit_project), 1)
    [row] = await listed(cli)
    replayed = (await run(cli, "dlq", "replay", row["id"])).stdout
    assert f"replayed {row['id']} (adt-inbound/parse) -> {rabbit_project.settings.queue_prefix}ehr.adt" in replayed
    await wait_depth(broker, dlq_name(rabbit_project), 1)  # still malformed: back in the dead-letter queue
    [(_, letter)] = await drain(broker, dlq_name(rabbit_project))
    assert letter.stage == "parse" and letter.body == MALFORMED.read_bytes()
    assert letter.headers["x-mw-replay-count"] == 1
    assert letter.headers["x-mw-replayed-from"] == dlq_name(rabbit_project)
    assert letter.correlation_id == correlation_id and letter.message_id == row["id"]
    assert sink.requests == []


async def test_purge_by_stage_removes_only_those(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, sink: Sink) -> None:
    await parse_and_deliver_dead_letters(cli, broker, rabbit_project, sink)
    assert (await run(cli, "dlq", "purge", "--yes", check=False)).returncode == 1  # neither filters nor --all
    result = json.loads((await run(cli, "dlq", "purge", "--stage", "parse", "--yes", "--json")).stdout)
    assert result["purged"]["adt-inbound"] == 1 and result["total"] == 1
    assert [r["stage"] for r in await listed(cli)] == ["deliver"]
    assert "purged 1" in (await run(cli, "dlq", "purge", "--all", "--yes")).stdout
    assert (await broker.queue_info(dlq_name(rabbit_project))).messages == 0


async def test_export_writes_the_exact_bytes_and_leaves_the_queue(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, sink: Sink, tmp_path: Path) -> None:
    await parse_and_deliver_dead_letters(cli, broker, rabbit_project, sink)
    out = tmp_path / "dead-letters.jsonl"
    await run(cli, "dlq", "export", "--out", str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["stage"] for r in records] == ["parse", "deliver"]
    assert base64.b64decode(records[0]["body_base64"]) == MALFORMED.read_bytes()
    assert records[0]["body_text"] == MALFORMED.read_bytes().decode()
    assert json.loads(base64.b64decode(records[1]["body_base64"]))["type"] == "patient.registered.v1"
    assert records[1]["headers"]["x-mw-connector"] == "case-management"
    await wait_depth(broker, dlq_name(rabbit_project), 2)
    letters = await drain(broker, dlq_name(rabbit_project))
    assert [i for i, _ in letters] == [r["id"] for r in records]
    assert [base64.b64decode(r["body_base64"]) for r in records] == [letter.body for _, letter in letters]


async def test_dlq_actions_are_audited_exports_are_private_and_urls_masked_on_rabbitmq(
        engine: Engine, broker: Broker, rabbit_project: Project, cli: Cli, sink: Sink, tmp_path: Path) -> None:
    await parse_and_deliver_dead_letters(cli, broker, rabbit_project, sink)
    raw = "POST https://svc:p/a#s?w@sink.example/in?token=t0k3n answered HTTP 400"  # an older, unmasked reason
    replay_to = naming.delivery_queue("adt-inbound", "case-management", rabbit_project.settings.queue_prefix)
    await broker.publish(OutgoingMessage(body=b"{}", message_id="older-1", headers={
        "x-mw-route": "adt-inbound", "x-mw-stage": "deliver", "x-mw-error-class": "DeliveryError", "x-mw-error": raw,
        "x-mw-replay-queue": replay_to}), queue=dlq_name(rabbit_project))
    await wait_depth(broker, dlq_name(rabbit_project), 3)
    parse_row, deliver_row, older = await listed(cli)
    shown = (await run(cli, "dlq", "show", older["id"])).stdout
    assert "p/a#s?w" not in shown and "t0k3n" not in shown and "https://***@sink.example/in?token=***" in shown
    await run(cli, "dlq", "show", parse_row["id"], "--reveal")
    out = tmp_path / "export.jsonl"
    await run(cli, "dlq", "export", "--stage", "deliver", "--out", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and "t0k3n" not in out.read_text()
    again = await run(cli, "dlq", "export", "--out", str(out), check=False)
    assert again.returncode == 1 and again.stderr.startswith(f"error: cannot write {out}: it exists")
    target = tmp_path / "precious.txt"
    target.write_text("untouched")
    (tmp_path / "link.jsonl").symlink_to(target)
    linked = await run(cli, "dlq", "export", "--out", str(tmp_path / "link.jsonl"), "--force", check=False)
    assert linked.returncode == 1 and target.read_text() == "untouched"
    await run(cli, "dlq", "replay", deliver_row["id"])
    await run(cli, "dlq", "purge", "--stage", "parse", "--yes")
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(r["command"], r["ids"]) for r in records] == [
        ("dlq show --reveal", [parse_row["id"]]),
        ("dlq export", [deliver_row["id"], older["id"]]),
        ("dlq replay", [deliver_row["id"]]),
        ("dlq purge", [parse_row["id"]]),
    ]
    assert all(r["operator"] == getpass.getuser() and r["ts"].endswith("Z") for r in records)
    assert stat.S_IMODE((tmp_path / "audit.log").stat().st_mode) == 0o600
