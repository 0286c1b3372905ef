"""Durations in YAML: seconds, or a number with a unit; ``forever`` where a limit can be switched off."""

from __future__ import annotations

import pytest

from middleware.durations import format_duration, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [
    (30, 30.0), (0.5, 0.5), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("24h", 86400.0), ("7d", 604800.0),
    ("1.5h", 5400.0), ("forever", None),
])
def test_durations_are_read_in_seconds(text: object, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5 minutes", "-3s", -1, "1w", "", True, "forever!"])
def test_anything_else_is_refused(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_durations_are_printed_as_written() -> None:
    assert [format_duration(s) for s in (5, 30, 300, 1800, 86400, 90, 0.5, None)] == \
        ["5s", "30s", "5m", "30m", "1d", "90s", "0.5s", "forever"]
