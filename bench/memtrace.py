"""Find what grows in a long-running process: tracemalloc snapshots a fixed interval apart, and their diff.

Launch (the engine as bench/pipeline.py --tracemalloc DIR starts it):
  .venv/bin/python bench/memtrace.py record [--interval 60] DIR -- run --project P ...
    runs the ``middleware`` CLI, turns ``tracemalloc`` on after --start-after s (--frames per allocation), dumps
    DIR/snap-NN.pickle every --interval seconds, plus gc object counts by type in DIR/types-NN.txt.
Compare:
  .venv/bin/python bench/memtrace.py diff DIR/snap-01.pickle DIR/snap-05.pickle [--top 25] [--by traceback]
    the allocations that grew most between the two snapshots (size, count), grouped by line or traceback.

tracemalloc slows the process (2-3x CPU): use it to find growth, never for the RSS figure itself.
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
import threading
import time
import tracemalloc
from pathlib import Path


def _record(folder: Path, interval: float, frames: int, start_after: float, argv: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)

    def dump() -> None:
        # Started once the engine runs: CPython 3.11.7 raised SystemError in typing (tuple resize) with
        # tracemalloc on during the CLI's imports, and start-up is not what grows.
        time.sleep(start_after)
        tracemalloc.start(frames)
        n = 0
        while True:
            time.sleep(interval)
            n += 1
            tracemalloc.take_snapshot().dump(str(folder / f"snap-{n:02}.pickle"))
            counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            (folder / f"types-{n:02}.txt").write_text(
                "".join(f"{c:9} {name}\n" for name, c in counts.most_common(60)))

    threading.Thread(target=dump, name="memtrace", daemon=True).start()
    sys.argv = ["middleware", *argv]
    from middleware.cli import main

    main()


def _diff(first: Path, last: Path, top: int, by: str) -> None:
    filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib*")]
    old = tracemalloc.Snapshot.load(str(first)).filter_traces(filters)
    new = tracemalloc.Snapshot.load(str(last)).filter_traces(filters)
    print(f"total traced: {sum(s.size for s in old.statistics('filename')) / 1e6:.1f} MB -> "
          f"{sum(s.size for s in new.statistics('filename')) / 1e6:.1f} MB")
    for stat in new.compare_to(old, by)[:top]:
        print(f"{stat.size_diff / 1024:+9.0f} KiB {stat.count_diff:+8} blocks  (now {stat.size / 1024:.0f} KiB)")
        for line in stat.traceback.format(limit=12 if by == "traceback" else 1):
            print("   ", line)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record")
    record.add_argument("folder", type=Path)
    record.add_argument("--interval", type=float, default=60.0)
    record.add_argument("--frames", type=int, default=12)
    record.add_argument("--start-after", type=float, default=20.0, help="seconds before tracing starts")
    record.add_argument("argv", nargs=argparse.REMAINDER)
    diff = commands.add_parser("diff")
    diff.add_argument("first", type=Path)
    diff.add_argument("last", type=Path)
    diff.add_argument("--top", type=int, default=25)
    diff.add_argument("--by", choices=["lineno", "traceback", "filename"], default="lineno")
    args = parser.parse_args()
    if args.command == "record":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        _record(args.folder, args.interval, args.frames, args.start_after, argv)
    else:
        _diff(args.first, args.last, args.top, args.by)


if __name__ == "__main__":
    main()
