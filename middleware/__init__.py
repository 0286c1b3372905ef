"""Healthcare integration middleware: HL7 v2, FHIR, batch and REST in; versioned CloudEvents out.

The public Python API is what this package exports; every other module is private and may change:

- :class:`Publisher`: put messages on a route's inbound queue with broker confirms (async);
- :class:`SyncPublisher`: the same for code that is not async.

    from middleware import SyncPublisher
    with SyncPublisher("adt-inbound", project="/srv/integration") as publisher:
        correlation_id = publisher.publish(hl7_bytes)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from middleware.ingest.publisher import Publisher, SyncPublisher

__version__ = "0.1.0"
__all__ = ["Publisher", "SyncPublisher", "__version__"]


def __getattr__(name: str) -> Any:
    """Import the public classes on first use, so ``import middleware.<module>`` stays light."""
    if name in ("Publisher", "SyncPublisher"):
        from middleware.ingest import publisher

        return getattr(publisher, name)
    raise AttributeError(f"module 'middleware' has no attribute {name!r}")
