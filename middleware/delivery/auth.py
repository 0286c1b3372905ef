"""OAuth2 client credentials (RFC 6749 section 4.4) for HTTP connectors: one cached token per connector.
(The grant may also be authenticated with a signed JWT instead of a secret: :mod:`.smart`.)

The token is fetched from ``token_url`` on first use, shared by every delivery, and fetched again
``refresh_margin`` seconds before it expires (or when the sink answers 401 to it). Concurrent
deliveries wait for one fetch instead of each asking. Neither the secret nor the token ever
appears in an error, a log line or a metric; the token endpoint's answer is never copied either.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote_plus

import aiohttp
import orjson

from middleware.errors import DeliveryError
from middleware.observe import safe_url

log = logging.getLogger("middleware.delivery")

DEFAULT_LIFETIME = 300.0  # seconds, when the token endpoint does not say (expires_in is optional)
DEFAULT_REFRESH_MARGIN = 30.0


@dataclass(frozen=True)
class ClientCredentials:
    """A connector's ``oauth2:`` block, ``${VAR}`` already filled in.

    Parameters:
        token_url: the authorization server's token endpoint.
        client_id, client_secret: sent with HTTP Basic (``client_auth: basic``, the default) or in
            the form body (``client_auth: post``).
        scope, audience: added to the token request when set.
        refresh_margin: fetch a new token this many seconds before the current one expires
            (at most half its lifetime).
    """

    token_url: str
    client_id: str
    client_secret: str
    scope: str | None = None
    audience: str | None = None
    client_auth: str = "basic"
    refresh_margin: float = DEFAULT_REFRESH_MARGIN

    @classmethod
    def from_options(cls, block: Mapping[str, Any]) -> ClientCredentials:
        """From a schema-checked ``oauth2:`` block."""
        return cls(token_url=str(block["token_url"]), client_id=str(block["client_id"]),
                   client_secret=str(block["client_secret"]),
                   scope=str(block["scope"]) if block.get("scope") is not None else None,
                   audience=str(block["audience"]) if block.get("audience") is not None else None,
                   client_auth=str(block.get("client_auth", "basic")),
                   refresh_margin=float(block.get("refresh_margin", DEFAULT_REFRESH_MARGIN)))

    def token_request(self) -> tuple[dict[str, str], dict[str, str]]:
        """The token request's form fields and headers (client authentication included)."""
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        if self.audience:
            form["audience"] = self.audience
        headers = {"Accept": "application/json"}
        if self.client_auth == "post":
            form.update(client_id=self.client_id, client_secret=self.client_secret)
        else:  # client_secret_basic: each part form-urlencoded first (RFC 6749 section 2.3.1)
            pair = f"{quote_plus(self.client_id)}:{quote_plus(self.client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return form, headers


class TokenRequest(Protocol):
    """What :class:`TokenCache` asks a token with: client credentials with a secret
    (:class:`ClientCredentials`) or a signed JWT assertion (:class:`middleware.delivery.smart.SmartBackend`)."""

    @property
    def token_url(self) -> str: ...

    @property
    def refresh_margin(self) -> float: ...

    def token_request(self) -> tuple[dict[str, str], dict[str, str]]:
        """Form fields and headers of one token request (made anew each time: assertions are single-use)."""
        ...


class TokenCache:
    """Holds one access token and fetches a new one when it is missing, due or refused."""

    def __init__(self, credentials: TokenRequest, connector: str, retry_on: frozenset[str]) -> None:
        self.credentials = credentials
        self.connector = connector
        self.retry_on = retry_on
        self.fetches = 0  # token requests made (for tests and debugging; never the token itself)
        self._token: str | None = None
        self._refresh_at = 0.0  # time.monotonic() after which the token is fetched again
        self._lock = asyncio.Lock()

    async def token(self, session: aiohttp.ClientSession, timeout: float) -> str:
        """A token that is not due for refresh; fetches one (once, for all waiters) if needed."""
        if self._token is not None and time.monotonic() < self._refresh_at:
            return self._token
        async with self._lock:
            if self._token is None or time.monotonic() >= self._refresh_at:  # not refreshed while we waited
                self._token, self._refresh_at = await self._fetch(session, timeout)
            return self._token

    def refused(self, token: str) -> None:
        """The sink answered 401 to ``token``: the next :meth:`token` fetches a new one."""
        if self._token == token:
            self._token = None

    async def _fetch(self, session: aiohttp.ClientSession, timeout: float) -> tuple[str, float]:
        creds = self.credentials
        form, headers = creds.token_request()
        where = f"token endpoint {safe_url(creds.token_url)}"
        self.fetches += 1
        try:
            async with session.post(creds.token_url, data=form, headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                status = response.status
                body = await response.read()
        except TimeoutError:
            raise self._error(f"{where} timed out after {timeout:g}s", "timeout" in self.retry_on) from None
        except aiohttp.ClientError as exc:
            raise self._error(f"{where} failed: {type(exc).__name__}", "connection" in self.retry_on) from None
        if status != 200:
            retryable = ("429" in self.retry_on) if status == 429 else ("5xx" in self.retry_on and status >= 500)
            hint = ("the token endpoint is failing: it will be retried" if retryable else
                    "check the client id and its secret or key (oauth2 / smart), the scope and the token_url")
            raise self._error(f"{where} answered HTTP {status}", retryable, status=status, hint=hint)
        try:
            answer = orjson.loads(body)
            token = answer["access_token"]
            lifetime = max(float(answer.get("expires_in") or DEFAULT_LIFETIME), 1.0)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise self._error(f"{where} answered without a usable access_token", False,
                              hint="the endpoint must answer JSON with access_token (RFC 6749 section 5.1)") from None
        if not isinstance(token, str) or not token:
            raise self._error(f"{where} answered without a usable access_token", False,
                              hint="the endpoint must answer JSON with access_token (RFC 6749 section 5.1)")
        margin = min(creds.refresh_margin, lifetime / 2)
        log.info("oauth2 token fetched", extra={"connector": self.connector, "expires_in": lifetime,
                                                "refresh_in": round(lifetime - margin, 3), "fetches": self.fetches})
        return token, time.monotonic() + lifetime - margin

    def _error(self, message: str, retryable: bool, *, status: int | None = None,
               hint: str | None = None) -> DeliveryError:
        return DeliveryError(f"{self.connector}: {message}", retryable=retryable, status=status,
                             hint=hint or "check that the token endpoint is up and reachable")
