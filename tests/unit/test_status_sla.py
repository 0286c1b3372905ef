"""`middleware status` reads the journal: SLA state and silent feeds per route, and the oldest message not
yet finished where the broker cannot tell its age."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from typer.testing import CliRunner

from middleware.cli import app
from middleware.journal import Journal, JournalSettings

REPO = Path(__file__).resolve().parents[2]


async def fill(url: str) -> None:
    journal = Journal(JournalSettings(url=url))
    now = time.time()
    journal.record("adt-inbound", "ingest", "received", at=now - 4000, message_id="m-1", correlation_id="c-1")
    journal.record("adt-inbound", "route", "routed", at=now - 3999, message_id="m-1", correlation_id="c-1",
                   event_id="e-1", event_type="patient.admitted.v1", received_at=now - 4000)
    journal.record("fhir-inbound", "route", "routed", at=now - 5, message_id="m-2", correlation_id="c-2",
                   event_id="e-2", event_type="patient.registered.v1", received_at=now - 6)
    await journal.stop()


def status(tmp_path: Path, *args: str) -> tuple[int, str]:
    env = {"MIDDLEWARE_JOURNAL_URL": f"sqlite:///{tmp_path / 'journal.db'}", "HTTP_INGEST_TOKEN": "t",
           "MIDDLEWARE_BROKER_URL": f"filesystem://{tmp_path / 'broker'}", "METRICS_PORT": "0"}
    result = CliRunner().invoke(app, ["status", *args, "--project", str(REPO)], env=env)
    return result.exit_code, result.stdout


def test_status_flags_a_silent_feed_and_a_late_delivery_from_the_journal(tmp_path: Path) -> None:
    asyncio.run(fill(f"sqlite:///{tmp_path / 'journal.db'}"))
    code, out = status(tmp_path, "--json")
    assert code == 0, out
    sla = json.loads(out)["sla"]
    assert sla["available"]
    states = {r["route"]: r for r in sla["routes"]}
    adt = states["adt-inbound"]  # sla: deliver_within 5m, silent_after 30m
    assert adt["state"] == "breach" and set(adt["breaches"]) == {"silent", "deliver_within"}
    assert adt["oldest_pending_seconds"]["case-management"] > 3900
    assert states["fhir-inbound"]["state"] == "-" and states["fhir-inbound"]["last_received"] is not None
    code, out = status(tmp_path)
    assert code == 0 and "SLA and feeds" in out and "BREACH (silent, deliver_within)" in out and "SILENT" in out


def test_status_without_a_journal_says_so_in_one_line(tmp_path: Path) -> None:
    code, out = status(tmp_path)
    assert code == 0 and "SLA and feeds: n/a — no journal at" in out
    code, out = status(tmp_path, "--json")
    assert json.loads(out)["sla"]["available"] is False
