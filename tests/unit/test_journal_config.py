"""journal: in config/middleware.yaml and sla: in a route: loaded as data, mistakes reported at file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from middleware.journal import Sla
from middleware.project import check_project, load_project
from tests.project_copy import copy_project, edit

ENV = {"HTTP_INGEST_TOKEN": "t"}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path)


def test_journal_defaults_to_sqlite_under_the_project_var_folder(project: Path) -> None:
    journal = load_project(project, ENV).settings.journal
    assert journal.enabled and journal.url == f"sqlite:///{(project / 'var' / 'journal.db').resolve()}"
    assert journal.retention == 7 * 86400


def test_journal_url_from_the_environment_and_switching_it_off(project: Path) -> None:
    settings = load_project(project, {**ENV, "MIDDLEWARE_JOURNAL_URL": "postgresql://u@db/j"}).settings
    assert settings.journal.url == "postgresql://u@db/j"
    config = project / "config" / "middleware.yaml"
    edit(config, "  enabled: true\n  url: sqlite", "  enabled: false\n  url: sqlite")
    assert not load_project(project, ENV).settings.journal.enabled


def test_bad_journal_keys_are_reported_at_their_line(project: Path) -> None:
    config = project / "config" / "middleware.yaml"
    line = edit(config, "  retention: 7d", "  retention: a week")
    url_line = edit(config, "  url: sqlite:///var/journal.db", "  url: mysql://db/journal")
    _, problems = check_project(project, ENV)
    found = [str(p) for p in problems]
    assert any(p.startswith(f"config/middleware.yaml:{line}: journal.retention") for p in found), found
    assert any(p.startswith(f"config/middleware.yaml:{url_line}: journal.url") for p in found), found


def test_route_sla_is_compiled_to_seconds(project: Path) -> None:
    route = load_project(project, ENV).routes["adt-inbound"]
    assert route.sla == Sla(deliver_within=300, silent_after=1800, max_error_rate=0.01)


def test_bad_sla_is_reported_at_its_line(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    line = edit(route, "sla: {deliver_within: 5m,", "sla: {deliver_within: soon, within: 1,")
    _, problems = check_project(project, ENV)
    found = [str(p) for p in problems]
    assert any(p.startswith(f"routes/adt-inbound.yaml:{line}:") and "within" in p for p in found), found
    assert any("deliver_within" in p for p in found), found
