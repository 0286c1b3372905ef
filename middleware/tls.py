"""Client-side TLS settings shared by the broker (``broker.tls``) and HTTP connectors (``tls:``).

One small frozen value parsed from YAML and one function that turns it into an ``ssl.SSLContext``:
the system trust store plus an optional CA bundle, an optional client certificate (mutual TLS),
and certificate checks that can be switched off only explicitly (``verify: false``).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TLS_KEYS = ("ca_file", "cert_file", "key_file", "verify")


@dataclass(frozen=True)
class TlsOptions:
    """Where a client finds its trust anchors and its own certificate.

    Parameters:
        ca_file: PEM bundle of CAs trusted in addition to the system store (a private CA).
        cert_file: PEM client certificate (or certificate + key) presented for mutual TLS.
        key_file: PEM private key of ``cert_file`` when it is kept apart.
        verify: check the server's certificate and host name; ``False`` only for a lab.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    @classmethod
    def from_yaml(cls, block: Mapping[str, Any] | None, root: Path) -> TlsOptions | None:
        """The value of a schema-checked ``tls:`` block; relative paths resolve against ``root``."""
        if block is None:
            return None

        def path(key: str) -> str | None:
            value = block.get(key)
            return None if value is None else str(root / str(value))  # an absolute value stays as it is

        return cls(ca_file=path("ca_file"), cert_file=path("cert_file"), key_file=path("key_file"),
                   verify=bool(block.get("verify", True)))

    def problems(self) -> list[tuple[str, str]]:
        """``(key, message)`` for every setting that cannot work: a file that is not there or not
        PEM, a key without a certificate. Checked by ``middleware validate``."""
        found: list[tuple[str, str]] = []
        for key in ("ca_file", "cert_file", "key_file"):
            value: str | None = getattr(self, key)
            if value is not None and not Path(value).is_file():
                found.append((key, f"{key}: no such file {value}"))
        if self.key_file and not self.cert_file:
            found.append(("key_file", "key_file needs cert_file (the certificate it belongs to)"))
        if not found:
            try:
                client_context(self)
            except (ssl.SSLError, OSError, ValueError) as exc:
                key = "cert_file" if self.cert_file else "ca_file"
                found.append((key, f"{key}: cannot load the PEM files ({type(exc).__name__}: {exc})"))
        return found


def client_context(options: TlsOptions | None) -> ssl.SSLContext:
    """A client ``SSLContext`` (TLS 1.2 or later) for ``options``; the defaults when ``None``.

    Raises ``ssl.SSLError`` / ``OSError`` when a file cannot be read or is not PEM.
    """
    options = options or TlsOptions()
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.ca_file:
        context.load_verify_locations(cafile=options.ca_file)
    if options.cert_file:
        context.load_cert_chain(options.cert_file, options.key_file)
    if not options.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
