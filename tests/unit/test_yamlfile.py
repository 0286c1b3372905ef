"""YAML loading: line numbers, bounded aliases ("billion laughs"), recursion, deep nesting."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from middleware.project import load_project
from middleware.yamlfile import load_yaml

REPO = Path(__file__).resolve().parents[2]


def alias_bomb(depth: int) -> str:
    """About 1 KB of YAML that expands to 9**(depth+1) strings; line n+1 holds the first alias of level n."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, depth + 1):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_the_aliass_line_quickly_and_in_little_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9))
    assert path.stat().st_size < 1024
    tracemalloc.start()
    started = time.perf_counter()
    try:
        doc = load_yaml(path, "routes/bomb.yaml")
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < 200 * 2**20
    assert doc.data is None
    [problem] = doc.problems
    # the aliases of lines 2-5 add 74,718 nodes; the first *l4 on line 6 adds 66,430 more: past 100,000
    assert (problem.file, problem.line) == ("routes/bomb.yaml", 6)
    assert "aliases expand to more than 100,000 nodes at *l4" in problem.message


def test_aliases_are_charged_their_expanded_size_up_to_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "shared.yaml"
    # *base stands for 7 nodes (the mapping, 3 keys, 3 values); *pair for 1 + 2 * 7 = 15
    path.write_text("base: &base {a: 1, b: 2, c: 3}\n"
                    "pair: &pair [*base, *base]\n"
                    "again: *pair\n")
    assert load_yaml(path, "shared.yaml", max_alias_nodes=7 + 7 + 15).problems == []
    [problem] = load_yaml(path, "shared.yaml", max_alias_nodes=7 + 7 + 14).problems
    assert problem.line == 3 and "*pair" in problem.message


def test_legitimate_anchors_and_merge_keys_keep_working(tmp_path: Path) -> None:
    path = tmp_path / "route.yaml"
    path.write_text("defaults: &defaults\n"
                    "  timeout: 5\n"
                    "  retry: {attempts: 3}\n"
                    "events:\n"
                    "  - map: &patient\n"
                    "      id: PID-3\n"
                    "      name: PID-5\n"
                    "  - map: *patient\n"
                    "    options:\n"
                    "      <<: *defaults\n"
                    "      timeout: 9\n")
    doc = load_yaml(path, "route.yaml")
    assert doc.problems == []
    assert doc.data["events"][1]["map"] == {"id": "PID-3", "name": "PID-5"}
    assert doc.data["events"][1]["options"] == {"timeout": 9, "retry": {"attempts": 3}}
    assert doc.line(("events", 1, "map")) == 8
    assert doc.line(("events", 1, "map", "id")) == 6  # an alias's keys keep the anchor's lines


def test_shipped_route_with_map_alias_loads_and_both_events_share_the_mapping() -> None:
    assert "adt-inbound" in load_project(REPO, {}).routes
    doc = load_yaml(REPO / "routes" / "adt-inbound.yaml", "routes/adt-inbound.yaml")
    assert doc.problems == []
    maps = [e["map"] for e in doc.data["events"]]
    shared = [m for m in maps if sum(other is m for other in maps) > 1]
    assert len(shared) == 2  # `map: *cancellation` is the anchored mapping itself (patient maps: a fragment)


def test_recursive_alias_is_a_problem_not_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("ok: 1\nloop: &loop\n  - a\n  - *loop\n")
    [problem] = load_yaml(path, "loop.yaml").problems
    assert problem.line == 4 and "recursive alias" in problem.message


def test_deep_nesting_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 5000)
    [problem] = load_yaml(path, "deep.yaml").problems
    assert problem.message == "YAML nested too deeply"


PEAK_RSS_WRAPPER = """
import atexit, runpy, sys
peak_file = sys.argv.pop(1)
def write_peak():
    with open("/proc/self/status") as status, open(peak_file, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(write_peak)
runpy.run_module("middleware", run_name="__main__", alter_sys=True)
"""  # runs ``python -m middleware ARGS`` and writes its peak RSS (KiB) to the file named first


@pytest.mark.parametrize("command", ["validate", "test"])
def test_cli_refuses_an_alias_bomb_route_with_file_line_in_bounded_memory(tmp_path: Path, command: str) -> None:
    project = tmp_path / "project"
    for folder in ("config", "routes", "connectors", "schemas", "samples"):
        shutil.copytree(REPO / folder, project / folder)
    (project / "routes" / "bomb.yaml").write_text(alias_bomb(9))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDDLEWARE_")}
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    peak = tmp_path / "peak-rss-kib"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", PEAK_RSS_WRAPPER, str(peak), command, "--project",
                                    str(project)], stdout=stdout, stderr=stderr, env=env, cwd=project)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own CPU time
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 1, err.read_text()
    assert "routes/bomb.yaml:6: aliases expand to more than 100,000 nodes at *l4" in out.read_text() + err.read_text()
    assert usage.ru_utime + usage.ru_stime < 10  # whole CLI run, interpreter start included (was 14 s at depth 7)
    # not wait4's ru_maxrss: Linux carries the parent's peak across fork + exec, so in a full test run it
    # reports pytest's own RSS; VmHWM is the peak of the child's own address space
    assert int(peak.read_text()) < 200 * 1024  # KiB
