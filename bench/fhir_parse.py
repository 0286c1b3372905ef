"""Benchmark: FHIR on the hot path (orjson + compiled FHIRPath) vs fhir.resources models, in one run.

Measures messages/s per core for:
  - the whole pure fhir-inbound route (parse, filter, map, JSON Schema validation, envelope);
  - our parse alone (orjson + resource type check);
  - the same route with ``validation: strict`` (adds a fhir.resources R4B model build per message);
  - fhir.resources ``model_validate`` alone on the decoded JSON.
Inputs: the valid resources of samples/fhir-inbound.

Run: .venv/bin/python bench/fhir_parse.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import rate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    seconds = parser.parse_args().seconds

    from fhir.resources.R4B import get_fhir_model_class

    from middleware.formats.fhir import parse
    from middleware.project import load_project
    from middleware.route import transform

    route = load_project(REPO, {}).routes["fhir-inbound"]
    strict = dataclasses.replace(route, validation="strict")
    messages = [p.read_bytes() for p in sorted((REPO / "samples" / "fhir-inbound").glob("*.json"))
                if not p.name.startswith("malformed")]

    def models(raw: bytes) -> object:
        data = orjson.loads(raw)
        return get_fhir_model_class(data["resourceType"]).model_validate(data)

    cases: list[tuple[str, Callable[[bytes], object]]] = [
        ("fhir-inbound route (lenient, whole pipeline)", lambda raw: transform(route, raw)),
        ("parse only (orjson + type check)", parse),
        ("fhir-inbound route (validation: strict)", lambda raw: transform(strict, raw)),
        ("fhir.resources model_validate only", models),
    ]
    print(f"{len(messages)} resources, {seconds:g}s per case")
    for name, fn in cases:
        print(f"{name:48} {rate(fn, messages, seconds):>10,.0f} msg/s")


if __name__ == "__main__":
    main()
