"""`middleware demo` on the embedded broker, as a new user runs it: a separate process, no RabbitMQ."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_every_sample_to_its_outcome_and_exits_zero(tmp_path: Path) -> None:
    for folder in ("config", "routes", "connectors", "schemas", "samples"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDDLEWARE_")}  # the embedded default
    result = subprocess.run([sys.executable, "-m", "middleware", "demo", "--json", "--project", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["idle"] and report["broker"] == f"filesystem://{tmp_path / 'var' / 'demo' / 'broker'}"
    rows = {row["route"]: row for row in report["routes"]}
    counts = {name: (r["published"], r["received"], r["filtered"], r["events"], r["delivered"], r["dead_lettered"])
              for name, r in rows.items()}
    assert counts == {
        "adt-inbound": (9, 9, 0, 8, 16, 1),        # 8 ADT samples x 2 connectors; the malformed one dead-letters
        "fhir-inbound": (6, 6, 0, 5, 10, 1),       # Patient, Appointment, ServiceRequest, 2 Observations, 1 broken
        "orders-inbound": (3, 3, 1, 2, 4, 0),      # the order cancel is filtered
        "results-inbound": (4, 4, 0, 3, 6, 1),     # 1 ORU + a batch of 3 whose 2nd message is broken
        "scheduling-inbound": (1, 1, 0, 1, 2, 0),
    }
    assert rows["adt-inbound"]["dead_letters_waiting"] == 1
    outputs = {o["connector"]: o for o in report["outputs"]}
    assert outputs["bed-board"]["events"] == 8 and outputs["case-management"]["events"] == 8
    archive = tmp_path / "var" / "demo" / "out" / "event-archive.jsonl"
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert sorted(e["type"] for e in lines) == sorted(["order.placed.v1"] * 3 + ["result.reported.v1"] * 5
                                                      + ["appointment.booked.v1"] * 2 + ["patient.registered.v1"])
    assert "Müller" not in result.stderr  # no PHI in logs
