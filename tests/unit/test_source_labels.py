"""The source label of middleware_source_last_received_timestamp_seconds is bounded (issue 14, memory)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from middleware.journal.hooks import INGEST_HEADER, MAX_SOURCE_LABELS, OTHER_SOURCE, route_received
from middleware.observe import Metrics

METRIC = "middleware_source_last_received_timestamp_seconds"


def _sources(registry: CollectorRegistry) -> set[str]:
    return {sample.labels["source"] for family in registry.collect() if family.name == METRIC
            for sample in family.samples}


def test_source_labels_stop_growing_at_the_bound_and_known_sources_keep_theirs() -> None:
    registry = CollectorRegistry()
    worker = SimpleNamespace(route=SimpleNamespace(name="adt-inbound"), metrics=Metrics(registry))
    route_received(worker, SimpleNamespace(headers={INGEST_HEADER: "mllp:ehr-adt"}))
    for n in range(MAX_SOURCE_LABELS * 3):  # e.g. a client writing an id into x-mw-ingest
        route_received(worker, SimpleNamespace(headers={INGEST_HEADER: f"client-{n}".encode()}))
    route_received(worker, SimpleNamespace(headers={INGEST_HEADER: "mllp:ehr-adt"}))
    sources = _sources(registry)
    assert len(sources) == MAX_SOURCE_LABELS + 1
    assert OTHER_SOURCE in sources and "mllp:ehr-adt" in sources
    assert f"client-{MAX_SOURCE_LABELS * 3 - 1}" not in sources


def test_each_metrics_registry_has_its_own_bound() -> None:
    for _ in range(2):
        registry = CollectorRegistry()
        worker = SimpleNamespace(route=SimpleNamespace(name="r"), metrics=Metrics(registry))
        route_received(worker, SimpleNamespace(headers={INGEST_HEADER: "publish"}))
        assert _sources(registry) == {"publish"}
