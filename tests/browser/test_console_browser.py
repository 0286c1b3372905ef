"""The console in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
``middleware run`` on RabbitMQ with CONSOLE_TOKEN set; sign in, watch dead letters appear through
htmx's refresh, replay a group after its cause is fixed, see it delivered.

Without Chromium the test skips, except under CI (``CI=true``), where it fails. Screenshots go to
the test's temporary folder, or to ``$CONSOLE_SCREENSHOTS`` (``docs/images`` to refresh the docs).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from middleware import topology
from middleware.broker import OutgoingMessage, make_broker
from middleware.project import load_project
from middleware.topology import Topology

from ..conftest import Sink, under_ci

REPO = Path(__file__).resolve().parents[2]
ADT = REPO / "samples" / "adt-inbound"
TOKEN = "browser-test-console-token"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 40.0  # seconds for the page to show what the engine did (htmx refreshes every 3 s)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(180)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        reason = f"headless browser test needs {', '.join(missing)} (apt-get install -y chromium chromium-driver)"
        if under_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def engine_env(amqp_url: str, queue_prefix: str, sink: Sink, tmp_path: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MIDDLEWARE_")},
            "MIDDLEWARE_BROKER_URL": amqp_url, "MIDDLEWARE_QUEUE_PREFIX": queue_prefix,
            "MIDDLEWARE_JOURNAL_URL": f"sqlite:///{tmp_path / 'journal.db'}",
            "CASE_MANAGEMENT_URL": sink.url, "CDR_URL": sink.url,
            "MLLP_PORT": "0", "HTTP_INGEST_PORT": "0", "HTTP_INGEST_TOKEN": "browser-test-ingest",
            "METRICS_PORT": str(_free_port()), "CONSOLE_TOKEN": TOKEN,
            "BED_BOARD_PATH": str(tmp_path / "bed-board.jsonl"),
            "EVENT_ARCHIVE_PATH": str(tmp_path / "event-archive.jsonl"),
            "AUDIT_LOG": str(tmp_path / "audit.log"), "MIDDLEWARE_INGEST_LEDGER": str(tmp_path / "ingest")}


@pytest.fixture
async def console(engine_env: dict[str, str], tmp_path: Path) -> Any:
    """``middleware run`` in its own process; yields the console's URL; deletes the queues after."""
    log = (tmp_path / "engine.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "middleware", "run", "--project", str(REPO)],
                               env=engine_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{engine_env['METRICS_PORT']}"
    project = load_project(REPO, engine_env)
    try:
        deadline = time.monotonic() + 30
        while b'"engine started"' not in (tmp_path / "engine.log").read_bytes():
            assert process.poll() is None, (tmp_path / "engine.log").read_text()
            assert time.monotonic() < deadline, "the engine did not start within 30 s"
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        client = make_broker(project.settings.broker_url)
        await client.connect()
        await topology.delete(client, Topology.of(project.routes.values(), project.settings.queue_prefix))
        await client.close()


async def _publish(engine_env: dict[str, str], body: bytes) -> None:
    project = load_project(REPO, engine_env)
    client = make_broker(project.settings.broker_url)
    await client.connect()
    queue = Topology.of(project.routes.values(), project.settings.queue_prefix).route("adt-inbound").inbound
    await client.publish(OutgoingMessage(body=body, content_type="x-application/hl7-v2+er7"), queue=queue)
    await client.close()


def _text(driver: Any, css: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(driver.find_element("css selector", css).text)
    except (NoSuchElementException, StaleElementReferenceException):  # htmx swapped it meanwhile
        return ""


async def _until(driver: Any, css: str, wanted: str, timeout: float = WAIT) -> str:
    """Wait (without reloading the page: htmx refreshes it) until ``css``'s text holds ``wanted``."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        text = _text(driver, css)
        if wanted in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{css!r} never showed {wanted!r}; last text: {text!r}")
        await asyncio.sleep(0.3)


async def test_sign_in_see_dead_letters_appear_replay_a_fixed_group_and_see_it_delivered(
        browser: Any, console: str, engine_env: dict[str, str], sink: Sink, shots: Path, tmp_path: Path) -> None:
    driver = browser
    driver.get(f"{console}/routes/adt-inbound")  # not signed in: the login page, which returns here
    assert driver.find_element("id", "token").get_attribute("type") == "password"
    driver.find_element("id", "token").send_keys(TOKEN)
    driver.find_element("id", "operator").send_keys("Browser Test")
    driver.find_element("id", "sign-in").click()
    await _until(driver, "h1", "Route adt-inbound")
    await _until(driver, "#dead-letters", "No dead letters")
    cookie = driver.get_cookie("mw_console")
    assert cookie and cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"

    # a message no parser can read, and an admission the case-management system refuses (HTTP 400)
    sink.script = [400]
    await _publish(engine_env, (ADT / "malformed-no-msh.hl7").read_bytes())
    await _publish(engine_env, (ADT / "a01-admit.hl7").read_bytes())
    groups = await _until(driver, "#groups-table", "DeliveryError")  # appeared through htmx's refresh
    assert "ParseError" in groups
    driver.save_screenshot(str(shots / "console-dead-letters.png"))
    assert b"PID|" not in driver.page_source.encode()  # no body unless revealed

    driver.get(console)
    # 2 dead letters of 2 messages break adt-inbound's sla max_error_rate: said in words, not only in colour
    row = await _until(driver, "#route-adt-inbound", "breach: max_error_rate")
    assert "SLA BREACH" in row
    assert _total(driver, "received") == 2
    delivered_before = _total(driver, "delivered")  # the bed board took the admission; case management did not
    assert "2" in _text(driver, "#route-adt-inbound td.dead-letters") and "adt-inbound" in row
    driver.save_screenshot(str(shots / "console-routes.png"))

    # the partner fixed their endpoint (the sink now answers 200): replay the delivery group
    driver.get(f"{console}/routes/adt-inbound")
    await _until(driver, "#groups-table", "DeliveryError")
    driver.find_element("id", "replay-deliver-DeliveryError").click()
    assert _text(driver, "#replay-count") == "1"
    driver.save_screenshot(str(shots / "console-replay-confirm.png"))
    driver.find_element("id", "confirm-replay").click()
    assert "Replayed 1 dead letter" in _text(driver, "#replayed")
    await sink.wait_for(2)  # the refused attempt, then the replayed one
    await _until(driver, "#dead-letters", "ParseError")
    assert "DeliveryError" not in _text(driver, "#groups-table")

    driver.get(console)
    deadline = time.monotonic() + WAIT
    while _total(driver, "delivered") <= delivered_before:  # htmx refreshes the table
        assert time.monotonic() < deadline, "the delivered count never went up on the routes page"
        time.sleep(0.5)
    driver.save_screenshot(str(shots / "console-after-replay.png"))
    with urllib.request.urlopen(f"{console}/metrics", timeout=10) as response:  # no token: /metrics is open
        exported = response.read().decode()
    assert re.search(r'middleware_queue_messages\{queue="[^"]*adt-inbound\.dlq",role="dead-letter",'
                     r'route="adt-inbound"\} 1\.0', exported)  # the parse dead letter is still there
    audit = (tmp_path / "audit.log").read_text()
    assert '"command": "console replay"' in audit and '"console_user": "Browser Test"' in audit

    # trace search: the admission's path from the journal, the refused attempt and the replayed one
    driver.find_element("id", "nav-trace").click()
    driver.find_element("id", "trace-id").send_keys("DEMO-A01-0001")
    driver.find_element("id", "trace-submit").click()
    trace = await _until(driver, "main", "case-management")
    assert "DeliveryError" in trace and "delivered" in trace
    driver.save_screenshot(str(shots / "console-trace.png"))

    # keyboard: the skip link is the first stop, and every route link can be reached with Tab
    from selenium.webdriver.common.keys import Keys

    driver.get(console)
    driver.find_element("tag name", "body").send_keys(Keys.TAB)
    assert driver.switch_to.active_element.text == "Skip to content"
    for _ in range(12):
        if driver.switch_to.active_element.get_attribute("id") == "route-link-adt-inbound":
            break
        driver.switch_to.active_element.send_keys(Keys.TAB)
    assert driver.switch_to.active_element.get_attribute("id") == "route-link-adt-inbound"
    caption = _text(driver, "#routes-table caption")
    deadline = time.monotonic() + WAIT
    while _text(driver, "#routes-table caption") in ("", caption):  # wait for an htmx refresh
        assert time.monotonic() < deadline, "the routes table was not refreshed"
        time.sleep(0.3)
    time.sleep(0.5)  # htmx restores the focus when the swap settles
    assert driver.switch_to.active_element.get_attribute("id") == "route-link-adt-inbound"  # focus kept
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    await _until(driver, "h1", "Route adt-inbound")


def _total(driver: Any, column: str) -> int:
    """A total of the adt-inbound row (``received`` or ``delivered``), -1 while htmx swaps the table."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        cell = driver.find_element("css selector", f"#route-adt-inbound td.{column}")
        return int(cell.get_attribute("data-total"))
    except (NoSuchElementException, StaleElementReferenceException):
        return -1
