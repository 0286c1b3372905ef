"""Ingest gateways: how source systems that cannot speak AMQP get messages onto route queues.

Each gateway publishes raw bytes to a route's inbound queue and answers the sender only after
the broker confirmed the message. Settings come from ``ingest:`` in config/middleware.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MllpListener:
    """One ``ingest.mllp[]`` entry: an MLLP (HL7 over TCP) listener feeding one route queue.

    ``ack``: ``after-confirm`` (default) sends the HL7 ACK only once the broker confirmed the
    message; ``none`` sends no ACK (senders that do not read them).
    """

    name: str
    port: int
    queue: str  # a route's source.queue (without the queue prefix)
    host: str = "127.0.0.1"
    ack: str = "after-confirm"
    max_message_bytes: int = 1_048_576
    idle_timeout: float = 300.0
    file: str = ""
    line: int = 0
