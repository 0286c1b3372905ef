"""`middleware trace ID`: the path of a message from the journal, as a table or JSON; a one-line
error and exit 1 when nothing is found or there is no journal."""

from __future__ import annotations

import json
import time
from pathlib import Path

from typer.testing import CliRunner

from middleware.cli import app
from middleware.journal import Journal, JournalSettings

REPO = Path(__file__).resolve().parents[2]


async def fill(url: str) -> None:
    journal = Journal(JournalSettings(url=url))
    t0 = time.time() - 5
    common = {"correlation_id": "cid-7", "source": "mllp:ehr-adt"}
    journal.record("adt-inbound", "ingest", "received", at=t0, message_id="m-7", **common)
    journal.record("adt-inbound", "route", "routed", at=t0 + 0.01, message_id="m-7", source_id="MSG00007",
                   event_id="ev-7", event_type="patient.admitted.v1", received_at=t0, **common)
    journal.record("adt-inbound", "deliver", "retry", at=t0 + 0.02, event_id="ev-7", connector="case-management",
                   attempt=1, detail="503", error_class="DeliveryError", correlation_id="cid-7")
    journal.record("adt-inbound", "deliver", "dead_lettered", at=t0 + 1.5, event_id="ev-7",
                   connector="case-management", attempt=2, error_class="DeliveryError", detail="400",
                   correlation_id="cid-7")
    journal.record("adt-inbound", "deliver", "delivered", at=t0 + 0.05, event_id="ev-7", connector="bed-board",
                   attempt=1, correlation_id="cid-7")
    await journal.stop()


def invoke(url: str, *args: str) -> tuple[int, str, str]:
    env = {"MIDDLEWARE_JOURNAL_URL": url, "HTTP_INGEST_TOKEN": "t"}
    result = CliRunner().invoke(app, ["trace", *args, "--project", str(REPO)], env=env)
    return result.exit_code, result.stdout, result.stderr


async def test_trace_shows_the_path_by_msh10_and_as_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    await fill(url)
    code, out, _ = invoke(url, "MSG00007")
    assert code == 0, out
    assert "correlation id cid-7" in out and "MSG00007" in out and "from mllp:ehr-adt" in out
    assert "-> case-management: dead_lettered" in out and "2 attempt(s), 1 retried, DeliveryError" in out
    assert "-> bed-board: delivered" in out and "dead letter: stage deliver, connector case-management" in out
    code, out, _ = invoke(url, "ev-7", "--json")
    [message] = json.loads(out)["messages"]
    assert message["outcome"] == "routed" and message["source_id"] == "MSG00007"
    deliveries = {d["connector"]: d for d in message["events"][0]["deliveries"]}
    assert deliveries["case-management"]["outcome"] == "dead_lettered" and deliveries["bed-board"]["attempts"] == 1


async def test_nothing_found_is_one_line_and_exit_1(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    await fill(url)
    code, _, err = invoke(url, "MSG-NOPE")
    assert code == 1 and err.startswith("error: nothing in the journal for 'MSG-NOPE'") and err.count("\n") == 1


def test_no_journal_yet_is_one_line_and_exit_1(tmp_path: Path) -> None:
    code, _, err = invoke(f"sqlite:///{tmp_path / 'none.db'}", "x")
    assert code == 1 and err.startswith("error: no journal at") and not (tmp_path / "none.db").exists()
