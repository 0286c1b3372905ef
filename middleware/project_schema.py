"""JSON Schemas of our own YAML files: config/middleware.yaml, routes/, connectors/, lookups/.

One source of truth for which keys exist; docs/ and `middleware validate` follow these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"}
_CONDITION = {"type": "object"}  # keys are checked by middleware.mapping.compile_condition

TLS_CLIENT: dict[str, Any] = {  # middleware.tls.TlsOptions: broker.tls and a connector's tls
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "ca_file": {"type": "string", "minLength": 1},
        "cert_file": {"type": "string", "minLength": 1},
        "key_file": {"type": "string", "minLength": 1},
        "verify": {"type": "boolean"},
    },
}

RETRY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "attempts": {"type": "integer", "minimum": 1, "maximum": 100},
        "backoff": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "initial": {"type": "number", "minimum": 0},
                "max": {"type": "number", "minimum": 0},
                "multiplier": {"type": "number", "minimum": 1},
                "jitter": {"type": "number", "minimum": 0},
            },
        },
        "retry_on": {
            "type": "array",
            "items": {"enum": ["connection", "timeout", "429", "5xx"]},
            "uniqueItems": True,
        },
    },
}

OAUTH2_CLIENT_CREDENTIALS: dict[str, Any] = {  # middleware.delivery.auth.ClientCredentials
    "type": "object",
    "additionalProperties": False,
    "required": ["token_url", "client_id", "client_secret"],
    "properties": {
        "token_url": {"type": "string", "pattern": "^https?://"},
        "client_id": {"type": "string", "minLength": 1},
        "client_secret": {"type": "string", "minLength": 1},
        "scope": {"type": "string"},
        "audience": {"type": "string"},
        "client_auth": {"enum": ["basic", "post"]},
        "refresh_margin": {"type": "number", "minimum": 0},
    },
}

MLLP_LISTENER: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port", "queue"],
    "properties": {
        "name": {**_NAME, "description": "in logs and in the `x-mw-ingest` header (`mllp:<name>`); "
                                         "default `mllp-<port>`"},
        "host": {"type": "string", "minLength": 1, "default": "127.0.0.1",
                 "description": "address to listen on; `0.0.0.0` accepts other hosts (then set allowed_peers, tls)"},
        "port": {"type": "integer", "minimum": 0, "maximum": 65535, "description": "TCP port (0: any free port)"},
        "queue": {"type": "string", "minLength": 1, "description": "a route's `source.queue`: where it publishes"},
        "ack": {"enum": ["after-confirm", "none"], "default": "after-confirm",
                "description": "answer each message after the broker's confirm, or never answer"},
        "max_message_bytes": {"type": "integer", "minimum": 64, "default": 1_048_576,
                              "description": "largest frame; a larger one is answered AE, then the connection closes"},
        "idle_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 300,
                         "description": "seconds without a byte before a connection is closed"},
        "frame_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 60,
                          "description": "seconds from a start block to its end block"},
        "max_connections": {"type": "integer", "minimum": 1, "default": 500,
                            "description": "connections open at once; more are closed at accept"},
        "max_buffered_bytes": {"type": "integer", "minimum": 64, "default": 33_554_432,  # >= max_message_bytes
                               "description": "unfinished frames of all connections together; past it the "
                                              "connection holding the most is dropped"},
        "allowed_peers": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1},
                          "description": "IP addresses / CIDR networks allowed to connect (default: any)"},
        "tls": {  # middleware.ingest.MllpTls; paths relative to the project folder
            "type": "object",
            "additionalProperties": False,
            "required": ["cert_file", "key_file"],
            "description": "TLS: `cert_file`, `key_file`, optional `ca_file` (client certificates are "
                           "checked against it) and `require_client_cert` (mutual TLS); paths relative to the project",
            "properties": {
                "cert_file": {"type": "string", "minLength": 1},
                "key_file": {"type": "string", "minLength": 1},
                "ca_file": {"type": "string", "minLength": 1},
                "require_client_cert": {"type": "boolean"},
            },
        },
    },
}

_SECRETS = {"type": "array", "items": {"type": "string"}}  # from ${ENV}; empty ones are refused at start

HTTP_LISTENER: dict[str, Any] = {  # middleware.ingest.HttpListener (docs/ingest.md)
    "type": "object",
    "additionalProperties": False,
    "required": ["port", "auth"],
    "properties": {
        "name": _NAME,
        "host": {"type": "string", "minLength": 1},
        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
        "auth": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {"bearer_tokens": _SECRETS, "api_keys": _SECRETS},
        },
        "routes": {"type": "array", "minItems": 1, "items": _NAME},
        "max_body_bytes": {"type": "integer", "minimum": 64},
        "rate_limit": {
            "type": "object",
            "additionalProperties": False,
            "required": ["per_second"],
            "properties": {"per_second": {"type": "number", "exclusiveMinimum": 0},
                           "burst": {"type": "integer", "minimum": 1}},
        },
        "idempotency_window": {"type": "number", "minimum": 0},
        "idempotency_max_keys": {"type": "integer", "minimum": 1},
        "confirm_timeout": {"type": "number", "exclusiveMinimum": 0},
        "allowed_peers": MLLP_LISTENER["properties"]["allowed_peers"],
        "tls": MLLP_LISTENER["properties"]["tls"],
    },
}

FOLDER_LISTENER: dict[str, Any] = {  # middleware.ingest.FolderListener (docs/ingest.md, "Watched folder")
    "type": "object",
    "additionalProperties": False,
    "required": ["path"],
    "oneOf": [{"required": ["queue"]}, {"required": ["route"]}],
    "properties": {
        "name": {**_NAME, "description": "in logs, metrics and the `x-mw-ingest` header (`folder:<name>`); "
                                         "default `folder-<n>`"},
        "path": {"type": "string", "minLength": 1,
                 "description": "the inbox (relative: to the project folder); `processing/` is made inside it"},
        "queue": {"type": "string", "minLength": 1, "description": "a route's `source.queue` (or `route`)"},
        "route": {**_NAME, "description": "the route its files are published to (or `queue`)"},
        "pattern": {"type": "string", "minLength": 1, "default": "*", "description": "glob a file name must match"},
        "complete": {"enum": ["stable", "marker"], "default": "stable",
                     "description": "`stable`: size and mtime unchanged for `min_age`; `marker`: a `<name>.done` "
                                    "file beside it"},
        "min_age": {"type": "number", "minimum": 0, "default": 2,
                    "description": "seconds a file must stay unchanged (`complete: stable`)"},
        "poll_interval": {"type": "number", "exclusiveMinimum": 0, "default": 1,
                          "description": "seconds between looks at the inbox"},
        "done": {"type": "string", "minLength": 1, "default": "<path>/done",
                 "description": "where files read to the end go, with their report"},
        "failed": {"type": "string", "minLength": 1, "default": "<path>/failed",
                   "description": "where files that cannot be read go, with their report"},
    },
}

CONFIG: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "ingest": {"type": "object"},  # one key per registered gateway kind: config_schema()
        "broker": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "url": {"type": "string", "minLength": 1},
                "queue_prefix": {"type": "string"},
                "tls": TLS_CLIENT,
            },
        },
        "engine": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "prefetch": {"type": "integer", "minimum": 1, "maximum": 10000},
                "delivery_limit": {"type": "integer", "minimum": 1, "maximum": 1000},
                "timezone": {"type": "string"},
                "drain_timeout": {"type": "number", "minimum": 0},
            },
        },
        "metrics": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "host": {"type": "string"},
                "port": {"type": "integer", "minimum": 0, "maximum": 65535},
            },
        },
        "audit": {  # middleware.audit.AuditLog
            "type": "object",
            "additionalProperties": False,
            "properties": {"path": {"type": "string", "minLength": 1}},
        },
    },
}


def config_schema(gateways: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Schema of config/middleware.yaml; ``gateways``: the spec of one listener entry by gateway kind
    (``ingest.<kind>[]``, :func:`middleware.ingest.gateway_specs`)."""
    ingest = {"type": "object", "additionalProperties": False,
              "properties": {kind: {"type": "array", "items": {**spec, "additionalProperties": False}}
                             for kind, spec in gateways.items()}}  # a spec lists every key of an entry
    return {**CONFIG, "properties": {**CONFIG["properties"], "ingest": ingest}}


def _per_kind(key: str, base: dict[str, Any], specs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``if key == name then only base + that component's keys`` for each registered component.

    ``x-key-of`` (ignored by the validator) names the component another key belongs to, so an http
    connector's ``path:`` is reported as a key of ``type: file``.
    """
    owners = {k: name for name, spec in specs.items() for k in spec.get("properties", {}) if k not in base}
    return [{"if": {"required": [key], "properties": {key: {"const": name}}},
             "then": {"properties": {**base, **spec.get("properties", {})}, "additionalProperties": False,
                      "required": list(spec.get("required", [])),
                      "x-key-of": {k: f"{key}: {owner}" for k, owner in owners.items()
                                   if k not in spec.get("properties", {})}}}
            for name, spec in specs.items()]


def route_schema(formats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Schema of routes/<name>.yaml; ``formats``: each registered input format's spec (its own
    ``source`` keys, :mod:`middleware.spec`)."""
    source_keys: dict[str, Any] = {"queue": {"type": "string", "minLength": 1}, "format": {"enum": list(formats)},
                                   "split": {"type": "boolean"}}  # false: each input one message (a Bundle whole)
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["route", "source", "events"],
        "properties": {
            "route": _NAME,
            "description": {"type": "string"},
            "source": {
                "type": "object",
                "required": ["queue", "format"],
                "properties": source_keys,
                "allOf": _per_kind("format", source_keys, formats),
            },
            "filter": _CONDITION,
            "match": {"enum": ["first", "all"]},
            "validation": {"enum": ["lenient", "strict"]},
            "events": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["type", "version", "map"],
                    "properties": {
                        "when": _CONDITION,
                        "type": {"type": "string", "pattern": "^[a-z][a-z0-9_]*(\\.[a-z][a-z0-9_]*)+$"},
                        "version": {"type": "integer", "minimum": 1},
                        "subject": {"type": "string"},
                        "for_each": {"type": "string", "minLength": 1},
                        "map": {
                            "type": "object",
                            "minProperties": 1,
                            "additionalProperties": {"type": ["string", "object"]},
                        },
                    },
                },
            },
            "deliver": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["to"],
                    "properties": {"to": _NAME, "retry": RETRY},
                },
            },
        },
    }


def connector_schema(types: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Schema of connectors/<name>.yaml; ``types``: each registered connector type's spec (its own
    keys, :mod:`middleware.spec`): an http connector with ``path:`` is an unknown key."""
    common: dict[str, Any] = {
        "connector": _NAME,
        "type": {"enum": list(types)},
        "description": {"type": "string"},
        "retry": RETRY,
    }
    return {
        "type": "object",
        "required": ["connector", "type"],
        "properties": common,
        "allOf": _per_kind("type", common, types),
    }


LOOKUP: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["values"],
    "properties": {
        "description": {"type": "string"},
        "values": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
        "default": {"type": ["string", "number", "boolean"]},
    },
}
