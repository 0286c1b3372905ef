"""Splitting a FHIR transaction Bundle: what each entry's message costs, as shipped and as the alternative.

Shipped: each message is a small Bundle holding the entry and the entries it references (the Patient
for every Observation). Alternative measured beside it: every message is the whole bundle plus a
pointer to its entry. Figures: split time, bytes put on the queue, time for the route to parse every
message. Pure CPU, no broker::

    .venv/bin/python bench/fhir_bundle.py --entries 1000
"""

from __future__ import annotations

import argparse
import io
import time
from typing import Any

import orjson

from middleware.formats import SplitInfo, get_format


def transaction(entries: int) -> dict[str, Any]:
    """A Patient (urn:uuid) then Observations whose subject names it: a typical lab-results transaction."""
    patient_url = "urn:uuid:00000000-0000-4000-8000-000000000000"
    patient = {"fullUrl": patient_url, "request": {"method": "POST", "url": "Patient"},
               "resource": {"resourceType": "Patient", "identifier": [{"type": {"coding": [{"code": "MR"}]},
                                                                        "value": "MRN-1"}],
                            "name": [{"family": "Kato", "given": ["Hana"]}], "birthDate": "1980-02-03"}}
    observations = [{"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{n:012d}",
                     "request": {"method": "POST", "url": "Observation"},
                     "resource": {"resourceType": "Observation", "status": "final",
                                  "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4",
                                                       "display": "Heart rate"}]},
                                  "subject": {"reference": patient_url}, "effectiveDateTime": "2026-11-24T08:00:00Z",
                                  "valueQuantity": {"value": 60 + n % 40, "unit": "/min"}}}
                    for n in range(1, entries)]
    return {"resourceType": "Bundle", "id": "tx", "type": "transaction", "entry": [patient, *observations]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1000)
    entries = parser.parse_args().entries
    fhir = get_format("fhir")
    raw = orjson.dumps(transaction(entries))
    fhir.parse(raw)  # the first parse imports the FHIR model registry: not part of the figures

    started = time.perf_counter()
    records = list(fhir.split(io.BytesIO(raw), SplitInfo()))
    split_s = time.perf_counter() - started
    started = time.perf_counter()
    for record in records:
        fhir.parse(record.raw)
    parse_s = time.perf_counter() - started
    shipped = sum(len(r.raw) for r in records)

    whole = [raw + orjson.dumps({"entry": n}) for n in range(entries)]  # the bundle plus a pointer, per entry
    started = time.perf_counter()
    for body in whole[:50]:
        orjson.loads(body[:len(raw)])
    whole_parse_s = (time.perf_counter() - started) * entries / 50
    whole_bytes = sum(len(b) for b in whole)

    print(f"bundle: {entries} entries, {len(raw):,} bytes")
    print(f"shipped (entry + what it references): split {split_s * 1000:.1f} ms, {shipped:,} bytes on the queue "
          f"({shipped / len(raw):.2f} x the bundle), route parse of all {parse_s * 1000:.1f} ms")
    print(f"whole bundle per entry: {whole_bytes:,} bytes on the queue ({whole_bytes / len(raw):.0f} x the bundle), "
          f"route parse of all ~{whole_parse_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
