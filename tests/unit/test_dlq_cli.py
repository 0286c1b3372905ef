"""`middleware dlq ...` on the embedded broker, as an operator runs it after `middleware demo`: separate processes."""

from __future__ import annotations

import base64
import datetime as dt
import getpass
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from middleware.broker import OutgoingMessage, make_broker
from middleware.broker.base import IncomingMessage
from middleware.cli.common import fail
from middleware.cli.dlq import render_body
from middleware.deadletter import browse, dead_letter_body, letter_id, replay_message, write_private_file
from middleware.errors import DeliveryError

REPO = Path(__file__).resolve().parents[2]
MALFORMED = (REPO / "samples" / "adt-inbound" / "malformed-no-msh.hl7").read_bytes()


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copied project on which `middleware demo` left its dead letters (one per route with a broken sample)."""
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


def routes_listed(project: Path) -> list[str]:
    """The routes of the dead letters `dlq list` shows, in order (one per route after the demo)."""
    return [r["route"] for r in json.loads(dlq(project, "list", "--json").stdout)]


def dlq(project: Path, *args: str, check: bool = True, operator: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDDLEWARE_")}
    env["MIDDLEWARE_BROKER_URL"] = f"filesystem://{project / 'var' / 'demo' / 'broker'}"
    env.pop("AUDIT_LOG", None)  # the config's default: <project>/var/audit.log
    if operator:
        env["MIDDLEWARE_OPERATOR"] = operator
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
    before = routes_listed(project)
    assert {"adt-inbound", "fhir-inbound", "results-inbound"} <= set(before)
    assert dlq(project, "replay", check=False).returncode == 1  # neither ids nor --all
    dry = dlq(project, "replay", "--all", "--route", "adt-inbound", "--dry-run").stdout
    assert "would replay" in dry and routes_listed(project) == before
    out = dlq(project, "replay", row["id"]).stdout
    assert f"replayed {row['id']} (adt-inbound/parse) -> ehr.adt" in out
    assert routes_listed(project) == [r for r in before if r != "adt-inbound"]
    [name] = [n for n in spool(project) if n.endswith(".ehr.adt.msg")]
    payload = json.loads((project / "var" / "demo" / "broker" / "queues" / name).read_bytes())
    headers = payload["headers"]
    assert headers["x-mw-replay-count"] == 1 and headers["x-mw-replayed-from"] == "adt-inbound.dlq"
    assert not any(h in headers for h in ("x-mw-stage", "x-mw-error", "x-mw-replay-queue", "x-delivery-count"))
    assert payload["properties"]["correlation_id"] == row["correlation_id"]
    assert payload["properties"]["message_id"] == row["id"]


def test_purge_needs_confirmation_and_removes_only_what_filters_select(project: Path) -> None:
    before = routes_listed(project)
    refused = dlq(project, "purge", "--all", check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ")
    assert dlq(project, "purge", "--yes", check=False).returncode == 1  # no filter and no --all
    result = json.loads(dlq(project, "purge", "--route", "results-inbound", "--stage", "parse", "--yes",
                            "--json").stdout)
    assert result == {"purged": {"results-inbound": 1}, "total": 1}
    assert routes_listed(project) == [r for r in before if r != "results-inbound"]
    assert f"purged {len(before) - 1} dead letter(s)" in dlq(project, "purge", "--all", "--yes").stdout
    assert json.loads(dlq(project, "list", "--json").stdout) == []


def test_export_writes_exact_bytes_and_keeps_the_dead_letters_unless_remove(project: Path, tmp_path: Path) -> None:
    before = spool(project)
    listed = json.loads(dlq(project, "list", "--json").stdout)
    parse = [r["route"] for r in listed if r["stage"] == "parse"]
    others = [r for r in listed if r["stage"] != "parse"]
    assert len(parse) >= 2  # the demo leaves parse dead letters on several routes (and maybe others)
    out = tmp_path / "dead.jsonl"
    dlq(project, "export", "--route", "adt-inbound", "--out", str(out))
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert base64.b64decode(record["body_base64"]) == MALFORMED and record["body_text"] == MALFORMED.decode()
    assert record["headers"]["x-mw-stage"] == "parse"
    assert spool(project) == before
    dlq(project, "export", "--stage", "parse", "--remove", "--out", str(out), "--force")
    assert [json.loads(line)["route"] for line in out.read_text().splitlines()] == parse
    assert json.loads(dlq(project, "list", "--json").stdout) == others  # only the parse ones were removed


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
    first_failure = dt.datetime.fromisoformat(str(letter.headers["x-mw-first-failure"])).timestamp()
    assert float(out.headers.pop("x-mw-received-at")) == pytest.approx(first_failure)  # it had none: ages count
    assert out.headers == {"x-mw-source-file": "f.hl7", "x-mw-replay-count": 3, "x-mw-replayed-from": "r.dlq"}
    stamped = replay_message(Fake({**letter.headers, "x-mw-received-at": "1700000000.250000"}), "r.dlq")
    assert stamped.headers["x-mw-received-at"] == "1700000000.250000"  # from the first receipt, kept as it was
    assert letter_id(message) == letter_id(Fake(letter.headers)) and len(letter_id(message)) == 16
    assert isinstance(letter, OutgoingMessage)


def test_render_body_puts_segments_on_lines_and_escapes_binary() -> None:
    assert render_body(b"MSH|^~\\&|A\rPID|1\r\n") == "MSH|^~\\&|A\nPID|1\n"
    assert render_body(b"\x0bok\xff\x1c") == "\\x0bok\\xff\\x1c"


# -- audit log ---------------------------------------------------------------------------------------

def audit(project: Path) -> list[dict[str, Any]]:
    path = project / "var" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_show_reveal_is_audited_before_the_body_is_shown_and_plain_show_is_not(project: Path) -> None:
    [row] = json.loads(dlq(project, "list", "--route", "adt-inbound", "--json").stdout)
    dlq(project, "show", row["id"])
    assert audit(project) == []  # masked: nothing disclosed, nothing recorded
    dlq(project, "show", row["id"][:8], "--reveal", operator="dr.ops")
    [record] = audit(project)
    assert record["command"] == "dlq show --reveal" and record["operator"] == "dr.ops"
    assert record["ids"] == [row["id"]] and record["count"] == 1 and record["routes"] == ["adt-inbound"]
    assert record["os_user"] and dt.datetime.fromisoformat(record["ts"]).tzinfo is not None
    assert stat.S_IMODE((project / "var" / "audit.log").stat().st_mode) == 0o600
    assert "MRN-0000" not in (project / "var" / "audit.log").read_text()  # ids and counts, never a body
    dlq(project, "show", row["id"], "--reveal", "--json")
    assert [r["command"] for r in audit(project)] == ["dlq show --reveal"] * 2  # appended, not rewritten
    assert audit(project)[1]["operator"] == getpass.getuser()  # no MIDDLEWARE_OPERATOR: the OS user


def test_export_replay_and_purge_each_append_who_what_and_which_ids(project: Path, tmp_path: Path) -> None:
    rows = {r["route"]: r for r in json.loads(dlq(project, "list", "--json").stdout)}
    out = tmp_path / "export.jsonl"
    dlq(project, "export", "--route", "fhir-inbound", "--out", str(out), operator="a")
    dlq(project, "export", "--route", "results-inbound", operator="a")  # to stdout: audited all the same
    dlq(project, "replay", "--all", "--route", "adt-inbound", "--dry-run")  # changes nothing: not audited
    dlq(project, "replay", rows["adt-inbound"]["id"], operator="b")
    dlq(project, "purge", "--route", "results-inbound", "--stage", "parse", "--yes", operator="c")
    dlq(project, "purge", "--all", "--yes", operator="d")
    records = audit(project)
    assert [(r["command"], r["operator"], r["ids"], r["count"]) for r in records] == [
        ("dlq export", "a", [rows["fhir-inbound"]["id"]], 1),
        ("dlq export", "a", [rows["results-inbound"]["id"]], 1),
        ("dlq replay", "b", [rows["adt-inbound"]["id"]], 1),
        ("dlq purge", "c", [rows["results-inbound"]["id"]], 1),
        ("dlq purge", "d", [], len(rows) - 2),  # a whole-queue purge: the queues and how many
    ]
    assert records[0]["out"] == str(out) and records[1]["out"] == "stdout"
    assert records[2]["to"] == ["ehr.adt"] and records[3]["routes"] == ["results-inbound"]
    assert records[4]["scope"] == "all" and records[4]["queues"]["fhir-inbound.dlq"] == 1


def test_the_audit_log_path_comes_from_the_config(project: Path, tmp_path: Path) -> None:
    config = project / "config" / "middleware.yaml"
    config.write_text(config.read_text().replace("${AUDIT_LOG:-var/audit.log}", str(tmp_path / "ops" / "dlq.log")))
    [row] = json.loads(dlq(project, "list", "--route", "adt-inbound", "--json").stdout)
    dlq(project, "show", row["id"], "--reveal")
    [record] = [json.loads(line) for line in (tmp_path / "ops" / "dlq.log").read_text().splitlines()]
    assert record["ids"] == [row["id"]] and not (project / "var" / "audit.log").exists()


def test_nothing_is_revealed_or_changed_when_the_audit_log_cannot_be_written(project: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.log"
    elsewhere.write_text("keep\n")
    (project / "var" / "audit.log").symlink_to(elsewhere)  # never written through a link
    [row] = json.loads(dlq(project, "list", "--route", "adt-inbound", "--json").stdout)
    before = spool(project)
    for args in (("show", row["id"], "--reveal"), ("export",), ("replay", row["id"]), ("purge", "--all", "--yes")):
        result = dlq(project, *args, check=False)
        assert result.returncode == 1 and result.stderr.startswith("error: cannot open the audit log"), args
        assert len(result.stderr.strip().splitlines()) == 1 and "MRN-0000" not in result.stdout
    assert spool(project) == before and elsewhere.read_text() == "keep\n"


# -- export files --------------------------------------------------------------------------------------

def test_export_creates_a_0600_file_and_never_overwrites_without_force(project: Path, tmp_path: Path) -> None:
    count = len(routes_listed(project))
    out = tmp_path / "dead.jsonl"
    dlq(project, "export", "--route", "adt-inbound", "--out", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    first = out.read_bytes()
    refused = dlq(project, "export", "--out", str(out), check=False)
    assert refused.returncode == 1 and refused.stderr == f"error: cannot write {out}: it exists (add --force to " \
                                                         "replace it)\n"
    assert out.read_bytes() == first
    out.chmod(0o644)
    dlq(project, "export", "--out", str(out), "--force")
    assert len(out.read_text().splitlines()) == count and stat.S_IMODE(out.stat().st_mode) == 0o600


@pytest.mark.parametrize("force", [False, True])
def test_export_never_follows_a_symbolic_link(project: Path, tmp_path: Path, force: bool) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("do not touch\n")
    target.chmod(0o644)
    link = tmp_path / "dead.jsonl"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "would-be-created.jsonl")
    for out in (link, dangling):
        result = dlq(project, "export", "--out", str(out), *(["--force"] if force else []), check=False)
        assert result.returncode == 1 and result.stderr == f"error: cannot write {out}: it is a symbolic link " \
                                                           "(not followed)\n"
    assert target.read_text() == "do not touch\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert link.is_symlink() and not (tmp_path / "would-be-created.jsonl").exists()
    assert audit(project) == []  # refused before anything was read


def test_write_private_file_refuses_a_link_planted_after_the_check(tmp_path: Path) -> None:
    """The O_EXCL | O_NOFOLLOW open, not only the CLI's early check, keeps a link's target untouched."""
    target = tmp_path / "precious.txt"
    target.write_text("do not touch\n")
    (tmp_path / "out.jsonl").symlink_to(target)
    with pytest.raises(OSError):
        write_private_file(tmp_path / "out.jsonl", b"x")
    write_private_file(tmp_path / "new.jsonl", b"data\n")
    assert (tmp_path / "new.jsonl").read_bytes() == b"data\n" and target.read_text() == "do not touch\n"
    with pytest.raises(FileExistsError):
        write_private_file(tmp_path / "new.jsonl", b"other")
    write_private_file(tmp_path / "new.jsonl", b"other", force=True)
    assert (tmp_path / "new.jsonl").read_bytes() == b"other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "out.jsonl", "precious.txt"]  # no temp left


# -- secrets in dead letters -------------------------------------------------------------------------

def test_dead_letter_error_text_masks_a_password_with_slash_hash_and_question_mark() -> None:
    error = DeliveryError("case-management: POST https://svc:p/a#s?w@sink.example/in?token=t0k failed",
                          retryable=False)
    letter = dead_letter_body(b"x", route="r", stage="deliver", error=error, replay_queue="q", correlation_id=None)
    assert letter.headers["x-mw-error"] == "case-management: POST https://***@sink.example/in?token=*** failed"


async def test_show_and_export_mask_a_password_an_older_dead_letter_still_carries(project: Path,
                                                                                  tmp_path: Path) -> None:
    raw = "POST https://svc:p/a#s?w@sink.example/in?access_token=t0k3n answered HTTP 400"
    broker = make_broker(f"filesystem://{project / 'var' / 'demo' / 'broker'}")
    await broker.connect()
    await broker.publish(OutgoingMessage(body=b"{}", message_id="old-1", headers={
        "x-mw-route": "adt-inbound", "x-mw-stage": "deliver", "x-mw-error-class": "DeliveryError", "x-mw-error": raw,
        "x-mw-replay-queue": "adt-inbound.to.case-management", "x-mw-note": raw}), queue="adt-inbound.dlq")
    await broker.close()
    shown = dlq(project, "show", "old-1").stdout + dlq(project, "show", "old-1", "--json").stdout
    out = tmp_path / "old.jsonl"
    dlq(project, "export", "--route", "adt-inbound", "--out", str(out))
    for text in (shown, out.read_text()):
        assert "p/a#s?w" not in text and "t0k3n" not in text
        assert "https://***@sink.example/in?access_token=***" in text


def test_every_cli_error_line_masks_the_urls_in_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit):
        fail("cannot reach amqp://svc:p/a#s?w@rabbit:5672/ (quoted by a driver)")
    assert capsys.readouterr().err == "error: cannot reach amqp://***@rabbit:5672/ (quoted by a driver)\n"
