"""Every line on stderr goes through our formatter: our loggers, library loggers, warnings,
event-loop errors and uncaught exceptions. Each case runs in its own Python process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from middleware.observe import JsonFormatter, TextFormatter

PROGRAM = """
import asyncio, logging, sys, threading, warnings
from middleware.observe import configure_logging, log_loop_exception

configure_logging("INFO", json_lines=sys.argv[1] == "json")
logging.getLogger("middleware.test").info("ours", extra={"route": "adt-inbound"})
logging.getLogger("middleware.test").debug("below our level")
logging.getLogger("aiormq.connection").info("library info is below WARNING")
try:
    raise ConnectionResetError("peer said Jane Doe")
except ConnectionResetError:
    logging.getLogger("aiormq.connection").exception("Unexpected connection close")
warnings.warn("a deprecation", DeprecationWarning, stacklevel=1)

async def boom() -> None:
    raise ValueError("in a task")

async def main() -> None:
    asyncio.get_running_loop().set_exception_handler(log_loop_exception)
    task = asyncio.ensure_future(boom())
    await asyncio.sleep(0.01)
    del task  # never awaited: the loop reports "Task exception was never retrieved"

asyncio.run(main())
worker = threading.Thread(target=lambda: 1 / 0, name="worker-1")
worker.start()
worker.join()
raise RuntimeError("uncaught, with patient Jane Doe")
"""


def run(log_format: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(PROGRAM), log_format],
                          capture_output=True, text=True, timeout=60)


def by_event(entries: list[dict[str, Any]], text: str) -> dict[str, Any]:
    [entry] = [e for e in entries if text in e["event"]]
    return entry


def test_every_stderr_line_is_json_libraries_warnings_and_tracebacks_included() -> None:
    result = run("json")
    assert result.returncode == 1
    entries = [json.loads(line) for line in result.stderr.splitlines()]  # fails on any line that is not JSON
    assert [e["event"] for e in entries] == [
        "ours", "Unexpected connection close", entries[2]["event"], "Task exception was never retrieved",
        "uncaught exception in a thread", "uncaught exception"]
    assert entries[0] == {**entries[0], "level": "info", "logger": "middleware.test", "route": "adt-inbound"}
    library = by_event(entries, "Unexpected connection close")
    assert library["logger"] == "aiormq.connection" and library["exception"] == "ConnectionResetError"
    assert library["stack"] and library["stack"][-1].endswith("in <module>")
    assert entries[2]["logger"] == "py.warnings" and "a deprecation" in entries[2]["event"]
    task = by_event(entries, "never retrieved")
    assert task["logger"] == "middleware.asyncio" and task["exception"] == "ValueError"
    assert any(frame.endswith("in boom") for frame in task["stack"])
    thread = by_event(entries, "in a thread")
    assert thread["exception"] == "ZeroDivisionError" and thread["thread_name"] == "worker-1"
    uncaught = entries[-1]
    assert uncaught["level"] == "critical" and uncaught["exception"] == "RuntimeError"
    assert "Jane Doe" not in result.stderr  # an exception's message may quote patient data: never logged


def test_text_format_is_for_a_person_and_keeps_the_traceback() -> None:
    result = run("text")
    assert result.returncode == 1
    assert not result.stderr.lstrip().startswith("{")
    assert "INFO middleware.test: ours route=adt-inbound" in result.stderr
    assert "Traceback (most recent call last)" in result.stderr and "RuntimeError" in result.stderr


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_a_record_with_a_newline_in_its_message_is_one_json_line(formatter: Any) -> None:
    import logging

    record = logging.LogRecord("aio_pika", logging.ERROR, __file__, 1, "first\nsecond", (), None)
    line = formatter.format(record)
    if isinstance(formatter, JsonFormatter):
        assert "\n" not in line and json.loads(line)["event"] == "first\nsecond"
    else:
        assert line.endswith("aio_pika: first\nsecond")
