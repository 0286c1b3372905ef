"""Shared fixtures: the real RabbitMQ URL and a per-run queue-name prefix."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
AMQP_URL = os.environ.get("MIDDLEWARE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RUN_PREFIX = f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def amqp_url() -> str:
    """URL of the real RabbitMQ the tests use."""
    return AMQP_URL


@pytest.fixture
def queue_prefix() -> str:
    """A prefix unique to this test, under this run's prefix: tests delete what they declare."""
    return f"{RUN_PREFIX}{uuid.uuid4().hex[:6]}."
