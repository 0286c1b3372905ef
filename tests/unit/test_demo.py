"""`middleware demo` as a new user runs it: a separate process, on the embedded broker (no RabbitMQ),
and on the real RabbitMQ when MIDDLEWARE_BROKER_URL is set (masked in its output, cleaned up after)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aio_pika
import aiormq
import pytest

from middleware.cli.demo import demo_topology
from middleware.project import load_project

REPO = Path(__file__).resolve().parents[2]


def copy_project(root: Path) -> Path:
    for folder in ("config", "routes", "connectors", "schemas", "samples"):
        shutil.copytree(REPO / folder, root / folder)
    return root


def test_demo_runs_every_sample_to_its_outcome_and_exits_zero(tmp_path: Path) -> None:
    copy_project(tmp_path)
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
        "eligibility-batch": (12, 11, 0, 11, 11, 0),  # a CSV roster of 12 rows; the 7th does not frame: the
        #                                             publisher dead-letters it (waiting below), no worker sees it
        # a 271 of 6 subscribers/dependents and an 834 of 6 members, one record in each that cannot be framed:
        # the publisher dead-letters it (waiting in the queue below), the worker never receives it
        "eligibility-x12": (6, 5, 0, 5, 5, 0),
        "enrolment-x12": (6, 5, 0, 5, 5, 0),
        "fhir-inbound": (13, 13, 1, 11, 22, 1),    # Patient, Appointment, ServiceRequest, 2 Observations, 1 broken;
        #                                            a transaction Bundle split in 4 (Patient, 2 Observations, an
        #                                            Encounter filtered) and a Bulk NDJSON of 2 Patients + 1 Observation
        "orders-inbound": (3, 3, 1, 2, 4, 0),      # the order cancel is filtered
        "referrals-rest": (3, 3, 0, 2, 2, 1),      # 2 referrals to case-management; the truncated JSON dead-letters
        "results-inbound": (4, 4, 0, 3, 6, 1),     # 1 ORU + a batch of 3 whose 2nd message is broken
        "scheduling-inbound": (1, 1, 0, 1, 2, 0),
    }
    assert rows["adt-inbound"]["dead_letters_waiting"] == 1
    assert rows["eligibility-x12"]["dead_letters_waiting"] == rows["enrolment-x12"]["dead_letters_waiting"] == 1
    assert rows["eligibility-batch"]["dead_letters_waiting"] == 1  # the roster's broken row, dead-lettered alone
    outputs = {o["connector"]: o for o in report["outputs"]}
    assert outputs["bed-board"]["events"] == 8 and outputs["case-management"]["events"] == 10
    archive = tmp_path / "var" / "demo" / "out" / "event-archive.jsonl"
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert sorted(e["type"] for e in lines) == sorted(["order.placed.v1"] * 3 + ["result.reported.v1"] * (5 + 3)
                                                      + ["appointment.booked.v1"] * 2
                                                      + ["patient.registered.v1"] * (1 + 3)
                                                      + ["eligibility.checked.v1"] * (5 + 11)
                                                      + ["coverage.enrolled.v1"] * 5)
    assert "Müller" not in result.stderr  # no PHI in logs


async def absent(url: str, queues: list[str], exchanges: list[str]) -> list[str]:
    """Which of ``queues`` / ``exchanges`` RabbitMQ does NOT have (passive declares: a 404 means absent)."""
    missing = []
    connection = await aio_pika.connect(url)
    try:
        for name, declare in [(q, "queue") for q in queues] + [(e, "exchange") for e in exchanges]:
            channel = await connection.channel()  # a 404 closes the channel
            try:
                if declare == "queue":
                    await channel.declare_queue(name, passive=True)
                else:
                    await channel.get_exchange(name, ensure=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                missing.append(name)
            else:
                await channel.close()
    finally:
        await connection.close()
    return missing


def rabbitmq_names(prefix: str) -> list[str]:
    """Queue and exchange names under ``prefix``, as rabbitmqctl lists them (needs no management plugin)."""
    names = []
    for what in ("list_queues", "list_exchanges"):
        listed = subprocess.run(["rabbitmqctl", "-q", what, "name"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        names += [line.strip() for line in listed.stdout.splitlines() if line.strip().startswith(prefix)]
    return names


@pytest.mark.rabbitmq
async def test_demo_on_rabbitmq_masks_the_broker_password_and_deletes_everything_it_declared(
        tmp_path: Path, amqp_url: str, queue_prefix: str) -> None:
    root = copy_project(tmp_path)
    secret_query = "api_key=Q8vPzT0k3nX"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDDLEWARE_")}
    env.update({"MIDDLEWARE_BROKER_URL": amqp_url, "MIDDLEWARE_QUEUE_PREFIX": queue_prefix,
                "CDR_URL": f"https://cdr.example/events?{secret_query}", "METRICS_PORT": "0", "MLLP_PORT": "0"})
    runs = {}
    for mode in ("json", "text"):
        result = subprocess.run([sys.executable, "-m", "middleware", "demo", *(["--json"] if mode == "json" else []),
                                 "--project", str(root)],
                                capture_output=True, text=True, timeout=180, env=env, cwd=root)
        assert result.returncode == 0, result.stderr
        runs[mode] = result
        for text in (result.stdout, result.stderr):
            assert "guest:guest" not in text and "Q8vPzT0k3nX" not in text
    report = json.loads(runs["json"].stdout)
    assert report["broker"] == "amqp://***@127.0.0.1:5672/"
    assert "amqp://***@127.0.0.1:5672/" in runs["text"].stdout
    assert "https://cdr.example/events?api_key=***" in {o["where"].split()[-1] for o in report["outputs"]}
    prefix = report["queue_prefix"]
    assert prefix.startswith(f"{queue_prefix}demo-")
    rows = {row["route"]: row for row in report["routes"]}
    assert rows["adt-inbound"]["delivered"] == 16 and rows["adt-inbound"]["dead_letters_waiting"] == 1  # it ran
    project = load_project(root, {**env, "MIDDLEWARE_QUEUE_PREFIX": prefix})
    queues, exchanges = demo_topology(project)
    assert sorted(report["removed"]) == sorted(queues + exchanges)
    tiers = sum(len(d.retry.delays) if d.retry else 0 for r in project.routes.values() for d in r.deliver)
    assert len(queues) == 2 * len(project.routes) + sum(len(r.deliver) for r in project.routes.values()) + tiers
    assert sorted(await absent(amqp_url, queues, exchanges)) == sorted(queues + exchanges)
    if shutil.which("rabbitmqctl"):  # also nothing we did not think of, under the test's prefix
        assert rabbitmq_names(queue_prefix) == []
