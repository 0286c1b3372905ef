"""``type: fhir``: store each event in a FHIR R4 server as resources (Patient, Encounter, Observation,
ServiceRequest, Appointment).

The resources come from the connector's built-in maps (:mod:`.fhir_maps`), or from the deliver
entry's own ``map:`` when it has one (the mapped document is then a resource or a Bundle). One
resource is stored by conditional update (``PUT Patient?identifier=system|value``) or conditional
create (``If-None-Exist``); several go as one transaction Bundle (``POST`` to the base URL), so a
redelivered event changes nothing. A 4xx answer dead-letters at once with the server's
OperationOutcome (issue codes and diagnostics) in the reason; the outcome is never logged.

Transport, retries and auth are the ``http`` connector's (session, TLS, no redirects, retry
classification, bearer ``headers``, ``oauth2``), plus ``smart``: SMART Backend Services
(:mod:`.smart`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from middleware.delivery import http
from middleware.delivery.auth import TokenCache
from middleware.delivery.base import ConnectorSpec, Delivery, register
from middleware.delivery.fhir_maps import DEFAULT_SYSTEMS, resources_for
from middleware.delivery.smart import SPEC as SMART_SPEC
from middleware.delivery.smart import SmartBackend, load_key
from middleware.errors import DeliveryError, MappingError
from middleware.observe import safe_url

CONTENT_TYPE = "application/fhir+json"
MAX_OUTCOME = 500  # characters of OperationOutcome text kept in a dead letter's reason

SPEC: dict[str, Any] = {  # the keys of a connectors/<name>.yaml with type: fhir
    "type": "object",
    "required": ["url"],
    "properties": {
        "url": {"type": "string", "pattern": "^https?://",
                "description": "the FHIR server's base URL (`https://fhir.example.org/r4`)"},
        "headers": http.SPEC["properties"]["headers"] | {
            "description": "extra request headers; bearer auth: `Authorization: Bearer ${FHIR_TOKEN}`"},
        "timeout": http.SPEC["properties"]["timeout"],
        "tls": http.SPEC["properties"]["tls"],
        "oauth2": http.SPEC["properties"]["oauth2"],
        "smart": {**SMART_SPEC,
                  "description": "SMART Backend Services: `token_url`, `client_id`, `private_key_file` (PEM, "
                                 "relative to the project) or `private_key` (PEM text from `${ENV}`), `algorithm` "
                                 "(`RS384`, the default, or `ES384`), `kid`, `scope` (default `system/*.write`), "
                                 "`refresh_margin`"},
        "identifier_systems": {
            "type": "object", "additionalProperties": False,
            "properties": {k: {"type": "string", "minLength": 1} for k in DEFAULT_SYSTEMS},
            "description": "identifier systems of the built-in maps: `patient` (MRN), `encounter` (visit number), "
                           "`order`, `appointment`, `event` (observations); defaults `urn:middleware:identifier:*`"},
    },
}


def check_options(options: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """The http connector's checks plus: one way to authenticate, a usable SMART key."""
    found = http.check_options(options)
    smart = options.get("smart")
    if smart:
        header = http._authorization_key(options.get("headers") or {})
        if options.get("oauth2"):
            found.append((("smart",), "smart and oauth2 both set the Authorization header: keep one"))
        if header:
            found.append((("headers", header), f"smart sets the Authorization header: remove headers.{header}"))
        try:
            load_key(smart)
        except ValueError as exc:
            key = "private_key" if smart.get("private_key") else "private_key_file"
            found.append((("smart", key) if key in smart else ("smart",), f"smart: {exc}"))
    return found


def _outcome(body: bytes) -> str | None:
    """An OperationOutcome's issues as one line (severity, code, diagnostics / details, expression)."""
    try:
        outcome = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return None
    issues = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
        where = ", ".join(str(e) for e in issue.get("expression") or [])
        issues.append(" ".join(p for p in (f"{issue.get('severity', '?')}/{issue.get('code', '?')}:", str(text),
                                           f"at {where}" if where else "") if p))
    line = "; ".join(issues)
    return line[:MAX_OUTCOME] + ("…" if len(line) > MAX_OUTCOME else "") if line else None


@register("fhir", SPEC)
class FhirConnector(http.HttpConnector):
    """Writes events to a FHIR server as resources; one connection pool per connector."""

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        self.base = self.url.rstrip("/")
        self.systems = {**DEFAULT_SYSTEMS, **dict(spec.options.get("identifier_systems") or {})}
        self._misconfigured = "; ".join(message for _, message in check_options(spec.options))
        smart = spec.options.get("smart")
        if smart and not self._misconfigured:
            self.tokens = TokenCache(SmartBackend.from_options(smart), spec.name, spec.retry.retry_on)

    async def send(self, delivery: Delivery) -> None:
        self._ready()
        method, url, body, extra = self._request_for(delivery)
        headers: dict[str, Any] = {**self.headers, "Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE,
                                   "Prefer": "return=minimal",  # the stored resources are not read back
                                   "Idempotency-Key": delivery.event_id, **extra}
        if delivery.correlation_id:
            headers["X-Correlation-ID"] = delivery.correlation_id
        if delivery.traceparent:
            headers["traceparent"] = delivery.traceparent
        answer = await self._authorized(method, url, body, headers)
        if 200 <= answer.status < 300:
            return
        try:
            self._raise_for(answer.status, answer.retry_after, answer.location)
        except DeliveryError as exc:
            outcome = _outcome(answer.body)
            if outcome:
                exc.message += f": OperationOutcome {outcome}"
            raise

    def _request_for(self, delivery: Delivery) -> tuple[str, str, bytes, dict[str, str]]:
        """(method, URL, body, extra headers) for one event; a non-retryable DeliveryError when no
        resource can be built from it."""
        try:
            document = orjson.loads(delivery.body)
            if delivery.mapped:
                return self._mapped(document)
            entries = resources_for(document, self.systems)
        except (MappingError, orjson.JSONDecodeError, AttributeError, TypeError, ValueError, KeyError) as exc:
            # an event of an unexpected shape (never from a route with a schema, but replays and
            # other producers exist): one clear dead letter, no retry loop, no crashed worker
            detail = (exc.message if isinstance(exc, MappingError) else
                      f"cannot build FHIR resources from the event ({type(exc).__name__})")
            raise DeliveryError(f"{self.name}: {detail}", retryable=False,
                                hint="fix the route's or the delivery's map, then replay the dead letter") from None
        if len(entries) == 1:
            [entry] = entries
            extra = {"If-None-Exist": entry.if_none_exist} if entry.if_none_exist else {}
            return entry.method, f"{self.base}/{entry.url}", orjson.dumps(entry.resource), extra
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [e.bundle_entry() for e in entries]}
        return "POST", self.base, orjson.dumps(bundle), {}

    def _mapped(self, document: Any) -> tuple[str, str, bytes, dict[str, str]]:
        """A delivery map's document: a Bundle is POSTed to the base, a resource with an identifier is
        stored by conditional update on its first identifier, any other resource is created."""
        kind = document.get("resourceType") if isinstance(document, dict) else None
        if not isinstance(kind, str) or not kind.isalpha():
            raise MappingError("the delivery's map: must build a FHIR resource (set resourceType)")
        body = orjson.dumps(document)
        if kind == "Bundle":
            return "POST", self.base, body, {}
        identifiers = document.get("identifier")
        first = identifiers[0] if isinstance(identifiers, list) and identifiers else None
        if isinstance(first, dict) and first.get("system") and first.get("value"):
            query = quote(f"{first['system']}|{first['value']}", safe=":/|")
            return "PUT", f"{self.base}/{kind}?identifier={query}", body, {}
        return "POST", f"{self.base}/{kind}", body, {}

    def describe(self) -> str:
        return f"FHIR {safe_url(self.base)}"

    check = staticmethod(check_options)
