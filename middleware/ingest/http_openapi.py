"""The OpenAPI 3.1 description of an HTTP ingest listener, generated from its routes and settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from middleware.ingest import HttpListener
from middleware.ingest.http_bodies import accepted_types
from middleware.route import Route

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_ERRORS = {
    "400": "The body cannot be read as its media type (dead-lettered with its raw bytes)",
    "401": "No credentials",
    "403": "Wrong credentials, or a caller outside allowed_peers",
    "404": "No such route on this listener",
    "413": "Body larger than max_body_bytes",
    "415": "Content-Type not accepted by this route",
    "422": "Not a message of the route's format (dead-lettered), or an Idempotency-Key reused with another body",
    "429": "Over the listener's rate limit (see Retry-After)",
    "503": "The broker is down or did not confirm in time: nothing is known to be accepted, send again later",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before sending again",
                                "schema": {"type": "integer", "minimum": 1}}}


def openapi_document(listener: HttpListener, routes: Mapping[str, Route], *, base_url: str) -> dict[str, Any]:
    """OpenAPI 3.1 for ``POST /v1/routes/{route}/messages`` of every route in ``routes``, plus the probes."""
    security: list[dict[str, list[str]]] = []
    schemes: dict[str, Any] = {}
    if listener.bearer_tokens:
        schemes["bearer"] = {"type": "http", "scheme": "bearer"}
        security.append({"bearer": []})
    if listener.api_keys:
        schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        security.append({"apiKey": []})
    paths: dict[str, Any] = {}
    for name in sorted(routes):
        route = routes[name]
        types = accepted_types(route.format.name)
        responses: dict[str, Any] = {
            "202": {
                "description": "Every record is on the route's queue, confirmed by the broker",
                "headers": {"X-Correlation-ID": {"schema": {"type": "string"}}},
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
            },
        }
        for status, text in _ERRORS.items():
            responses[status] = {"description": text,
                                 "content": {"application/problem+json": {"schema": _PROBLEM},
                                             "application/fhir+json": {"schema": {"type": "object"}}}}
            if status in ("429", "503"):
                responses[status]["headers"] = _RETRY_AFTER
        paths[f"/v1/routes/{name}/messages"] = {"post": {
            "operationId": f"publish_{name.replace('-', '_')}",
            "summary": f"Put messages on route {name} ({route.format.name})",
            "description": route.description or "",
            "parameters": [
                {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 255},
                 "description": f"the same key and body within {listener.idempotency_window:g} s get the "
                                "first answer and are not published again (per process)"},
                {"name": "X-Correlation-ID", "in": "header", "schema": {"type": "string", "maxLength": 128}},
                {"name": "traceparent", "in": "header", "schema": {"type": "string"},
                 "description": "W3C trace context, kept on every message"},
            ],
            "requestBody": {"required": True, "content": {t: {"schema": {"type": "string"}} for t in types}},
            "responses": responses,
        }}
    for path, text in (("/healthz", "The listener is up"), ("/readyz", "The broker is connected")):
        paths[path] = {"get": {"summary": text, "security": [], "responses": {
            "200": {"description": text}, **({"503": {"description": "not ready"}} if path == "/readyz" else {})}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"middleware HTTP ingest ({listener.name})", "version": "1",
                 "description": f"Bodies up to {listener.max_body_bytes} bytes; docs/ingest.md"},
        "servers": [{"url": base_url}],
        "security": security,
        "paths": paths,
        "components": {
            "securitySchemes": schemes,
            "schemas": {
                "Accepted": {"type": "object", "required": ["correlation_id", "message_ids"], "properties": {
                    "correlation_id": {"type": "string"},
                    "message_ids": {"type": "array", "items": {"type": "string"}},
                    "dead_lettered": {"type": "array", "items": {"type": "object"}}}},
                "Problem": {"type": "object", "required": ["type", "title", "status"], "properties": {
                    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                    "detail": {"type": "string"}, "correlation_id": {"type": "string"}}},
            },
        },
    }
