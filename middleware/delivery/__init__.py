"""Connectors to downstream systems (one module per type) and the retry policy that wraps them."""

from middleware.delivery.base import (
    Connector,
    ConnectorSpec,
    Delivery,
    RetryPolicy,
    connector_types,
    make_connector,
    register,
)

__all__ = ["Connector", "ConnectorSpec", "Delivery", "RetryPolicy", "connector_types", "make_connector", "register"]
