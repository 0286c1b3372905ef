"""Unit tests for the watched folder gateway: ``ingest.folder[]`` settings and validate findings, the
registry building it, when a file counts as complete, and claiming (lock + link) against a rival."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from middleware.broker import make_broker
from middleware.cli.status import Report, render
from middleware.errors import ConfigError
from middleware.ingest import FolderListener, GatewayContext, make_gateway
from middleware.ingest.folder import FolderGateway, folder_status
from middleware.project import Project, load_project
from tests.project_copy import copy_project

ENV = {"HTTP_INGEST_TOKEN": "t", "MIDDLEWARE_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/"}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path)


def add_folder(project: Path, entry: str) -> None:
    config = project / "config" / "middleware.yaml"
    text = config.read_text()
    assert "\ningest:\n" in text
    config.write_text(text.replace("\ningest:\n", "\ningest:\n  folder:\n" + entry, 1))


def load(project: Path, **env: str) -> Project:
    return load_project(project, {**ENV, **env})


def test_a_folder_entry_is_read_with_its_folders_anchored_to_the_project(project: Path) -> None:
    add_folder(project, "    - {name: drops, path: inbox/adt, queue: ehr.adt, pattern: '*.hl7', min_age: 3}\n"
                        "    - {path: /srv/in, route: adt-inbound, complete: marker, done: archive}\n")
    listeners = load(project, MIDDLEWARE_INGEST_LEDGER=str(project / "ledger")).settings.ingest["folder"]
    first, second = listeners
    assert isinstance(first, FolderListener)
    assert (first.name, first.queue, first.pattern, first.min_age) == ("drops", "ehr.adt", "*.hl7", 3)
    assert first.path == str(project / "inbox" / "adt")
    assert (first.done, first.failed) == (str(project / "inbox/adt/done"), str(project / "inbox/adt/failed"))
    assert first.ledger == str(project / "ledger")
    assert (second.name, second.path, second.route, second.complete) == ("folder-2", "/srv/in", "adt-inbound", "marker")
    assert second.done == str(project / "archive")
    assert load(project).settings.ingest["folder"][0].ledger == str(project / "var")


@pytest.mark.parametrize(("entry", "finding"), [
    ("    - {path: in, queue: no.such.queue}\n", "ingest.folder folder-1: no route consumes queue 'no.such.queue'"),
    ("    - {path: in, route: no-such-route}\n", "ingest.folder folder-1: no route named 'no-such-route'"),
    ("    - {path: in}\n", "ingest"),  # neither queue nor route
    ("    - {path: in, route: adt-inbound, queue: ehr.adt}\n", "ingest"),  # both
    ("    - {path: in, route: adt-inbound, complete: soon}\n", "soon"),
    ("    - {path: in, route: adt-inbound, poll_interval: 0}\n", "poll_interval"),
])
def test_a_folder_entry_that_cannot_work_is_a_finding_at_its_line(project: Path, entry: str, finding: str) -> None:
    add_folder(project, entry)
    with pytest.raises(ConfigError) as raised:
        load(project)
    messages = [f"{p.file}:{p.line}: {p.message}" for p in raised.value.problems]
    assert any(m.startswith("config/middleware.yaml:") and finding in m for m in messages), messages


def gateway_on(project: Path, inbox: Path, **options: object) -> FolderGateway:
    add_folder(project, f"    - {{path: {inbox}, route: adt-inbound}}\n")
    loaded = load(project)
    listener = FolderListener(name="drops", path=str(inbox), route="adt-inbound", ledger=str(inbox.parent / "l"),
                              **options)  # type: ignore[arg-type]
    context = GatewayContext(make_broker(loaded.settings.broker_url), loaded.settings, loaded.routes)
    gateway = make_gateway("folder", listener, context)  # through the registry, as the engine does
    assert isinstance(gateway, FolderGateway)
    assert gateway.route.name == "adt-inbound"
    for folder in (gateway.inbox, gateway.processing, gateway.done, gateway.failed):
        folder.mkdir(parents=True, exist_ok=True)
    return gateway


def test_a_file_is_complete_only_once_its_size_is_unchanged_for_min_age(project: Path, tmp_path: Path) -> None:
    gateway = gateway_on(project, tmp_path / "in", min_age=0.4, pattern="*.hl7")
    growing = gateway.inbox / "a.hl7"
    growing.write_bytes(b"MSH|1")
    (gateway.inbox / "other.txt").write_bytes(b"x")  # not the pattern
    (gateway.inbox / ".hidden.hl7").write_bytes(b"x")  # being written under a dot name
    assert gateway._ready() == []
    time.sleep(0.25)
    with growing.open("ab") as out:
        out.write(b"|2")  # the size changed: the clock starts again
    assert gateway._ready() == []
    time.sleep(0.25)
    assert gateway._ready() == []  # 0.25 s since the change < min_age
    time.sleep(0.2)
    assert gateway._ready() == [growing]


def test_marker_mode_needs_the_done_file(project: Path, tmp_path: Path) -> None:
    gateway = gateway_on(project, tmp_path / "in", complete="marker", min_age=0.0)
    (gateway.inbox / "a.hl7").write_bytes(b"MSH|1")
    assert gateway._ready() == []
    (gateway.inbox / "a.hl7.done").write_bytes(b"")
    assert gateway._ready() == [gateway.inbox / "a.hl7"]


def test_a_claim_fails_for_the_loser_and_never_replaces_a_file_in_processing(project: Path, tmp_path: Path) -> None:
    gateway = gateway_on(project, tmp_path / "in")
    path = gateway.inbox / "a.hl7"
    path.write_bytes(b"first")
    rival = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(rival, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another engine is claiming it
        assert gateway._claim(path, claimed=False) is None
        assert path.exists()
    finally:
        os.close(rival)
    (gateway.processing / "a.hl7").write_bytes(b"older file of the same name")
    assert gateway._claim(path, claimed=False) is None  # the link fails: nothing is replaced
    assert (gateway.processing / "a.hl7").read_bytes() == b"older file of the same name"
    (gateway.processing / "a.hl7").unlink()
    taken = gateway._claim(path, claimed=False)
    assert taken is not None
    fd, target = taken
    try:
        assert target == gateway.processing / "a.hl7" and target.read_bytes() == b"first" and not path.exists()
        # while the claimer holds it, nobody can take it over as an orphan
        assert gateway._claim(target, claimed=True) is None
    finally:
        os.close(fd)
    orphan = gateway._claim(target, claimed=True)  # its claimer is gone: any engine resumes it
    assert orphan is not None
    os.close(orphan[0])


def test_a_file_gone_before_the_claim_is_skipped(project: Path, tmp_path: Path) -> None:
    gateway = gateway_on(project, tmp_path / "in")
    assert gateway._claim(gateway.inbox / "gone.hl7", claimed=False) is None


def test_status_counts_a_folders_files_by_state(project: Path, tmp_path: Path) -> None:
    gateway = gateway_on(project, tmp_path / "in", pattern="*.hl7")
    for name in ("a.hl7", "b.hl7", "c.txt", ".d.hl7"):
        (gateway.inbox / name).write_bytes(b"x")
    (gateway.processing / "e.hl7").write_bytes(b"x")
    for name, dead in (("f.hl7", 0), ("g.hl7", 2)):
        (gateway.done / name).write_bytes(b"x")
        (gateway.done / (name + ".report.json")).write_bytes(orjson.dumps({"dead_lettered": dead}))
    (gateway.failed / "h.hl7.report.json").write_bytes(b"{}")
    counts = folder_status(gateway.listener)
    assert counts == {"folder": "drops", "path": str(gateway.inbox), "waiting": 2, "in_progress": 1, "done": 2,
                      "with_dead_letters": 1, "failed": 1}
    report = Report("filesystem://var/broker", [], None, None, None, folders=[counts])
    assert report.as_json()["folders"] == [counts]
    console = Console(record=True, width=200)
    render(report, console)
    text = console.export_text()
    assert "watched folders" in text
    assert "│ drops  │       2 │           1 │    2 │                 1 │      1 │" in text
