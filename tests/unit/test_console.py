"""The console on the embedded broker: sign-in (token, bearer, cookie), CSRF, dead-letter groups,
an audited group replay and an audited reveal, served on the /metrics listener."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from middleware import topology
from middleware.broker import make_broker
from middleware.broker.base import Broker, IncomingMessage
from middleware.console import Extras, setup_console
from middleware.console.app import format_age
from middleware.console.data import group_letters
from middleware.deadletter import DeadLetter, Held, dead_letter_body
from middleware.errors import MappingError, ParseError
from middleware.journal import Journal, JournalSettings
from middleware.observe import Metrics, serve_metrics
from middleware.project import Project, load_project
from middleware.topology import RouteTopology

REPO = Path(__file__).resolve().parents[2]
TOKEN = "console-test-token-0123456789"
BODY = b"MSH|^~\\&|EHR|HOSP|MW|HOSP|20260101||ADT^A01|CTRL1|P|2.5\rPID|1||SECRET-MRN-42"


@dataclass
class Served:
    url: str
    project: Project
    broker: Broker
    route: RouteTopology
    audit: Path
    metrics: Metrics


@pytest.fixture
def project(tmp_path: Path) -> Project:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDDLEWARE_")}
    env.update({"MIDDLEWARE_BROKER_URL": f"filesystem://{tmp_path / 'broker'}",
                "AUDIT_LOG": str(tmp_path / "audit.log")})
    return load_project(REPO, env)


async def _serve(project: Project, token: str | None, extras: Extras | None = None) -> tuple[Any, str, Metrics]:
    metrics = Metrics()
    runner = await serve_metrics(metrics, "127.0.0.1", 0,
                                 setup=lambda app: setup_console(app, project, metrics, token=token, extras=extras))
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}", metrics


async def _dead_letter(broker: Broker, route: RouteTopology, error: Exception, body: bytes = BODY,
                       stage: str = "parse", connector: str | None = None) -> None:
    message = dead_letter_body(body, route=route.route, stage=stage, error=error, replay_queue=route.inbound,
                               correlation_id=f"corr-{os.urandom(3).hex()}", connector=connector)
    await broker.publish(message, queue=route.dead_letter)


@pytest.fixture
async def served(project: Project, tmp_path: Path) -> AsyncIterator[Served]:
    broker = make_broker(project.settings.broker_url)
    await broker.connect()
    route = RouteTopology.of(project.routes["adt-inbound"], project.settings.queue_prefix)
    await topology.declare(broker, route, project.settings.delivery_limit)
    await _dead_letter(broker, route, ParseError("no MSH segment"))
    await _dead_letter(broker, route, ParseError("no MSH segment"))
    await _dead_letter(broker, route, MappingError("PID-3 is empty"), stage="map")
    await broker.close()  # the console reads the spool through connections of its own
    runner, url, metrics = await _serve(project, TOKEN)
    client = make_broker(project.settings.broker_url)
    await client.connect()
    yield Served(url, project, client, route, tmp_path / "audit.log", metrics)
    await client.close()
    await runner.cleanup()


async def _get(url: str, **kwargs: Any) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, allow_redirects=False, **kwargs) as response:
        return response.status, await response.text(), response.headers


async def _post(url: str, data: dict[str, str], **kwargs: Any) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, data=data, allow_redirects=False,
                                                                **kwargs) as response:
        return response.status, await response.text(), response.headers


def _bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _sign_in(url: str) -> tuple[dict[str, str], str]:
    """A session cookie header and the session's CSRF token, as a browser gets them."""
    status, _, headers = await _post(f"{url}/login", {"token": TOKEN, "operator": "Dr Ops", "next": "/"})
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert all(flag in cookie for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"))
    session = {"Cookie": cookie.split(";", 1)[0]}
    status, page, _ = await _get(f"{url}/", headers=session)
    assert status == 200
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match
    return session, match.group(1)


def _audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- access -------------------------------------------------------------------------------------------

async def test_without_a_configured_token_the_console_is_off_and_metrics_still_served(project: Project) -> None:
    runner, url, _ = await _serve(project, "")
    try:
        assert (await _get(f"{url}/"))[0] == 404
        assert (await _get(f"{url}/routes/adt-inbound", headers=_bearer("anything")))[0] == 404
        status, text, _ = await _get(f"{url}/metrics")
        assert status == 200 and "middleware_messages_received" in text
    finally:
        await runner.cleanup()


def test_middleware_run_without_console_token_logs_that_the_console_is_off(tmp_path: Path) -> None:
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIDDLEWARE_", "CONSOLE_"))}
    env.update({"METRICS_PORT": str(port), "MLLP_PORT": "0", "HTTP_INGEST_PORT": "0", "HTTP_INGEST_TOKEN": "t"})
    process = subprocess.Popen([sys.executable, "-m", "middleware", "run", "--project", str(tmp_path)], env=env,
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[dict[str, Any]] = []
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(json.loads(line))
            if lines[-1]["event"] == "engine started":
                break
        assert any(entry["event"].startswith("console disabled: set CONSOLE_TOKEN") for entry in lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert b"# TYPE middleware_queue_messages gauge" in response.read()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert refused.value.code == 404
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


async def test_no_token_is_401_with_the_login_page_for_browsers_and_a_challenge_for_others(served: Served) -> None:
    status, page, headers = await _get(f"{served.url}/routes/adt-inbound", headers={"Accept": "text/html"})
    assert status == 401 and 'id="token"' in page and 'value="/routes/adt-inbound"' in page
    assert "adt-inbound.dlq" not in page and "Bearer" in headers["WWW-Authenticate"]
    status, text, headers = await _get(f"{served.url}/")
    assert status == 401 and "token required" in text
    status, _, headers = await _get(f"{served.url}/fragments/routes", headers={"HX-Request": "true"})
    assert status == 401 and headers["HX-Redirect"] == "/login"
    assert (await _get(f"{served.url}/metrics"))[0] == 200  # /metrics needs no token


async def test_a_bad_token_is_refused_by_bearer_and_by_the_login_form(served: Served) -> None:
    assert (await _get(f"{served.url}/", headers=_bearer("wrong")))[0] == 401
    assert (await _get(f"{served.url}/", headers=_bearer(TOKEN + "x")))[0] == 401
    status, page, headers = await _post(f"{served.url}/login", {"token": "wrong", "next": "/"})
    assert status == 401 and "not the console token" in page and "Set-Cookie" not in headers
    assert (await _get(f"{served.url}/", headers={"Cookie": "mw_console=forged"}))[0] == 401


async def test_the_bearer_token_and_the_session_cookie_both_open_the_routes_page(served: Served) -> None:
    status, page, headers = await _get(f"{served.url}/", headers=_bearer())
    assert status == 200 and 'id="routes-table"' in page and "adt-inbound" in page
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and headers["Cache-Control"] == "no-store"
    assert '>Dead letters</th>' in page and 'src="/static/htmx.min.js"' in page
    row = re.search(r'<tr id="route-adt-inbound".*?</tr>', page, re.S)
    assert row and 'data-count="3"' in row.group()  # the DLQ depth, written as a number
    session, _ = await _sign_in(served.url)
    status, page, _ = await _get(f"{served.url}/fragments/routes", headers=session)
    assert status == 200 and 'id="routes-table"' in page and "<html" not in page
    status, script, _ = await _get(f"{served.url}/static/htmx.min.js")
    assert status == 200 and script.startswith("var htmx=")  # vendored, no CDN


async def test_signing_out_ends_the_session(served: Served) -> None:
    session, csrf = await _sign_in(served.url)
    status, _, _ = await _post(f"{served.url}/logout", {"csrf": csrf}, headers=session)
    assert status == 303
    assert (await _get(f"{served.url}/", headers=session))[0] == 401


# -- dead letters -------------------------------------------------------------------------------------

def _held(error_class: str, stage: str, last: str, first: str = "", connector: str | None = None) -> Held:
    letter = DeadLetter(body=b"x", route="r", stage=stage, error_class=error_class, error=f"{error_class} happened",
                        attempts=1, first_failure=first or last, last_failure=last, replay_queue="q",
                        correlation_id=None, connector=connector, message_id=None, headers={})
    return Held("r.dlq", f"id-{last}", IncomingMessage(), letter)


def test_dead_letters_are_grouped_by_stage_and_error_class_with_counts_and_first_and_last_seen() -> None:
    groups = group_letters([
        _held("ParseError", "parse", "2026-01-01T10:00:00.000Z"),
        _held("DeliveryError", "deliver", "2026-01-01T09:00:00.000Z", connector="cdr"),
        _held("ParseError", "parse", "2026-01-01T12:00:00.000Z", first="2026-01-01T11:00:00.000Z"),
        _held("ParseError", "map", "2026-01-01T08:00:00.000Z"),
        _held("DeliveryError", "deliver", "2026-01-01T09:30:00.000Z", connector="bed-board"),
    ])
    assert [(g.stage, g.error_class, g.count) for g in groups] == [
        ("parse", "ParseError", 2), ("deliver", "DeliveryError", 2), ("map", "ParseError", 1)]
    parse = groups[0]
    assert (parse.first_seen, parse.last_seen) == ("2026-01-01T10:00:00.000Z", "2026-01-01T12:00:00.000Z")
    assert groups[1].connectors == {"cdr", "bed-board"}


async def test_the_route_page_groups_dead_letters_and_shows_no_body(served: Served) -> None:
    status, page, _ = await _get(f"{served.url}/routes/adt-inbound", headers=_bearer())
    assert status == 200
    groups = re.findall(r'<tr class="group">\s*<th scope="row">(\w+)</th>\s*<td>(\w+)</td>\s*'
                        r'<td class="num group-count">(\d+)</td>', page)
    assert sorted(groups) == [("map", "MappingError", "1"), ("parse", "ParseError", "2")]
    assert "SECRET-MRN-42" not in page and "Reveal" in page
    assert (await _get(f"{served.url}/routes/no-such-route", headers=_bearer()))[0] == 404
    assert await served.broker.queue_info(served.route.dead_letter) is not None
    assert (await served.broker.queue_info(served.route.dead_letter)).messages == 3  # given back, all of them


async def test_replaying_a_group_asks_first_needs_the_csrf_token_and_is_audited(served: Served) -> None:
    session, csrf = await _sign_in(served.url)
    status, page, _ = await _get(f"{served.url}/routes/adt-inbound/replay?stage=parse&error_class=ParseError",
                                 headers=session)
    assert status == 200 and 'id="replay-count">2<' in page and 'id="confirm-replay"' in page
    assert (await served.broker.queue_info(served.route.dead_letter)).messages == 3  # asking changed nothing
    form = {"stage": "parse", "error_class": "ParseError"}
    assert (await _post(f"{served.url}/routes/adt-inbound/replay", form, headers=session))[0] == 403
    assert (await _post(f"{served.url}/routes/adt-inbound/replay", {**form, "csrf": "forged"},
                        headers=session))[0] == 403
    assert (await _post(f"{served.url}/routes/adt-inbound/replay", {**form, "csrf": csrf},
                        headers={**session, "Origin": "http://evil.example"}))[0] == 403
    assert not _audit(served.audit) and (await served.broker.queue_info(served.route.inbound)).messages == 0
    assert 'name="count" value="2"' in page
    await _dead_letter(served.broker, served.route, ParseError("no MSH segment"))  # arrives after the question
    status, _, headers = await _post(f"{served.url}/routes/adt-inbound/replay", {**form, "count": "2", "csrf": csrf},
                                     headers={**session, "Origin": served.url})
    assert status == 303 and headers["Location"].startswith("/routes/adt-inbound?replayed=2")
    assert (await served.broker.queue_info(served.route.inbound)).messages == 2
    assert (await served.broker.queue_info(served.route.dead_letter)).messages == 2  # the map one, the late one
    [record] = _audit(served.audit)
    assert record["command"] == "console replay" and record["count"] == 2 and len(record["ids"]) == 2
    assert record["console_user"] == "Dr Ops" and record["error_class"] == "ParseError"
    assert record["to"] == [served.route.inbound]


async def test_a_bearer_client_replays_without_a_csrf_token(served: Served) -> None:
    status, _, _ = await _post(f"{served.url}/routes/adt-inbound/replay",
                               {"stage": "map", "error_class": "MappingError"}, headers=_bearer())
    assert status == 303
    assert (await served.broker.queue_info(served.route.inbound)).messages == 1
    assert _audit(served.audit)[0]["console_user"] == "bearer token"


async def test_a_body_is_shown_only_on_an_explicit_audited_reveal(served: Served) -> None:
    session, csrf = await _sign_in(served.url)
    _, page, _ = await _get(f"{served.url}/routes/adt-inbound", headers=session)
    letter = re.search(r'name="letter" value="([^"]+)"', page)
    assert letter
    url = f"{served.url}/routes/adt-inbound/reveal"
    assert (await _post(url, {"letter": letter.group(1)}, headers=session))[0] == 403  # no CSRF token
    assert not _audit(served.audit)
    status, page, _ = await _post(url, {"csrf": csrf, "letter": letter.group(1)}, headers=session)
    assert status == 200 and "SECRET-MRN-42" in page
    [record] = _audit(served.audit)
    assert record["command"] == "console reveal" and record["ids"] == [letter.group(1)]
    assert (await served.broker.queue_info(served.route.dead_letter)).messages == 3  # revealing removes nothing
    status, _, _ = await _post(url, {"csrf": csrf, "letter": "nope"}, headers=session)
    assert status == 404


async def test_nothing_is_revealed_or_replayed_when_the_audit_log_cannot_be_written(served: Served) -> None:
    served.audit.mkdir()  # a directory where the log file should be
    _, page, _ = await _get(f"{served.url}/routes/adt-inbound", headers=_bearer())
    letter = re.search(r'name="letter" value="([^"]+)"', page)
    assert letter
    status, page, _ = await _post(f"{served.url}/routes/adt-inbound/reveal", {"letter": letter.group(1)},
                                  headers=_bearer())
    assert status == 503 and "audit log" in page and "SECRET-MRN-42" not in page
    status, _, _ = await _post(f"{served.url}/routes/adt-inbound/replay",
                               {"stage": "parse", "error_class": "ParseError"}, headers=_bearer())
    assert status == 503
    assert (await served.broker.queue_info(served.route.dead_letter)).messages == 3


async def test_trace_search_says_when_the_journal_is_not_enabled(served: Served) -> None:
    status, page, _ = await _get(f"{served.url}/trace?id=CTRL1", headers=_bearer())
    assert status == 200 and 'id="journal-off"' in page and "not enabled" in page


async def test_trace_search_and_the_sla_column_read_the_journal(project: Project, tmp_path: Path) -> None:
    journal = Journal(JournalSettings(url=f"sqlite:///{tmp_path / 'journal.db'}"))
    now = time.time()
    journal.record("adt-inbound", "route", "routed", at=now - 2, correlation_id="corr-1", message_id="m-1",
                   source_id="MSG-0001", event_id="ev-1", event_type="patient.admitted", received_at=now - 3)
    journal.record("adt-inbound", "deliver", "delivered", at=now - 1, correlation_id="corr-1", event_id="ev-1",
                   connector="case-management", attempt=1)
    await journal.flush()
    runner, url, _ = await _serve(project, TOKEN, Extras(journal=journal))
    try:
        status, page, _ = await _get(f"{url}/trace?id=MSG-0001", headers=_bearer())
        assert status == 200 and "journal-off" not in page
        assert "corr-1" in page and "ev-1" in page and "case-management" in page and "delivered" in page
        _, page, _ = await _get(f"{url}/trace?id=unknown-id", headers=_bearer())
        assert 'id="trace-none"' in page
        _, page, _ = await _get(f"{url}/fragments/routes", headers=_bearer())
        row = re.search(r'<tr id="route-adt-inbound".*?</tr>', page, re.S)
        assert row and "<td>ok</td>" in row.group() and "ago (" in row.group()  # its sla:, last received
    finally:
        await runner.cleanup()
        await journal.stop()


async def test_queue_depths_are_exported_for_dashboards(served: Served) -> None:
    await _get(f"{served.url}/fragments/routes", headers=_bearer())
    status, text, _ = await _get(f"{served.url}/metrics")
    assert status == 200
    assert (f'middleware_queue_messages{{queue="{served.route.dead_letter}",role="dead-letter",'
            f'route="adt-inbound"}} 3.0') in text


async def test_rates_come_from_the_engine_counters(served: Served) -> None:
    await _get(f"{served.url}/fragments/routes", headers=_bearer())  # the first sample: no rate yet
    served.metrics.received.labels(route="adt-inbound").inc(30)
    await asyncio.sleep(0.6)
    _, page, _ = await _get(f"{served.url}/fragments/routes", headers=_bearer())
    row = re.search(r'<tr id="route-adt-inbound".*?</tr>', page, re.S)
    assert row and "30 total" in row.group() and re.search(r"\d+(\.\d+)?/s", row.group())


async def test_silent_feeds_and_open_breakers_are_highlighted_in_words(served: Served) -> None:
    served.metrics.sla_silent.labels(route="adt-inbound").set(1)
    served.metrics.breaker_open.labels(connector="clinical-data-repository").set(1)
    served.metrics.breaker_open.labels(connector="case-management").set(0)
    _, page, _ = await _get(f"{served.url}/fragments/routes", headers=_bearer())
    assert re.search(r'id="silent-feeds">.*adt-inbound', page)
    silent = re.search(r'<tr id="route-adt-inbound" class="state-silent">.*?</tr>', page, re.S)
    assert silent and '<td class="state">SILENT</td>' in silent.group() and "(silent)" in silent.group()
    assert "case-management: closed" in silent.group()
    orders = re.search(r'<tr id="route-orders-inbound" class="state-breaker-open">.*?</tr>', page, re.S)
    assert orders and "BREAKER OPEN" in orders.group() and "clinical-data-repository: open" in orders.group()


def test_after_sign_in_only_a_local_path_is_followed() -> None:
    from middleware.console.app import _next

    assert [_next(t) for t in ("/routes/adt-inbound?x=1", "//evil.example/", "/\\evil.example", "https://e.x", "")] \
        == ["/routes/adt-inbound?x=1", "/", "/", "/", "/"]


def test_ages_read_in_words() -> None:
    assert [format_age(s) for s in (None, 5, 125, 7300, 90000)] == ["—", "5.0s", "2m05s", "2h01m", "1d01h"]

