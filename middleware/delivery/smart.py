"""SMART Backend Services (HL7 FHIR SMART App Launch 2, "client-confidential-asymmetric"): the client
credentials grant authenticated with a short-lived JWT signed by the client's private key.

Each token request carries a new assertion (``iss`` = ``sub`` = client id, ``aud`` = token URL,
``exp`` at most five minutes ahead, a unique ``jti``), signed RS384 or ES384 as the spec requires;
the server verifies it with the public key registered for the client (its JWKS). Tokens are cached
and refreshed by :class:`middleware.delivery.auth.TokenCache` like any OAuth2 token.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from middleware.delivery.auth import DEFAULT_REFRESH_MARGIN

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300  # seconds: the spec's maximum
ALGORITHMS = ("RS384", "ES384")
DEFAULT_SCOPE = "system/*.write"

SPEC: dict[str, Any] = {  # a fhir connector's ``smart:`` block
    "type": "object",
    "additionalProperties": False,
    "required": ["token_url", "client_id"],
    "properties": {
        "token_url": {"type": "string", "pattern": "^https?://"},
        "client_id": {"type": "string", "minLength": 1},
        "private_key_file": {"type": "string", "minLength": 1},
        "private_key": {"type": "string", "minLength": 1},
        "algorithm": {"enum": list(ALGORITHMS)},
        "kid": {"type": "string", "minLength": 1},
        "scope": {"type": "string", "minLength": 1},
        "refresh_margin": {"type": "number", "minimum": 0},
    },
}


def load_key(block: Mapping[str, Any]) -> Any:
    """The private key of a ``smart:`` block (``private_key`` PEM text, else ``private_key_file``);
    raises ``ValueError`` saying what is wrong (never the key)."""
    # imported here, like jwt below: PyJWT and cryptography cost 9 MB of every engine's memory,
    # and only a fhir connector with a smart: block uses them
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if block.get("private_key"):
        pem = str(block["private_key"]).encode()
    elif block.get("private_key_file"):
        try:
            pem = Path(str(block["private_key_file"])).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read private_key_file: {exc.strerror or type(exc).__name__}") from None
    else:
        raise ValueError("set private_key_file (a PEM file) or private_key (PEM text from ${ENV})")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ValueError("the private key is not an unencrypted PEM private key") from None
    algorithm = str(block.get("algorithm", "RS384"))
    if algorithm == "RS384" and not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("algorithm RS384 needs an RSA private key (use ES384 for an EC key)")
    if algorithm == "ES384" and not (isinstance(key, ec.EllipticCurvePrivateKey)
                                     and isinstance(key.curve, ec.SECP384R1)):
        raise ValueError("algorithm ES384 needs an EC P-384 private key")
    return key


@dataclass(frozen=True)
class SmartBackend:
    """A ``smart:`` block: who we are to the token endpoint and the key we sign assertions with."""

    token_url: str
    client_id: str
    key: Any = field(repr=False)
    algorithm: str = "RS384"
    kid: str | None = None
    scope: str = DEFAULT_SCOPE
    refresh_margin: float = DEFAULT_REFRESH_MARGIN

    @classmethod
    def from_options(cls, block: Mapping[str, Any]) -> SmartBackend:
        """From a schema-checked block; raises ``ValueError`` when the key cannot be used."""
        return cls(token_url=str(block["token_url"]), client_id=str(block["client_id"]), key=load_key(block),
                   algorithm=str(block.get("algorithm", "RS384")),
                   kid=str(block["kid"]) if block.get("kid") else None,
                   scope=str(block.get("scope", DEFAULT_SCOPE)),
                   refresh_margin=float(block.get("refresh_margin", DEFAULT_REFRESH_MARGIN)))

    def assertion(self, now: float | None = None) -> str:
        """A fresh signed client assertion (single use: new ``jti`` every time)."""
        import jwt

        issued = int(now if now is not None else time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                  "exp": issued + ASSERTION_LIFETIME, "iat": issued, "jti": str(uuid.uuid4())}
        headers = {"typ": "JWT", **({"kid": self.kid} if self.kid else {})}
        return jwt.encode(claims, self.key, algorithm=self.algorithm, headers=headers)

    def token_request(self) -> tuple[dict[str, str], dict[str, str]]:
        """Form fields and headers of one token request (the :class:`TokenRequest` protocol)."""
        form = {"grant_type": "client_credentials", "scope": self.scope,
                "client_assertion_type": ASSERTION_TYPE, "client_assertion": self.assertion()}
        return form, {"Accept": "application/json"}
