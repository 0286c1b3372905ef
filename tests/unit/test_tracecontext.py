"""W3C traceparent: valid ones are continued (same trace, new span), invalid or missing ones replaced."""

from __future__ import annotations

from middleware import tracecontext

GIVEN = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_is_continued_with_a_new_span() -> None:
    nxt = tracecontext.child(GIVEN)
    assert tracecontext.trace_id(nxt) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert nxt.endswith("-01") and nxt.split("-")[2] != "00f067aa0ba902b7"
    assert tracecontext.trace_id(tracecontext.child(GIVEN.encode())) == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_invalid_or_missing_traceparents_start_a_new_trace() -> None:
    for bad in (None, "", "garbage", GIVEN.replace("00-", "ff-", 1), "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", 42):
        made = tracecontext.child(bad)
        assert tracecontext.parse(made) is not None and tracecontext.trace_id(made) != tracecontext.trace_id(GIVEN)
    assert tracecontext.parse(tracecontext.new()) is not None
    assert len({tracecontext.new() for _ in range(1000)}) == 1000
