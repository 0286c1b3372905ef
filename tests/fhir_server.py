"""A small FHIR R4 server for tests (aiohttp): what the ``fhir`` connector talks to, checked like a real one.

Every resource it receives is validated with fhir.resources (R4B models, the R4 line's release that
the installed fhir.resources ships; the resources used here are the same in R4). It supports
conditional update (``PUT Type?identifier=system|value``), conditional create (``If-None-Exist``),
transaction Bundles (``urn:uuid:`` references resolved, all or nothing) and answers a bad resource
with 422 and an OperationOutcome. ``/token`` is an OAuth2 token endpoint for client credentials
(HTTP Basic secret) and SMART Backend Services (a JWT client assertion whose signature is verified
with the client's public key); when ``require_token`` is set, the FHIR endpoints want its tokens.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from typing import Any
from urllib.parse import unquote

import jwt
import orjson
from aiohttp import web
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

FHIR_JSON = "application/fhir+json"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class Rejected(Exception):
    """A request the server refuses: HTTP status plus an OperationOutcome issue."""

    def __init__(self, status: int, code: str, diagnostics: str, expression: str | None = None) -> None:
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics, self.expression = status, code, diagnostics, expression

    def response(self) -> web.Response:
        issue: dict[str, Any] = {"severity": "error", "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            issue["expression"] = [self.expression]
        return _fhir({"resourceType": "OperationOutcome", "issue": [issue]}, self.status)


def _fhir(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=FHIR_JSON, headers=headers)


def validate(resource: Any) -> None:
    """Raise :class:`Rejected` (422) unless ``resource`` is a valid FHIR resource."""
    kind = resource.get("resourceType") if isinstance(resource, dict) else None
    try:
        model = get_fhir_model_class(str(kind))
    except KeyError:
        raise Rejected(422, "invalid", f"unknown resourceType {kind!r}") from None
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Rejected(422, "invalid", f"{kind}.{where}: {first['msg']}", f"{kind}.{where}") from None


class FhirServer:
    """The running server; ``store[type][id]`` holds what it accepted, ``requests`` what it was sent."""

    def __init__(self, *, require_token: bool = False) -> None:
        self.require_token = require_token
        self.store: dict[str, dict[str, dict[str, Any]]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path?query, headers)
        self.clients: dict[str, Any] = {}  # client id -> client secret (str) or public key (SMART)
        self.tokens: set[str] = set()
        self.used_jti: set[str] = set()
        self.fail_with: list[int] = []  # statuses to answer FHIR requests with first (e.g. 503)
        self.url = ""
        self._runner: web.AppRunner | None = None

    @property
    def token_url(self) -> str:
        return self.url.rsplit("/", 1)[0] + "/token"

    def resources(self, kind: str) -> list[dict[str, Any]]:
        return list(self.store.get(kind, {}).values())

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_route("*", "/fhir", self._base)
        app.router.add_route("*", "/fhir/{kind}", self._type)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/fhir"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- FHIR endpoints --------------------------------------------------------------------------

    async def _guard(self, request: web.Request) -> Any:
        self.requests.append((request.method, request.path_qs, dict(request.headers)))
        if self.require_token:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
                raise Rejected(401, "login", "a valid bearer token is required")
        if self.fail_with:
            raise Rejected(self.fail_with.pop(0), "transient", "try again later")
        if request.content_type != FHIR_JSON:
            raise Rejected(415, "not-supported", f"Content-Type must be {FHIR_JSON}")
        try:
            return orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise Rejected(400, "structure", "the body is not JSON") from None

    async def _type(self, request: web.Request) -> web.Response:
        try:
            body = await self._guard(request)
            kind = request.match_info["kind"]
            if not isinstance(body, dict) or body.get("resourceType") != kind:
                raise Rejected(400, "invalid", f"the body is not a {kind}")
            validate(body)
            if request.method == "PUT":
                query = request.rel_url.query.get("identifier")
                if not query:
                    raise Rejected(400, "not-supported", "PUT needs ?identifier=system|value here")
                resource, created = self._conditional_update(kind, body, query)
            elif request.method == "POST":
                condition = request.headers.get("If-None-Exist")
                resource, created = self._conditional_create(kind, body, condition)
            else:
                raise Rejected(405, "not-supported", f"{request.method} is not supported")
        except Rejected as rejected:
            return rejected.response()
        return _fhir(resource, 201 if created else 200, {"Location": f"{self.url}/{kind}/{resource['id']}"})

    async def _base(self, request: web.Request) -> web.Response:
        try:
            bundle = await self._guard(request)
            if request.method != "POST" or not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise Rejected(400, "not-supported", "POST a transaction Bundle to the base")
            validate(bundle)
            if bundle.get("type") != "transaction":
                raise Rejected(400, "not-supported", "only transaction Bundles are processed")
            return _fhir(self._transaction(bundle))
        except Rejected as rejected:
            return rejected.response()

    # -- storage -----------------------------------------------------------------------------------

    def _matches(self, kind: str, query: str) -> list[dict[str, Any]]:
        system, _, value = unquote(query).partition("|")
        return [r for r in self.store.get(kind, {}).values()
                if any(i.get("system") == system and i.get("value") == value for i in r.get("identifier", []))]

    def _conditional_update(self, kind: str, resource: dict[str, Any], query: str,
                            staged: dict[str, dict[str, dict[str, Any]]] | None = None) -> tuple[dict[str, Any], bool]:
        found = self._matches(kind, query)
        if len(found) > 1:
            raise Rejected(412, "multiple-matches", f"{len(found)} {kind} resources match identifier")
        stored = {**resource, "id": found[0]["id"] if found else str(uuid.uuid4())}
        (staged if staged is not None else self.store).setdefault(kind, {})[stored["id"]] = stored
        return stored, not found

    def _conditional_create(self, kind: str, resource: dict[str, Any], condition: str | None,
                            staged: dict[str, dict[str, dict[str, Any]]] | None = None) -> tuple[dict[str, Any], bool]:
        if condition:
            found = self._matches(kind, condition.removeprefix("identifier="))
            if found:
                return found[0], False
        stored = {**resource, "id": str(uuid.uuid4())}
        (staged if staged is not None else self.store).setdefault(kind, {})[stored["id"]] = stored
        return stored, True

    def _transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """All entries or none: ids assigned first, ``urn:uuid:`` references rewritten, then stored."""
        staged: dict[str, dict[str, dict[str, Any]]] = {}
        ids: dict[str, str] = {}
        answers = []
        for entry in bundle.get("entry", []):
            resource, request = entry["resource"], entry["request"]
            kind, _, query = request["url"].partition("?")
            if request["method"] == "PUT":
                stored, created = self._conditional_update(kind, resource, query.removeprefix("identifier="), staged)
            elif request["method"] == "POST":
                stored, created = self._conditional_create(kind, resource, request.get("ifNoneExist"), staged)
            else:
                raise Rejected(400, "not-supported", f"transaction entry method {request['method']}")
            ids[entry["fullUrl"]] = f"{kind}/{stored['id']}"
            answers.append((kind, stored["id"], created))
        for kinds in staged.values():
            for resource in kinds.values():
                _resolve(resource, ids)
                validate(resource)
        for kind, resources in staged.items():
            self.store.setdefault(kind, {}).update(resources)
        return {"resourceType": "Bundle", "type": "transaction-response",
                "entry": [{"response": {"status": "201 Created" if created else "200 OK",
                                        "location": f"{kind}/{rid}"}} for kind, rid, created in answers]}

    # -- token endpoint ----------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        client = self._client(request, form)
        if client is None:
            return web.json_response({"error": "invalid_client"}, status=401)
        token = secrets.token_urlsafe(16)
        self.tokens.add(token)
        return web.json_response({"access_token": token, "token_type": "bearer", "expires_in": 300,
                                  "scope": form.get("scope", "")})

    def _client(self, request: web.Request, form: Any) -> str | None:
        """The authenticated client id: HTTP Basic secret, or a SMART JWT assertion verified with its key."""
        if form.get("client_assertion_type") == ASSERTION_TYPE:
            assertion = str(form.get("client_assertion", ""))
            try:
                claimed = jwt.decode(assertion, options={"verify_signature": False})["iss"]
                key = self.clients.get(claimed)
                if key is None or isinstance(key, str):
                    return None
                claims = jwt.decode(assertion, key, algorithms=["RS384", "ES384"], audience=self.token_url,
                                    issuer=claimed, options={"require": ["exp", "jti", "sub"]})
            except (jwt.PyJWTError, KeyError):
                return None
            if claims["sub"] != claimed or claims["jti"] in self.used_jti:
                return None
            self.used_jti.add(claims["jti"])
            return str(claimed)
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            if isinstance(self.clients.get(client_id), str) and secrets.compare_digest(self.clients[client_id], secret):
                return client_id
        return None


def _resolve(node: Any, ids: dict[str, str]) -> None:
    """Rewrite ``reference: urn:uuid:...`` to the ``Type/id`` the transaction gave that entry."""
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str) and reference.startswith("urn:uuid:"):
            if reference not in ids:
                raise Rejected(422, "not-found", "a reference names no entry of the transaction")
            node["reference"] = ids[reference]
        for value in node.values():
            _resolve(value, ids)
    elif isinstance(node, list):
        for item in node:
            _resolve(item, ids)
