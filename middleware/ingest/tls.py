"""The server-side TLS context of an ingest listener, from its ``tls:`` settings."""

from __future__ import annotations

import ssl

from middleware.ingest import MllpTls


def server_context(tls: MllpTls) -> ssl.SSLContext:
    """A TLS 1.2+ server context with ``tls``'s certificate; client certificates checked against ``ca_file``.

    Raises OSError (a file cannot be read) or ssl.SSLError (not PEM, key does not match).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        context.load_verify_locations(cafile=tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
