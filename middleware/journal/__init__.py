"""The message journal: one metadata record per hop (never a payload), written off the hot path to
SQLite or PostgreSQL, read by ``middleware trace``, ``middleware status`` and the console.

    journal = open_journal(settings.journal, metrics)   # Journal, or NullJournal when disabled
    await journal.start(); journal.record(route, "route", "routed", correlation_id=..., event_id=...)
    paths = trace(journal.store, "MSG00001")           # middleware.journal.query
"""

from middleware.journal.config import JournalSettings, Sla, format_age
from middleware.journal.query import DeliveryPath, EventPath, MessagePath, SlaState, sla_state, trace
from middleware.journal.records import Hop
from middleware.journal.store import JournalError, SqlStore, open_store
from middleware.journal.writer import NULL_JOURNAL, Journal, NullJournal, open_journal

__all__ = ["NULL_JOURNAL", "DeliveryPath", "EventPath", "Hop", "Journal", "JournalError", "JournalSettings",
           "MessagePath", "NullJournal", "Sla", "SlaState", "SqlStore", "format_age", "open_journal",
           "open_store", "sla_state", "trace"]
