"""Timing helper shared by the CPU benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def rate(fn: Callable[[bytes], object], messages: list[bytes], seconds: float) -> float:
    """Messages per second through ``fn``: the median of 5 rounds of ``seconds / 5`` each."""
    rounds = []
    for _ in range(5):
        done, started = 0, time.perf_counter()
        deadline = started + seconds / 5
        while time.perf_counter() < deadline:
            for raw in messages:
                fn(raw)
            done += len(messages)
        rounds.append(done / (time.perf_counter() - started))
    return statistics.median(rounds)
