"""JSON Schemas of our own YAML files: config/middleware.yaml, routes/, connectors/, lookups/.

One source of truth for which keys exist; docs/ and `middleware validate` follow these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from middleware.durations import DURATION, DURATION_OR_FOREVER
from middleware.ordering import SCHEMA as ORDERING
from middleware.tracing import SCHEMA as TRACING

NAME: dict[str, Any] = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"}
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
        "delays": {"type": "array", "minItems": 1, "maxItems": 20, "items": DURATION},
        "max_age": DURATION_OR_FOREVER,
    },
}

BREAKER: dict[str, Any] = {  # middleware.delivery.base.BreakerPolicy
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "failures": {"type": "integer", "minimum": 1},
        "probe_every": DURATION,
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

# Pieces shared by the gateways' own specs (middleware/ingest/<kind>.py SPEC).
ALLOWED_PEERS: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1},
                                 "description": "IP addresses / CIDR networks allowed to connect (default: any)"}
SERVER_TLS: dict[str, Any] = {  # middleware.ingest.MllpTls (MLLP and HTTP listeners); paths relative to the project
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
        "journal": {  # middleware.journal.JournalSettings
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                "url": {"type": "string", "pattern": "^(sqlite:///|postgres(ql)?://)"},
                "retention": DURATION,
                "batch_size": {"type": "integer", "minimum": 1, "maximum": 100000},
                "flush_interval": DURATION,
                "max_queue": {"type": "integer", "minimum": 1},
            },
        },
        "tracing": TRACING,  # middleware.tracing.TracingSettings
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
            "route": NAME,
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
            "sla": {  # middleware.journal.Sla
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "properties": {
                    "deliver_within": DURATION,
                    "silent_after": DURATION,
                    "max_error_rate": {"type": "number", "minimum": 0, "maximum": 1},
                },
            },
            "deliver": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["to"],
                    "properties": {"to": NAME, "retry": RETRY,
                                   "when": _CONDITION,  # checked by middleware.delivery.outbound.compile_when
                                   "map": {"type": "object", "minProperties": 1,
                                           "additionalProperties": {"type": ["string", "object"]}},
                                   "ordering": ORDERING},  # checked by middleware.ordering.ordering_problems
                },
            },
        },
    }


def connector_schema(types: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Schema of connectors/<name>.yaml; ``types``: each registered connector type's spec (its own
    keys, :mod:`middleware.spec`): an http connector with ``path:`` is an unknown key."""
    common: dict[str, Any] = {
        "connector": NAME,
        "type": {"enum": list(types)},
        "description": {"type": "string"},
        "retry": RETRY,
        "breaker": BREAKER,
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
