"""W3C Trace Context (``traceparent``) carried through every hop: kept when a message brings one (HTTP
ingest, AMQP headers), created otherwise, a new span id at each hop, sent on every HTTP delivery.

    traceparent = "00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>"
"""

from __future__ import annotations

import random
import re

TRACEPARENT = "traceparent"  # the HTTP header and the AMQP header name
_FORM = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ids = random.Random()  # seeded from os.urandom: ids need uniqueness, not secrecy


def parse(value: object) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a valid ``traceparent`` (bytes or text), else None: version ff,
    all-zero ids and other forms are invalid, as the W3C recommendation says."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    match = _FORM.fullmatch(value.strip().lower()[:55])
    if not match or match.group(1) == "ff" or set(match.group(2)) == {"0"} or set(match.group(3)) == {"0"}:
        return None
    return match.group(2), match.group(3), match.group(4)


def _span_id() -> str:
    return f"{_ids.getrandbits(64) or 1:016x}"


def new_trace_id() -> str:
    return f"{_ids.getrandbits(128) or 1:032x}"


def new() -> str:
    """A traceparent that starts a trace (sampled flag set)."""
    return span_of(new_trace_id())


def span_of(trace_id: str, flags: str = "01") -> str:
    """A traceparent with a new parent id in the trace ``trace_id`` (already checked: no parsing)."""
    return f"00-{trace_id}-{_span_id()}-{flags}"


def child(value: object) -> str:
    """The traceparent of the next hop: the same trace id and flags with a new parent id, or a new
    trace when ``value`` is absent or invalid."""
    found = parse(value)
    if found is None:
        return new()
    return span_of(found[0], found[2])


def trace_id(value: object) -> str | None:
    """The trace id of a valid traceparent."""
    found = parse(value)
    return found[0] if found else None
