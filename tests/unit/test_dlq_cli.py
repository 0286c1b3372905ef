"""`middleware dlq ...` on the embedded broker, as an operator runs it after `middleware demo`: separate processes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from middleware.broker import OutgoingMessage, make_broker
from middleware.broker.base import IncomingMessage
from middleware.cli.dlq import render_body
from middleware.deadletter import browse, dead_letter_body, letter_id, replay_message

REPO = Path(__file__).resolve().parents[2]
MALFORMED = (REPO / "samples" / "adt-inbound" / "malformed-no-msh.hl7").read_bytes()


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copied project on which `middleware demo` left its dead letters (adt-, fhir- and results-inbound)."""
    root = tmp_path_factory.mktemp("project")
    for folder in ("config", "routes", "connectors", "schemas", "samples"):
        shutil.copytree(REPO / folder, root / folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDDLEWARE_")}
    result = subprocess.run([sys.executable, "-m", "middleware", "demo", "--json", "--project", str(root)],
                            capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def project(demo_project: Path, tmp_path: Path) -> Path:
    """A fresh copy of the demo's project and broker folder for each test."""
    root = tmp_path / "project"
    shutil.copytree(demo_project, root)
    return root


def dlq(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDDLEWARE_")}
    env["MIDDLEWARE_BROKER_URL"] = f"filesystem://{project / 'var' / 'demo' / 'broker'}"
    result = subprocess.run([sys.executable, "-m", "middleware", "dlq", *args, "--project", str(project)],
                            capture_output=True, text=True, timeout=60, env=env, cwd=project, stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def spool(project: Path) -> list[str]:
    return sorted(os.listdir(project / "var" / "demo" / "broker" / "queues"))


def test_list_shows_the_parse_dead_letter_without_body_and_leaves_the_spool_untouched(project: Path) -> None:
    before = spool(project)
    rows = json.loads(dlq(project, "list", "--route", "adt-inbound", "--json").stdout)
    assert [(r["route"], r["stage"], r["error_class"], r["queue"]) for r in rows] == [
        ("adt-inbound", "parse", "ParseError", "adt-inbound.dlq")]
    assert rows[0]["replay_queue"] == "ehr.adt" and rows[0]["bytes"] == len(MALFORMED)
    table = dlq(project, "list").stdout
    assert rows[0]["id"] in table and "results-inbound" in table and "parse" in table
    assert "MRN-0000" not in table and "forgot" not in table
    assert spool(project) == before  # same files, same names: order and content unchanged
    assert json.loads(dlq(project, "list", "--stage", "deliver", "--json").stdout) == []
    assert len(json.loads(dlq(project, "list", "--error", "msh", "--json").stdout)) == 2


def test_show_masks_the_body_unless_reveal(project: Path) -> None:
    [row] = json.loads(dlq(project, "list", "--route", "adt-inbound", "--json").stdout)
    masked = dlq(project, "show", row["id"][:8]).stdout
    assert f"<{len(MALFORMED)} bytes, masked: use --reveal>" in masked and "MRN-0000" not in masked
    assert "x-mw-replay-queue: ehr.adt" in masked
    revealed = dlq(project, "show", row["id"], "--reveal").stdout
    assert "PID|1||MRN-0000^^^GHH^MR" in revealed.splitlines()
    shown = json.loads(dlq(project, "show", row["id"], "--reveal", "--json").stdout)
    assert base64.b64decode(shown["body_base64"]) == MALFORMED
    missing = dlq(project, "show", "no-such-id", check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: no dead letter with id")


def test_replay_sends_the_body_back_to_its_inbound_queue(project: Path) -> None:
    [row] = json.loads(dlq(project, "list", "--route", "adt-inbound", "--json").stdout)
    assert dlq(project, "replay", check=False).returncode == 1  # neither ids nor --all
    dry = dlq(project, "replay", "--all", "--route", "adt-inbound", "--dry-run").stdout
    assert "would replay" in dry and len(json.loads(dlq(project, "list", "--json").stdout)) == 3
    out = dlq(project, "replay", row["id"]).stdout
    assert f"replayed {row['id']} (adt-inbound/parse) -> ehr.adt" in out
    assert [r["route"] for r in json.loads(dlq(project, "list", "--json").stdout)] == ["fhir-inbound",
                                                                                      "results-inbound"]
    [name] = [n for n in spool(project) if n.endswith(".ehr.adt.msg")]
    payload = json.loads((project / "var" / "demo" / "broker" / "queues" / name).read_bytes())
    headers = payload["headers"]
    assert headers["x-mw-replay-count"] == 1 and headers["x-mw-replayed-from"] == "adt-inbound.dlq"
    assert not any(h in headers for h in ("x-mw-stage", "x-mw-error", "x-mw-replay-queue", "x-delivery-count"))
    assert payload["properties"]["correlation_id"] == row["correlation_id"]
    assert payload["properties"]["message_id"] == row["id"]


def test_purge_needs_confirmation_and_removes_only_what_filters_select(project: Path) -> None:
    refused = dlq(project, "purge", "--all", check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ")
    assert dlq(project, "purge", "--yes", check=False).returncode == 1  # no filter and no --all
    result = json.loads(dlq(project, "purge", "--route", "results-inbound", "--stage", "parse", "--yes",
                            "--json").stdout)
    assert result == {"purged": {"results-inbound": 1}, "total": 1}
    assert [r["route"] for r in json.loads(dlq(project, "list", "--json").stdout)] == ["adt-inbound",
                                                                                      "fhir-inbound"]
    assert "purged 2" in dlq(project, "purge", "--all", "--yes").stdout
    assert json.loads(dlq(project, "list", "--json").stdout) == []


def test_export_writes_exact_bytes_and_keeps_the_dead_letters_unless_remove(project: Path, tmp_path: Path) -> None:
    before = spool(project)
    out = tmp_path / "dead.jsonl"
    dlq(project, "export", "--route", "adt-inbound", "--out", str(out))
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert base64.b64decode(record["body_base64"]) == MALFORMED and record["body_text"] == MALFORMED.decode()
    assert record["headers"]["x-mw-stage"] == "parse"
    assert spool(project) == before
    dlq(project, "export", "--stage", "parse", "--remove", "--out", str(out))
    assert len(out.read_text().splitlines()) == 3
    assert json.loads(dlq(project, "list", "--json").stdout) == []


def test_bad_arguments_fail_with_one_line(project: Path) -> None:
    for args in (("list", "--route", "nope"), ("list", "--since", "yesterday")):
        result = dlq(project, *args, check=False)
        assert result.returncode == 1 and result.stderr.startswith("error: ")
        assert len(result.stderr.strip().splitlines()) == 1


async def test_browse_then_release_keeps_order_and_headers_on_the_spool(tmp_path: Path) -> None:
    broker = make_broker(f"filesystem://{tmp_path / 'broker'}")
    await broker.connect()
    await broker.declare_queue("r.dlq", kind="dead-letter")
    for n in range(3):
        await broker.publish(dead_letter_body(f"body {n}".encode(), route="r", stage="parse", error=ValueError(n),
                                              replay_queue="in", correlation_id=f"c{n}"), queue="r.dlq")
    held = await browse(broker, "r.dlq", 1)
    assert [h.letter.correlation_id for h in held.matched] == ["c0"]
    await held.release()
    await broker.close()
    broker = make_broker(f"filesystem://{tmp_path / 'broker'}")
    await broker.connect()
    seen: list[IncomingMessage] = []
    while (message := await broker.get("r.dlq")) is not None:
        seen.append(message)
        await message.ack()
    await broker.close()
    assert [m.body for m in seen] == [b"body 0", b"body 1", b"body 2"]
    assert all("x-delivery-count" not in m.headers for m in seen)


def test_replay_message_drops_reasons_and_counts_replays() -> None:
    class Fake(IncomingMessage):
        def __init__(self, headers: dict[str, object]) -> None:
            self.body, self.headers, self.correlation_id = b"\x00MSH", dict(headers), "cid"
            self.message_id, self.content_type = None, None

    letter = dead_letter_body(b"\x00MSH", route="r", stage="deliver", error=RuntimeError("x"), replay_queue="q",
                              correlation_id="cid", headers={"x-mw-source-file": "f.hl7", "x-mw-replay-count": 2})
    message = Fake({**letter.headers, "x-delivery-count": 4})
    out = replay_message(message, "r.dlq")
    assert out.body == b"\x00MSH" and out.correlation_id == "cid"
    assert out.headers == {"x-mw-source-file": "f.hl7", "x-mw-replay-count": 3, "x-mw-replayed-from": "r.dlq"}
    assert letter_id(message) == letter_id(Fake(letter.headers)) and len(letter_id(message)) == 16
    assert isinstance(letter, OutgoingMessage)


def test_render_body_puts_segments_on_lines_and_escapes_binary() -> None:
    assert render_body(b"MSH|^~\\&|A\rPID|1\r\n") == "MSH|^~\\&|A\nPID|1\n"
    assert render_body(b"\x0bok\xff\x1c") == "\\x0bok\\xff\\x1c"
