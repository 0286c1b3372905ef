"""The ingest ledger's durability: checkpoints fdatasync-ed at their interval and when closed, ledger
lines and the names of new files synced, and a checkpoint read back after a close."""

from __future__ import annotations

from pathlib import Path

from middleware.ingest.ledger import Checkpoint, Ledger


def test_a_checkpoint_is_synced_at_most_once_per_interval_and_when_closed(tmp_path: Path) -> None:
    point = Checkpoint(tmp_path / "checkpoints" / "route.abc", sync_interval=3600)
    for position in range(1, 1001):
        point.advance(position)
    assert point.syncs == 1  # the first write; the rest wait for the interval
    point.close()
    assert point.syncs == 2  # what was written since is synced before the descriptor goes
    assert int(point.path.read_bytes()) == 1000


def test_a_checkpoint_with_no_interval_is_synced_after_every_confirm(tmp_path: Path) -> None:
    point = Checkpoint(tmp_path / "route.abc", sync_interval=0)
    for position in range(1, 11):
        point.advance(position)
    assert point.syncs == 10
    point.advance(5)  # not ahead of what is confirmed: nothing written
    point.close()
    assert point.syncs == 10


def test_the_ledger_resumes_from_a_closed_checkpoint_and_forgets_a_removed_one(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "var")
    point = ledger.checkpoint("adt-inbound", "sha256:abc")
    point.advance(42)
    point.close()
    assert ledger.checkpoint("adt-inbound", "sha256:abc").position == 42
    point.remove()
    assert ledger.checkpoint("adt-inbound", "sha256:abc").position == 0
    ledger.record("adt-inbound", "sha256:abc", "f.hl7", records=42, published=42, dead_lettered=0, problems=[])
    finished = ledger.finished("adt-inbound", "sha256:abc")
    assert finished is not None and finished.records == 42
