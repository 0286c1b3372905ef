"""The journal's part of ``middleware status``: per route SLA state, feed silence, last received and
the oldest message not yet finished, which fills the "oldest" column where the broker cannot tell
(RabbitMQ). Reads the journal (middleware/journal/query.py); nothing when it is off or not written yet."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from middleware.journal import JournalError, SlaState, format_age, open_store, sla_state
from middleware.journal.config import ERROR_RATE_WINDOW
from middleware.project import Project

FROM_JOURNAL = "oldest from the journal where the broker cannot tell: the oldest message not yet finished there"


@dataclass
class JournalView:
    """What status shows from the journal; ``unavailable`` says why there is nothing."""

    states: list[SlaState] = field(default_factory=list)
    unavailable: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"available": self.unavailable is None, "reason": self.unavailable,
                "routes": [s.to_dict() for s in self.states]}


def journal_view(project: Project, report: Any, now: float | None = None) -> JournalView:
    """SLA state of every route; fills ``oldest_age_seconds`` of the queues of status's ``report`` that
    the broker left unknown (and says so in its note)."""
    settings = project.settings.journal
    if not settings.enabled:
        return JournalView(unavailable="the journal is off (journal.enabled: false)")
    try:
        store = open_store(settings.url, create=False)
    except JournalError as exc:
        return JournalView(unavailable=str(exc))
    try:
        now = time.time() if now is None else now
        states = [sla_state(store, route, now) for route in project.routes.values()]
    except Exception as exc:  # a database that went away: status still shows the queues
        return JournalView(unavailable=f"cannot read the journal: {type(exc).__name__}")
    finally:
        store.close()
    by_route = {s.route: s for s in states}
    if report.oldest_age_note:
        report.oldest_age_note = f"{report.oldest_age_note}; {FROM_JOURNAL}"
    for route in report.routes:
        state = by_route.get(route.route)
        if state is None:
            continue
        for queue in route.queues:
            key = "inbound" if queue.role == "inbound" else queue.connector if queue.role == "delivery" else None
            if key and queue.declared and queue.oldest_age_seconds is None:
                queue.oldest_age_seconds = state.oldest_pending.get(key)
    return JournalView(states)


def render_sla(view: JournalView, console: Console, now: float | None = None) -> None:
    """The "SLA and feeds" table."""
    if view.unavailable:
        console.print(f"SLA and feeds: n/a — {escape(view.unavailable)}")
        return
    now = time.time() if now is None else now
    table = Table(title=f"SLA and feeds (journal; error rate over {format_age(ERROR_RATE_WINDOW)})")
    for column in ("route", "sla", "state", "last received", "feed", "oldest waiting", "error rate"):
        table.add_column(column, justify="left" if column in ("route", "sla", "state", "feed") else "right")
    for state in view.states:
        sla = state.sla
        limits = ", ".join(f"{name} {value}" for name, value in (
            ("deliver", format_age(sla.deliver_within) if sla and sla.deliver_within is not None else None),
            ("silent", format_age(sla.silent_after) if sla and sla.silent_after is not None else None),
            ("errors", f"{sla.max_error_rate:.2%}" if sla and sla.max_error_rate is not None else None)) if value)
        ages = state.oldest_pending
        worst = max(ages.values()) if ages else None
        ago = f"{format_age(now - state.last_received)} ago" if state.last_received else "never"
        feed = "SILENT" if state.silent else ("ok" if state.silent is False else "-")
        table.add_row(escape(state.route), escape(limits or "-"),
                      state.state.upper() + (f" ({', '.join(state.breaches)})" if state.breaches else ""),
                      ago, feed, format_age(worst), "-" if state.error_rate is None else f"{state.error_rate:.2%}")
    console.print(table)
