"""Transport security of HTTP connectors against real local servers: a TLS sink with a CA made
in the test (trustme), mutual TLS, and an OAuth2 client-credentials token endpoint."""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from middleware.delivery import ConnectorSpec, Delivery, RetryPolicy, make_connector
from middleware.delivery.http import HttpConnector
from middleware.delivery.retry import send_with_retry
from middleware.errors import DeliveryError
from middleware.tls import TlsOptions, client_context

FAST = RetryPolicy(attempts=3, initial=0.01, max=0.02, multiplier=2, jitter=0.0)
DELIVERY = Delivery(body=b'{"specversion":"1.0","id":"ev-1"}', event_id="ev-1", correlation_id="corr-1",
                    route="adt-inbound", event_type="patient.admitted.v1")


@dataclass
class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 / localhost and a client certificate, as files."""

    ca: trustme.CA
    server: trustme.LeafCert
    ca_file: Path
    client_file: Path  # client key + certificate chain in one PEM
    client_key: Path
    client_cert: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("middleware-client@example.org", common_name="middleware-client")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    client.private_key_and_cert_chain_pem.write_to_path(str(folder / "client.pem"))
    client.private_key_pem.write_to_path(str(folder / "client.key"))
    for n, blob in enumerate(client.cert_chain_pems):
        blob.write_to_path(str(folder / "client.crt"), append=n > 0)
    return Pki(ca, server, folder / "ca.pem", folder / "client.pem", folder / "client.key", folder / "client.crt")


def server_context(pki: Pki, *, client_certs: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.server.configure_cert(context)
    if client_certs:  # mutual TLS: only clients with a certificate from our CA get in
        pki.ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass
class Server:
    """A real aiohttp server (HTTP or HTTPS) on a free port."""

    runner: web.AppRunner
    base: str


async def serve(app: web.Application, context: ssl.SSLContext | None = None) -> Server:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    scheme = "https" if context else "http"
    return Server(runner, f"{scheme}://127.0.0.1:{runner.addresses[0][1]}")


@dataclass
class TlsSink:
    """Records requests (headers, the client certificate's common name) and answers 200."""

    requests: list[tuple[dict[str, str], str | None]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            subject = dict(item[0] for item in peer["subject"]) if peer else {}
            self.requests.append((dict(request.headers), subject.get("commonName")))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/events", handle)
        return app


@pytest.fixture
async def servers() -> AsyncIterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        await server.runner.cleanup()


def spec(url: str, **options: object) -> ConnectorSpec:
    return ConnectorSpec("cdr", "http", {"url": url, **options}, FAST)


async def deliver(connector_spec: ConnectorSpec, count: int = 1) -> int:
    """Send ``count`` deliveries with retries through one connector; returns the attempts of the last."""
    connector = make_connector(connector_spec)
    await connector.start()
    try:
        attempts = 0
        for _ in range(count):
            attempts = await send_with_retry(connector, DELIVERY, connector_spec.retry)
        return attempts
    finally:
        await connector.close()


# -- TLS and mutual TLS ----------------------------------------------------------------------------


async def test_tls_sink_signed_by_our_ca_accepts_with_tls_ca_file(pki: Pki, servers: list[Server]) -> None:
    sink = TlsSink()
    servers.append(server := await serve(sink.app(), server_context(pki)))
    assert await deliver(spec(f"{server.base}/events", tls={"ca_file": str(pki.ca_file)})) == 1
    assert len(sink.requests) == 1


async def test_tls_sink_without_our_ca_dead_letters_at_once_saying_why(pki: Pki, servers: list[Server]) -> None:
    sink = TlsSink()
    servers.append(server := await serve(sink.app(), server_context(pki)))
    with pytest.raises(DeliveryError) as raised:
        await deliver(spec(f"{server.base}/events"))
    error = raised.value
    assert not error.retryable and error.attempts == 1  # retrying cannot make the certificate trusted
    assert "certificate not trusted" in error.message and "tls.ca_file" in error.message
    assert sink.requests == []


async def test_mtls_sink_rejects_a_client_without_certificate(pki: Pki, servers: list[Server]) -> None:
    sink = TlsSink()
    servers.append(server := await serve(sink.app(), server_context(pki, client_certs=True)))
    with pytest.raises(DeliveryError) as raised:
        await deliver(spec(f"{server.base}/events", tls={"ca_file": str(pki.ca_file)}))
    # the server only resets the connection (TLS 1.3): retried like any reset, then it names the likely cause
    assert raised.value.retryable and raised.value.attempts == FAST.attempts
    assert "mutual TLS" in raised.value.message and "tls.cert_file" in raised.value.message
    assert sink.requests == []


@pytest.mark.parametrize("files", ["one PEM", "certificate and key apart"])
async def test_mtls_sink_accepts_our_client_certificate(pki: Pki, servers: list[Server], files: str) -> None:
    sink = TlsSink()
    servers.append(server := await serve(sink.app(), server_context(pki, client_certs=True)))
    tls = ({"ca_file": str(pki.ca_file), "cert_file": str(pki.client_file)} if files == "one PEM" else
           {"ca_file": str(pki.ca_file), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)})
    assert await deliver(spec(f"{server.base}/events", tls=tls)) == 1
    [(_, common_name)] = sink.requests
    assert common_name == "middleware-client"


async def test_verify_false_skips_certificate_checks(pki: Pki, servers: list[Server]) -> None:
    sink = TlsSink()
    servers.append(server := await serve(sink.app(), server_context(pki)))
    assert await deliver(spec(f"{server.base}/events", tls={"verify": False})) == 1


async def test_tls_files_gone_at_start_do_not_crash_and_each_send_says_why(tmp_path: Path) -> None:
    connector = make_connector(spec("https://127.0.0.1:1/events", tls={"ca_file": str(tmp_path / "gone.pem")}))
    await connector.start()  # an engine start must survive it
    with pytest.raises(DeliveryError, match="cannot load the tls files") as raised:
        await connector.send(DELIVERY)
    assert raised.value.retryable
    await connector.close()


def test_client_context_loads_our_ca_and_client_certificate(pki: Pki) -> None:
    context = client_context(TlsOptions(ca_file=str(pki.ca_file), cert_file=str(pki.client_file)))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    ours = [c for c in context.get_ca_certs() if "trustme" in str(c["subject"])]
    assert len(ours) == 1
    with pytest.raises(ssl.SSLError):
        client_context(TlsOptions(cert_file=str(pki.ca_file)))  # a certificate without its key


# -- OAuth2 client credentials ---------------------------------------------------------------------


@dataclass
class Authority:
    """A token endpoint and a sink that accepts only live tokens it issued."""

    lifetime: float = 60.0
    calls: int = 0
    forms: list[dict[str, str]] = field(default_factory=list)
    live: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    seen: list[str] = field(default_factory=list)  # Authorization headers at the sink
    refuse_all: bool = False  # the sink answers 401 to every token

    def app(self) -> web.Application:
        async def token(request: web.Request) -> web.Response:
            self.calls += 1
            form = {k: str(v) for k, v in (await request.post()).items()}
            self.forms.append(form)
            expected = "Basic " + base64.b64encode(b"mw-client:s3cr3t%2F%2B%3D").decode()  # RFC 6749 2.3.1
            if request.headers.get("Authorization") != expected or form.get("grant_type") != "client_credentials":
                return web.json_response({"error": "invalid_client"}, status=401)
            issued = f"tok-{self.calls}"
            self.live[issued] = time.monotonic() + self.lifetime
            return web.json_response({"access_token": issued, "token_type": "Bearer", "expires_in": self.lifetime})

        async def events(request: web.Request) -> web.Response:
            await request.read()
            header = request.headers.get("Authorization", "")
            self.seen.append(header)
            token = header.removeprefix("Bearer ")
            if self.refuse_all or self.live.get(token, 0.0) < time.monotonic():
                return web.Response(status=401)
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/token", token)
        app.router.add_post("/events", events)
        return app


async def oauth_connector(servers: list[Server], authority: Authority, **oauth2: object) -> HttpConnector:
    servers.append(server := await serve(authority.app()))
    connector = make_connector(spec(f"{server.base}/events", oauth2={
        "token_url": f"{server.base}/token", "client_id": "mw-client", "client_secret": "s3cr3t/+=",
        "scope": "events.write", **oauth2}))
    assert isinstance(connector, HttpConnector)
    await connector.start()
    return connector


async def test_token_is_fetched_once_for_many_deliveries_and_sent_as_bearer(
        servers: list[Server], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    authority = Authority()
    connector = await oauth_connector(servers, authority)
    try:
        for _ in range(3):
            await connector.send(DELIVERY)
        await asyncio.gather(*(connector.send(DELIVERY) for _ in range(10)))  # concurrent: still one fetch
    finally:
        await connector.close()
    assert authority.calls == 1
    assert authority.seen == ["Bearer tok-1"] * 13
    assert authority.forms == [{"grant_type": "client_credentials", "scope": "events.write"}]
    fetched = [r for r in caplog.records if r.getMessage() == "oauth2 token fetched"]
    assert len(fetched) == 1 and fetched[0].__dict__["connector"] == "cdr"
    logged = " ".join(str(r.__dict__) for r in caplog.records)
    assert "tok-1" not in logged and "s3cr3t" not in logged  # neither the token nor the secret is logged


async def test_token_is_fetched_again_before_it_expires(servers: list[Server]) -> None:
    authority = Authority(lifetime=1.0)  # refresh margin: min(30 s, half the lifetime) = 0.5 s
    connector = await oauth_connector(servers, authority)
    try:
        await connector.send(DELIVERY)
        await connector.send(DELIVERY)
        assert authority.calls == 1
        await asyncio.sleep(0.6)  # past the refresh point, before the token's real expiry
        await connector.send(DELIVERY)
        await connector.send(DELIVERY)
    finally:
        await connector.close()
    assert authority.calls == 2
    assert authority.seen == ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2", "Bearer tok-2"]  # never a 401


async def test_401_with_a_cached_token_refreshes_once_and_resends(servers: list[Server]) -> None:
    authority = Authority()
    connector = await oauth_connector(servers, authority)
    try:
        await connector.send(DELIVERY)
        authority.live.clear()  # the authority revoked tok-1
        await connector.send(DELIVERY)
        assert authority.seen == ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]
        assert authority.calls == 2
        authority.refuse_all = True  # now even a fresh token is refused: one refresh, then a final 401
        with pytest.raises(DeliveryError) as raised:
            await connector.send(DELIVERY)
    finally:
        await connector.close()
    assert raised.value.status == 401 and not raised.value.retryable
    assert authority.calls == 3 and authority.seen[-2:] == ["Bearer tok-2", "Bearer tok-3"]


async def test_client_secret_post_and_refused_credentials_never_show_the_secret(servers: list[Server]) -> None:
    authority = Authority()
    connector = await oauth_connector(servers, authority, client_auth="post")
    try:
        with pytest.raises(DeliveryError) as raised:
            await connector.send(DELIVERY)
    finally:
        await connector.close()
    assert authority.forms[0]["client_secret"] == "s3cr3t/+="  # sent in the form body as asked
    assert not raised.value.retryable and "token endpoint" in raised.value.message and "401" in raised.value.message
    assert "s3cr3t" not in str(raised.value)
    assert authority.seen == []  # no event went out without a token


async def test_unreachable_token_endpoint_is_retryable(servers: list[Server]) -> None:
    authority = Authority()
    connector = await oauth_connector(servers, authority, token_url="http://127.0.0.1:1/token")
    try:
        with pytest.raises(DeliveryError, match="token endpoint") as raised:
            await connector.send(DELIVERY)
    finally:
        await connector.close()
    assert raised.value.retryable and authority.seen == []
