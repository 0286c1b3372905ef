"""Benchmark: HL7 v2 parsing on the hot path, ours vs hl7apy vs python-hl7, in one run.

Measures messages/s per core for:
  - our lazy tokenizer + the adt-inbound mapping (parse, filter, pick the event rule, map);
  - the same plus JSON Schema validation and the CloudEvents envelope (the whole pure route);
  - our tokenizer alone reading the fields the route reads;
  - python-hl7 ``hl7.parse`` (parse only);
  - hl7apy ``parse_message`` (parse only, find_groups=False);
  - a map of ten fields by plain paths beside the same ten fields by CEL ``expr:`` (upper, join,
    coalesce, date, substring, a conditional...), by ten bare ``expr: path('X')``, and by JSONata
    (``jsonata-python``, only when installed: the language we measured against CEL; issue 13).
Inputs: the ADT A01/A03/A04/A08/A40 messages of ../shared/corpus plus samples/adt-inbound.

Run: .venv/bin/python bench/hl7_parse.py [--seconds 3]

On a loaded machine, count instructions instead (deterministic): ``--passes N`` runs only the whole route
N times over the messages after one warm-up pass; the difference between two runs under callgrind is the
route's cost, e.g. ``valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python
bench/hl7_parse.py --passes 30`` minus the same with ``--passes 0``, divided by 30 x the message count.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import rate  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus" / "hl7v2" / "fhir-converter"


def load_messages() -> list[bytes]:
    from middleware.errors import PipelineError
    from middleware.project import load_project
    from middleware.route import transform

    route = load_project(REPO, {}).routes["adt-inbound"]
    candidates = sorted(CORPUS.glob("ADT*.hl7")) + sorted((REPO / "samples" / "adt-inbound").glob("a*.hl7"))
    messages = []
    for path in candidates:
        raw = path.read_bytes()
        try:
            outcome = transform(route, raw)
        except PipelineError:
            continue
        if outcome.events:  # only messages the route turns into events: the real hot path
            messages.append(raw)
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per contender")
    parser.add_argument("--passes", type=int, default=None,
                        help="only run the whole route this many times over the messages (for callgrind)")
    args = parser.parse_args()

    from middleware.formats import get_format
    from middleware.mapping import apply_rules
    from middleware.project import load_project
    from middleware.route import transform

    messages = load_messages()
    route = load_project(REPO, {}).routes["adt-inbound"]
    if args.passes is not None:
        for raw in messages:  # warm-up: caches filled, as in the timed runs
            transform(route, raw)
        started = time.process_time()
        for _ in range(args.passes):
            for raw in messages:
                transform(route, raw)
        spent = time.process_time() - started
        print(f"messages: {len(messages)}, passes: {args.passes}, CPU {spent:.3f} s")
        return
    fmt = get_format("hl7v2")
    paths = [fmt.compile_path(p) for p in ("PID-3[5=MR].1", "PID-3.1", "PID-5.1", "PID-5.2", "PID-5.3", "PID-7",
                                           "PID-8", "PID-11.1", "PID-11.3", "PV1-2", "PV1-3.1", "PV1-3.2", "PV1-3.3",
                                           "PV1-19.1", "PV1-44", "EVN-2", "EVN-6", "MSH-9.1", "MSH-9.2", "MSH-10")]

    def ours_route(raw: bytes) -> object:
        return transform(route, raw)

    def ours_mapping(raw: bytes) -> object:
        doc = route.format.parse(raw)
        if route.filter is not None and not route.filter.matches(doc):
            return None
        rule = next(r for r in route.events if r.when is None or r.when.matches(doc))
        return apply_rules(rule.fields, doc)

    def ours_fields(raw: bytes) -> object:
        doc = fmt.parse(raw)
        return [p.read(doc) for p in paths]

    import hl7  # python-hl7

    def normalized(raw: bytes) -> str:
        return raw.decode("utf-8-sig", "replace").replace("\r\n", "\r").replace("\n", "\r").strip("\r")

    def python_hl7(raw: bytes) -> object:
        return hl7.parse(normalized(raw))

    from hl7apy.parser import parse_message

    def hl7apy_parse(raw: bytes) -> object:
        return parse_message(normalized(raw), find_groups=False)

    contenders = expression_contenders(fmt)
    warnings.simplefilter("ignore")
    print(f"messages: {len(messages)} ADT messages that adt-inbound turns into events; {args.seconds:.1f}s each")
    results = {}
    for name, fn in (("ours: tokenizer + adt-inbound mapping (parse, filter, map)", ours_mapping),
                     ("ours: whole route (+ schema validation, CloudEvents envelope)", ours_route),
                     ("ours: tokenizer + 20 field reads", ours_fields),
                     ("python-hl7 hl7.parse (parse only)", python_hl7),
                     ("hl7apy parse_message (parse only)", hl7apy_parse),
                     *contenders):
        seconds = args.seconds if "hl7apy" not in name else max(args.seconds, 2.0)
        results[name] = rate(fn, messages, seconds)
    baseline = results["hl7apy parse_message (parse only)"]
    print(f"{'contender':70} {'msg/s':>10} {'x hl7apy':>9}")
    for name, value in results.items():
        print(f"{name:70} {value:10,.0f} {value / baseline:9.1f}")


PLAIN_TEN = {"mrn": "PID-3.1", "family": "PID-5.1", "given": "PID-5.2", "birth": "PID-7", "sex": "PID-8",
             "facility": "PV1-3.1", "city": "PID-11.3", "class": "PV1-2", "event": "MSH-9.2", "id": "MSH-10"}
CEL_TEN = {
    "mrn": "trim(path('PID-3.1'))",
    "family": "upper(path('PID-5.1'))",
    "given": "join([path('PID-5.2'), path('PID-5.3'), path('PID-5.1')], ' ')",
    "birth": "date(path('PID-7'))",
    "sex": "lower(coalesce(path('PID-8'), 'U'))",
    "facility": "substring(coalesce(path('PV1-3.1'), ''), 0, 3)",
    "city": "coalesce(path('PID-11.3'), path('PID-11.1'))",
    "class": "path('PV1-2') == 'I' ? 'inpatient' : 'other'",
    "event": "coalesce(path('MSH-9.1'), '') + '^' + coalesce(path('MSH-9.2'), '')",
    "id": "path('MSH-10')",
}
JSONATA_TEN = {  # the same ten over a dict of the paths' first values (JSONata cannot read HL7 itself)
    "mrn": "$trim(p0)", "family": "$uppercase(p1)", "given": "$join([p2, p10, p1], ' ')",
    "birth": "$substring(p3, 0, 4) & '-' & $substring(p3, 4, 2) & '-' & $substring(p3, 6, 2)",
    "sex": "$lowercase(p4 ? p4 : 'U')", "facility": "$substring(p5 ? p5 : '', 0, 3)", "city": "p6 ? p6 : p11",
    "class": "p7 = 'I' ? 'inpatient' : 'other'", "event": "p12 & '^' & p8", "id": "p9",
}
JSONATA_PATHS = ["PID-3.1", "PID-5.1", "PID-5.2", "PID-7", "PID-8", "PV1-3.1", "PID-11.3", "PV1-2", "MSH-9.2",
                 "MSH-10", "PID-5.3", "PID-11.1", "MSH-9.1"]


def expression_contenders(fmt: object) -> list[tuple[str, object]]:
    """Ten fields mapped by plain paths, by CEL expressions doing work, by bare CEL paths, by JSONata."""
    from middleware.mapping import apply_rules, compile_field

    def rules(spec: dict[str, object]) -> tuple[object, ...]:
        return tuple(compile_field(k, v, fmt, {}) for k, v in spec.items())  # type: ignore[arg-type]

    plain = rules(PLAIN_TEN)
    cel_work = rules({k: {"expr": v} for k, v in CEL_TEN.items()})
    cel_bare = rules({k: {"expr": f"path('{v}')"} for k, v in PLAIN_TEN.items()})
    found = [("map: 10 plain paths", lambda raw: apply_rules(plain, fmt.parse(raw))),  # type: ignore[attr-defined]
             ("map: 10 CEL expr (functions, conditional)",
              lambda raw: apply_rules(cel_work, fmt.parse(raw))),  # type: ignore[attr-defined]
             ("map: 10 CEL expr: path('X') alone", lambda raw: apply_rules(cel_bare, fmt.parse(raw)))]  # type: ignore[attr-defined]
    try:
        import jsonata
    except ImportError:
        return found
    programs = [(k, jsonata.Jsonata(v)) for k, v in JSONATA_TEN.items()]
    accessors = [fmt.compile_path(p) for p in JSONATA_PATHS]  # type: ignore[attr-defined]

    def with_jsonata(raw: bytes) -> object:
        doc = fmt.parse(raw)  # type: ignore[attr-defined]
        values = {f"p{n}": found[0] for n, a in enumerate(accessors) if (found := a.read(doc))}  # absent: undefined
        return {k: p.evaluate(values) for k, p in programs}

    return [*found, ("map: 10 JSONata expressions (jsonata-python)", with_jsonata)]


if __name__ == "__main__":
    main()
