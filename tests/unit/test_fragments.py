"""Fragments (routes/_fragments/<name>.yaml): maps and deliveries written once, included by name; problems
reported at the including line with the fragment's file:line; fragments are not routes."""

from __future__ import annotations

from pathlib import Path

import pytest

from middleware.project import load_project
from tests.project_copy import REPO, copy_project, edit, line_of, problems

FRAGMENT = "routes/_fragments/patient-demographics.yaml"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path)


def test_the_shipped_adt_route_includes_the_demographics_fragment() -> None:
    route = load_project(REPO, {}).routes["adt-inbound"]
    registered = next(r for r in route.events if r.type == "patient.registered")
    admitted = next(r for r in route.events if r.type == "patient.admitted")
    targets = [f.target for f in registered.fields]
    assert targets[0] == "patient.mrn" and "patient.phone" in targets and len(targets) == 14
    assert [f.target for f in admitted.fields][:14] == targets
    assert "encounter.attending_doctor" in [f.target for f in admitted.fields]


def test_keys_beside_include_win_over_the_fragments(project: Path) -> None:
    edit(project / "routes" / "adt-inbound.yaml", "    map: {include: patient-demographics}\n",
         "    map: {include: patient-demographics, patient.phone: PID-14.1}\n")
    route = load_project(project, {}).routes["adt-inbound"]
    registered = next(r for r in route.events if r.type == "patient.registered")
    phone = next(f for f in registered.fields if f.target == "patient.phone")
    assert phone.source == "PID-14.1" and len(registered.fields) == 14


def test_a_problem_inside_a_fragment_is_reported_at_the_including_line_and_the_fragments(project: Path) -> None:
    fragment = project / FRAGMENT
    edit(fragment, "patient.name.middle: PID-5.3", "patient.name.middle: PID5.3")
    route = project / "routes" / "adt-inbound.yaml"
    found = problems(project)
    including = [line_of(route, "include: patient-demographics"), line_of(route, "{include: patient-demographics}")]
    including.append(line_of(route, "{include: patient-demographics}", including[-1] + 1))
    origin = f"(from {FRAGMENT}:{line_of(fragment, 'PID5.3')})"
    assert len(found) == 3
    for text, line in zip(sorted(found, key=lambda p: int(p.split(":")[1])), including, strict=True):
        assert text.startswith(f"routes/adt-inbound.yaml:{line}: ") and "PID5.3" in text and text.endswith(origin)


def test_an_unknown_fragment_is_reported_at_the_include_with_a_suggestion(project: Path) -> None:
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "include: patient-demographics   #", "include: patient-demographic   #")
    assert problems(project) == [f"routes/adt-inbound.yaml:{line_of(route, 'patient-demographic   #')}: no fragment "
                                 "'patient-demographic' in routes/_fragments/ (did you mean 'patient-demographics'?)"]


def test_deliveries_from_a_fragment(project: Path) -> None:
    (project / "routes" / "_fragments" / "ward-systems.yaml").write_text(
        "deliver:\n  - to: case-management\n  - to: bed-board\n    retry: {attempts: 3}\n")
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "  - to: case-management\n  - to: bed-board\n    retry: {attempts: 8}\n",
         "  - include: ward-systems\n  - to: event-archive\n")
    loaded = load_project(project, {}).routes["adt-inbound"]
    assert [d.connector for d in loaded.deliver] == ["case-management", "bed-board", "event-archive"]
    assert loaded.deliver[1].retry is not None and loaded.deliver[1].retry.attempts == 3

    edit(project / "routes" / "_fragments" / "ward-systems.yaml", "to: bed-board", "to: bed-bord")
    assert problems(project) == [f"routes/adt-inbound.yaml:{line_of(route, 'include: ward-systems')}: no connector "
                                 "'bed-bord' in connectors/ (did you mean 'bed-board'?) "
                                 "(from routes/_fragments/ward-systems.yaml:3)"]


def test_wrong_kind_two_fragments_with_one_target_and_broken_fragments(project: Path) -> None:
    folder = project / "routes" / "_fragments"
    (folder / "names.yaml").write_text("map:\n  patient.name.family: PID-5.1\n")
    route = project / "routes" / "adt-inbound.yaml"
    edit(route, "include: patient-demographics   #", "include: [patient-demographics, names]   #")
    line = line_of(route, "include: [patient-demographics, names]")
    assert problems(project) == [f"routes/adt-inbound.yaml:{line}: target 'patient.name.family' is in two included "
                                 f"fragments ({FRAGMENT}:5 and routes/_fragments/names.yaml:2)"]

    edit(route, "include: [patient-demographics, names]   #", "include: patient-demographics   #")
    edit(route, "  - to: case-management\n", "  - include: names\n")
    assert problems(project) == [f"routes/adt-inbound.yaml:{line_of(route, 'include: names')}: fragment 'names' "
                                 "(routes/_fragments/names.yaml) holds map:, not deliver:"]

    edit(route, "  - include: names\n", "  - to: case-management\n")
    (folder / "names.yaml").write_text("map:\n  include: other\n")
    (folder / "both.yaml").write_text("map: {a: PID-1}\ndeliver: [{to: bed-board}]\n")
    (folder / "broken.yaml").write_text("map:\n  a: PID-1\n   b: PID-2\n")
    found = problems(project)
    assert "routes/_fragments/both.yaml:1: a fragment holds exactly one of map: or deliver:" in found
    assert "routes/_fragments/names.yaml:2: a fragment cannot include another fragment" in found
    assert any(p.startswith("routes/_fragments/broken.yaml:3: invalid YAML at column 4") for p in found)
    assert len(found) == 3  # and no "missing key: route" for any fragment: fragments are not routes
