"""Metrics endpoint and JSON logs."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import aiohttp
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from middleware.observe import JsonFormatter, Metrics, TextFormatter, mask_secrets, safe_url, serve_metrics
from middleware.project import check_project
from tests.project_copy import copy_project


async def test_metrics_and_health_endpoints() -> None:
    metrics = Metrics()
    metrics.received.labels("adt-inbound").inc(3)
    metrics.dead_lettered.labels("adt-inbound", "parse").inc()
    runner = await serve_metrics(metrics, "127.0.0.1", 0)
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                health = await response.json()
    finally:
        await runner.cleanup()
    assert 'middleware_messages_received_total{route="adt-inbound"} 3.0' in text
    assert 'middleware_dead_lettered_total{route="adt-inbound",stage="parse"} 1.0' in text
    assert health == {"status": "ok"}
    assert metrics.total("middleware_messages_received") == 3


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.LogRecord("middleware.worker", logging.WARNING, __file__, 1, "dead-lettered", (), None)
    record.route = "adt-inbound"
    record.correlation_id = "c-1"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["event"] == "dead-lettered" and entry["level"] == "warning"
    assert entry["route"] == "adt-inbound" and entry["correlation_id"] == "c-1"


def test_safe_url_masks_userinfo_and_secret_parameters_only() -> None:
    assert safe_url("amqp://guest:secret@127.0.0.1:5672/vh") == "amqp://***@127.0.0.1:5672/vh"
    assert safe_url("https://u:p@sink.example/events?token=t&page=2") == "https://***@sink.example/events?token=***&page=2"
    assert safe_url("amqp://guest:p/a#s?w@rd:x@rabbit:5672/") == "amqp://***@rabbit:5672/"
    assert safe_url("https://h/cb?API-Key=k1#access_token=k2&state=s") == "https://h/cb?API-Key=***#access_token=***&state=s"
    assert safe_url("https://sas.example/b?sv=1&SIG=abc") == "https://sas.example/b?sv=1&SIG=***"
    assert safe_url("filesystem:///srv/var/broker") == "filesystem:///srv/var/broker"
    assert safe_url("https://fhir.example/Patient?email=a@b.example") == "https://fhir.example/Patient?email=a@b.example"
    assert safe_url("not a url: guest:pw@host") == "not a url: guest:pw@host"
    # two readings (a password "1/p?token=a", or a token "a@b"): the secrets of both are masked
    assert safe_url("https://h:1/p?token=a@b") == "https://***"
    assert safe_url("https://u:2024#Spring@host/x?a=1") == "https://***@host/x?a=1"


def test_mask_secrets_masks_every_url_in_an_error_message() -> None:
    text = "case-management: POST https://svc:pa/ss@sink:8443/in?token=abc failed; see http://docs/x?sig=zz1 now"
    assert mask_secrets(text) == ("case-management: POST https://***@sink:8443/in?token=*** failed; "
                                  "see http://docs/x?sig=*** now")


def test_log_lines_mask_urls_in_the_message_and_the_extra_fields() -> None:
    record = logging.LogRecord("aiormq.connection", logging.WARNING, __file__, 1,
                               "connection to %s lost", ("amqp://svc:p/w#1@rabbit:5672/",), None)
    record.target = "https://sink.example/in?access_token=t0k3n"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["event"] == "connection to amqp://***@rabbit:5672/ lost"
    assert entry["target"] == "https://sink.example/in?access_token=***"
    text = TextFormatter().format(record)
    assert "p/w#1" not in text and "t0k3n" not in text and "amqp://***@rabbit:5672/" in text


def test_validate_masks_a_url_it_quotes_in_a_problem(tmp_path: Path) -> None:
    copy_project(tmp_path)
    connector = tmp_path / "connectors" / "case-management.yaml"
    connector.write_text(re.sub(r"(?m)^url: .*$", "url: ftp://svc:s3cr/et@sink.example/in", connector.read_text()))
    _, problems = check_project(tmp_path, {})
    assert [str(p) for p in problems] == [
        "connectors/case-management.yaml:4: url: 'ftp://***@sink.example/in' does not match '^https?://'"]


_SAFE = "abcdefghijklmnopqrstuvwxyz0123456789-._~"
hosts = st.one_of(st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
                  st.just("127.0.0.1"), st.just("[::1]"))
ports = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
paths = st.lists(st.text(_SAFE + "%:=+,;!$'()*&", max_size=8), max_size=4).map(lambda s: "".join(f"/{p}" for p in s))
plain_names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(
    lambda n: n not in {"key", "sig", "pwd", "auth"} and not any(w in n for w in ("token", "key", "secret", "pass",
                                                                                   "signature", "credential")))
# no "@" here: after a userinfo or a host:port it reads as the end of a password (masking more, never less)
plain_params = st.lists(st.tuples(plain_names, st.text(_SAFE + ":/?", max_size=8)), max_size=3).map(
    lambda ps: "&".join(f"{n}={v}" for n, v in ps))
secret_names = st.sampled_from(["token", "access_token", "api_key", "apikey", "key", "password", "secret", "sig",
                                "signature", "refresh_token", "client_secret", "x-api-key"]).flatmap(
    lambda n: st.sampled_from([n, n.upper(), n.title()]))
# a password may hold any character; a query value any but whitespace, "&" and "#" (they end it)
passwords = st.text(st.characters(blacklist_categories=("Cs",)), min_size=4, max_size=24)
tokens = st.text(st.characters(blacklist_categories=("Cs", "Z", "Cc"), blacklist_characters="&#"), min_size=4,
                 max_size=24)


@settings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(["amqp", "amqps", "https", "http"]), user=st.text(_SAFE, max_size=8),
       password=passwords, host=hosts, port=ports, path=paths, query=plain_params)
def test_a_password_never_survives_safe_url_whatever_its_characters(
        scheme: str, user: str, password: str, host: str, port: str, path: str, query: str) -> None:
    url = f"{scheme}://{user}:{password}@{host}{port}{path}" + (f"?{query}" if query else "")
    rest = f"{scheme}://***@{host}{port}{path}?{query}"
    assume(password not in f"error: POST {rest} failed")  # e.g. "fail": found in the text around the URL
    assert password not in safe_url(url)
    assert safe_url(url) == f"{scheme}://***@{host}{port}{path}" + (f"?{query}" if query else "")
    if not any(c.isspace() for c in password):  # in free text a URL ends at whitespace
        assert password not in mask_secrets(f"error: POST {url} failed")


@settings(max_examples=300, deadline=None)
@given(host=hosts, port=ports, path=paths, before=plain_params, name=secret_names, token=tokens,
       after=plain_params, in_fragment=st.booleans())
def test_a_query_token_never_survives_safe_url(host: str, port: str, path: str, before: str, name: str, token: str,
                                               after: str, in_fragment: bool) -> None:
    params = "&".join(p for p in (before, f"{name}={token}", after) if p)
    url = f"https://{host}{port}{path}{'#' if in_fragment else '?'}{params}"
    assume(token not in f"https://{host}{port}{path}?{before}&{name}=***&{after}")
    assert token not in safe_url(url)
    assert token not in mask_secrets(f"GET {url}: 401")
    if "@" not in token:  # with one, "host:port?token=a@b" may also read as a password "port?token=a"
        assert f"{name}=***" in safe_url(url)


@settings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(["amqp", "https", "http", "filesystem"]), host=hosts, port=ports, path=paths,
       query=plain_params, fragment=plain_params)
def test_a_url_without_secrets_is_unchanged(scheme: str, host: str, port: str, path: str, query: str,
                                            fragment: str) -> None:
    url = f"{scheme}://{host}{port}{path}" + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else "")
    assert safe_url(url) == url
    assert mask_secrets(f"cannot reach {url} now") == f"cannot reach {url} now"
