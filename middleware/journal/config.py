"""``journal:`` of config/middleware.yaml and ``sla:`` of a route, as frozen data (durations parsed by
:mod:`middleware.durations`).

Kept free of driver imports: the project loader reads it, the engine opens the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "sqlite:///var/journal.db"


def format_age(seconds: float | None) -> str:
    """``seconds`` for a person: ``850 ms``, ``42.0 s``, ``12m 05s``, ``3h 20m``, ``2d 4h``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


@dataclass(frozen=True)
class JournalSettings:
    """``journal:``: where hop records go (``sqlite:///relative.db``, ``sqlite:////absolute.db``,
    ``postgresql://...``), how long they are kept, and the writer's batching."""

    enabled: bool = True
    url: str = DEFAULT_URL
    retention: float = 7 * 86400.0  # seconds
    batch_size: int = 500  # records per write
    flush_interval: float = 0.5  # seconds between writes when fewer than batch_size wait
    max_queue: int = 50_000  # records waiting in memory; past it new records are dropped (and counted)

    def anchored(self, root: Path) -> JournalSettings:
        """A relative ``sqlite:///`` path resolved against the project folder."""
        prefix = "sqlite:///"
        if self.url.startswith(prefix) and not self.url[len(prefix):].startswith("/"):
            return JournalSettings(**{**self.__dict__, "url": f"sqlite:///{(root / self.url[len(prefix):]).resolve()}"})
        return self


@dataclass(frozen=True)
class Sla:
    """``sla:`` of a route: each limit optional (None: not checked)."""

    deliver_within: float | None = None  # seconds from receipt to delivery
    silent_after: float | None = None  # seconds without a received message before the feed counts as silent
    max_error_rate: float | None = None  # dead letters / received, over ERROR_RATE_WINDOW


ERROR_RATE_WINDOW = 900.0  # seconds: the error rate is taken over the last 15 minutes
