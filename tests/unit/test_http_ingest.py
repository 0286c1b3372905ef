"""HTTP ingest, the parts without sockets: bodies to records, the token bucket, the idempotency cache,
problem details and OperationOutcomes, trace headers, the OpenAPI document and the ingest.http settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from middleware.formats import get_format
from middleware.ingest import HttpListener, HttpRateLimit
from middleware.ingest.http import IdempotencyCache, Refused, TokenBucket, _trace
from middleware.ingest.http_bodies import accepted_types, media_type, read_body
from middleware.ingest.http_openapi import openapi_document
from middleware.project import check_project, load_project

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def oru(n: int) -> bytes:
    return (f"MSH|^~\\&|LIS|GHH|EPIC|GHH|20261124143000||ORU^R01|C-{n}|P|2.5.1\r"
            f"PID|1||MRN-{n}^^^GHH^MR\rOBR|1|O-{n}||2345-7^Glucose^LN\r").encode()


# -- bodies ----------------------------------------------------------------------------------------

def test_media_types_are_compared_without_parameters_or_case() -> None:
    assert media_type("Application/JSON; charset=utf-8") == "application/json"
    assert media_type(None) == ""
    assert accepted_types("hl7v2") == ("x-application/hl7-v2+er7", "application/hl7-v2")
    assert "text/csv" in accepted_types("json") and "text/csv" not in accepted_types("fhir")


def test_an_hl7_batch_body_is_split_by_the_format_one_record_per_message() -> None:
    body = b"BHS|^~\\&|LIS|GHH\r" + oru(1) + oru(2) + b"BTS|2\r"
    read = read_body(body, "x-application/hl7-v2+er7", get_format("hl7v2"))
    assert [r.raw for r in read.records] == [oru(1), oru(2)] and [r.position for r in read.records] == [1, 2]
    assert read.failed == 0 and read.unreadable == 0


def test_a_record_that_frames_but_does_not_parse_carries_its_reason_and_is_not_unreadable() -> None:
    read = read_body(oru(1) + b"MSH|^~|broken\r" + oru(3), "application/hl7-v2", get_format("hl7v2"))
    assert [r.error is None for r in read.records] == [True, False, True]
    assert read.failed == 1 and read.unreadable == 0


def test_invalid_json_is_one_unreadable_record_with_the_raw_body() -> None:
    read = read_body(b'{"referralId": ', "application/json", get_format("json"))
    [record] = read.records
    assert record.raw == b'{"referralId": ' and "not valid JSON" in str(record.error) and read.unreadable == 1


def test_fhir_json_without_resource_type_reads_but_is_not_a_message() -> None:
    read = read_body(b'{"id": "x", "status": "final"}', "application/fhir+json", get_format("fhir"))
    [record] = read.records
    assert record.error is not None and "resourceType" in record.error and read.unreadable == 0


def test_ndjson_is_one_record_per_non_empty_line_and_a_bad_line_is_unreadable() -> None:
    read = read_body(b'{"a": 1}\n\n{"a": 2}\r\n{"a": \n', "application/x-ndjson", get_format("json"))
    assert [(r.raw, r.position, r.error is None) for r in read.records] == [
        (b'{"a": 1}', 1, True), (b'{"a": 2}', 2, True), (b'{"a": ', 3, False)]
    assert read.unreadable == 1


def test_csv_rows_become_json_objects_keyed_by_the_header_and_a_ragged_row_is_unreadable() -> None:
    body = "\ufeffreferralId,patient,note\r\nREF-1,MRN-1,\"says \"\"hi\"\", twice\"\r\n\r\nREF-2,MRN-2\r\n".encode()
    read = read_body(body, "text/csv", get_format("json"))
    first, second = read.records
    assert orjson.loads(first.raw) == {"referralId": "REF-1", "patient": "MRN-1", "note": 'says "hi", twice'}
    assert second.position == 2 and "2 fields" in str(second.error) and read.unreadable == 1


@pytest.mark.parametrize("body, kind", [(b"", "application/json"), (b"\n\n", "application/x-ndjson"),
                                        (b"a,b\r\n", "text/csv"), (b"\xff\xfe", "text/csv")])
def test_a_body_without_any_message_is_unreadable(body: bytes, kind: str) -> None:
    read = read_body(body, kind, get_format("json"))
    assert read.records and all(r.error for r in read.records) and read.unreadable == len(read.records)


# -- limits and memory -----------------------------------------------------------------------------

def test_the_token_bucket_allows_a_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(HttpRateLimit(per_second=2.0, burst=3), clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # one token every 0.5 s
    clock.now += 0.5
    assert bucket.take() == 0.0 and bucket.take() > 0
    clock.now += 60
    assert [bucket.take() for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # never more than the burst


async def test_the_idempotency_cache_replays_within_the_window_and_refuses_another_body() -> None:
    clock = Clock()
    cache = IdempotencyCache(window=10, max_keys=100, clock=clock)
    entry, owner = cache.claim("r", "k", "digest-a")
    assert owner
    cache.settle("r", "k", entry, answer := Refused(422, "x", "t", "d").answer(fhir=False))
    again, owner = cache.claim("r", "k", "digest-a")
    assert not owner and await again.answer is answer
    with pytest.raises(Refused) as refused:
        cache.claim("r", "k", "digest-b")
    assert refused.value.status == 422 and refused.value.slug == "idempotency-key-reused"
    assert cache.claim("other-route", "k", "digest-b")[1]  # keys are per route
    clock.now += 10.5
    assert cache.claim("r", "k", "digest-b")[1]  # past the window: a new request


async def test_the_idempotency_cache_forgets_a_failed_answer_and_keeps_at_most_max_keys() -> None:
    cache = IdempotencyCache(window=10, max_keys=2, clock=Clock())
    entry, _ = cache.claim("r", "k", "d")
    cache.settle("r", "k", entry, None)  # a 503: the resend must publish
    assert await entry.answer is None and cache.claim("r", "k", "d")[1]
    for key in ("k2", "k3"):
        cache.claim("r", key, "d")
    assert cache.claim("r", "k", "d")[1]  # the oldest key went first


# -- answers -----------------------------------------------------------------------------------------

def test_errors_are_problem_details_or_an_operation_outcome_for_fhir_callers() -> None:
    refused = Refused(429, "rate-limited", "Too many requests", "over the rate", headers={"Retry-After": "2"})
    problem = refused.answer(fhir=False)
    assert problem.content_type == "application/problem+json" and problem.headers == {"Retry-After": "2"}
    assert json.loads(problem.body) == {"type": "urn:middleware:problem:rate-limited", "title": "Too many requests",
                                        "status": 429, "detail": "over the rate"}
    outcome = json.loads(refused.answer(fhir=True).body)
    assert outcome == {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "throttled", "details": {"text": "Too many requests"},
        "diagnostics": "over the rate"}]}


def test_the_correlation_id_comes_from_the_caller_else_the_trace_id_else_is_new() -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    def trace(**headers: str) -> tuple[str, dict[str, str]]:
        return _trace(make_mocked_request("POST", "/", headers=headers))

    assert trace(**{"X-Correlation-ID": "abc-1", "traceparent": traceparent}) == (
        "abc-1", {"traceparent": traceparent})
    assert trace(traceparent=traceparent) == ("4bf92f3577b34da6a3ce929d0e0e4736", {"traceparent": traceparent})
    invalid = "00-00000000000000000000000000000000-00f067aa0ba902b7-01"  # an all-zero trace id is invalid
    cid, kept = trace(traceparent=invalid)
    assert kept == {} and len(cid) == 36
    with pytest.raises(Refused) as refused:
        trace(**{"X-Correlation-ID": "has space"})
    assert refused.value.status == 400


def test_the_openapi_document_lists_each_route_with_its_media_types_and_the_auth_in_use() -> None:
    project = load_project(REPO, {"HTTP_INGEST_TOKEN": "x"})
    listener = HttpListener(name="rest", port=8080, bearer_tokens=("x",))
    document = openapi_document(listener, {"referrals-rest": project.routes["referrals-rest"]},
                                base_url="http://127.0.0.1:8080")
    assert document["openapi"] == "3.1.0" and document["security"] == [{"bearer": []}]
    post = document["paths"]["/v1/routes/referrals-rest/messages"]["post"]
    assert sorted(post["requestBody"]["content"]) == ["application/json", "application/x-ndjson", "text/csv"]
    assert post["responses"]["429"]["headers"]["Retry-After"] and post["responses"]["503"]["headers"]


# -- settings ----------------------------------------------------------------------------------------

def test_the_shipped_listener_takes_its_port_and_token_from_the_environment() -> None:
    project = load_project(REPO, {"HTTP_INGEST_PORT": "18080", "HTTP_INGEST_TOKEN": "s3cret"})
    [listener] = project.settings.http
    assert (listener.name, listener.host, listener.port) == ("rest", "127.0.0.1", 18080)
    assert listener.bearer_tokens == ("s3cret",) and listener.routes == ()
    assert listener.rate_limit == HttpRateLimit(500.0, 1000)
    assert load_project(REPO, {}).settings.http[0].port == 8080


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for folder in ("config", "routes", "connectors", "schemas"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    return tmp_path


def problems(root: Path) -> list[str]:
    _, found = check_project(root, {})
    return [f"{p.file}:{p.line}: {p.message}" for p in found]


def test_validate_names_an_unknown_route_and_a_bad_peer_at_the_listener(project: Path) -> None:
    config = project / "config" / "middleware.yaml"
    text = config.read_text()
    text = text.replace("      # routes: [referrals-rest, fhir-inbound]", "      routes: [referals-rest]")
    text = text.replace("      # allowed_peers: [10.20.0.0/16]", "      allowed_peers: [10.20.0.0/33]")
    config.write_text(text)
    found = problems(project)
    lines = text.splitlines()
    rest = next(n for n, line in enumerate(lines, 1) if "- name: rest" in line)
    peers = next(n for n, line in enumerate(lines, 1) if "allowed_peers: [10.20.0.0/33]" in line)
    [unknown] = [p for p in found if "no route named" in p]
    assert unknown.startswith(f"config/middleware.yaml:{rest}: ingest.http rest: routes: no route named "
                              "'referals-rest' (routes: adt-inbound, ")
    assert "referrals-rest" in unknown.split("(routes: ")[1]  # the existing routes are listed
    assert any(p.startswith(f"config/middleware.yaml:{peers}: ingest.http rest: allowed_peers: '10.20.0.0/33'")
               for p in found), found


def test_validate_names_an_unknown_key_with_a_suggestion(project: Path) -> None:
    config = project / "config" / "middleware.yaml"
    text = config.read_text().replace(
        "  mllp:", "    - {name: other, port: 8081, auth: {api_keys: [k]}, max_bytes: 5}\n  mllp:")
    config.write_text(text)
    other = next(n for n, line in enumerate(text.splitlines(), 1) if "name: other" in line)
    assert f"config/middleware.yaml:{other}: unknown key 'max_bytes' (did you mean 'max_body_bytes'?) in " \
           "ingest.http.1" in problems(project)


def test_a_second_listener_on_the_same_port_is_a_problem(project: Path) -> None:
    config = project / "config" / "middleware.yaml"
    text = config.read_text().replace("  mllp:", "    - {name: other, port: 8080, auth: {api_keys: [k]}}\n  mllp:")
    config.write_text(text)
    assert any("ingest.http other: port 8080 is already used by rest" in p for p in problems(project))


def test_an_http_listener_on_the_mllp_port_is_a_problem(project: Path) -> None:
    config = project / "config" / "middleware.yaml"
    config.write_text(config.read_text().replace("${MLLP_PORT:-2575}", "8080"))
    assert any("ingest.http rest: port 8080 is already used by ehr-adt" in p for p in problems(project))


def test_a_listener_without_auth_is_refused_by_the_schema(project: Path) -> None:
    config = project / "config" / "middleware.yaml"
    config.write_text(config.read_text().replace("  mllp:", "    - {name: open, port: 9999}\n  mllp:"))
    assert any("missing key: 'auth'" in p for p in problems(project))


def test_a_dotted_csv_header_makes_nested_objects_and_a_clashing_header_is_unreadable() -> None:
    read = read_body(b"referralId,patient.mrn,patient.name.family\nREF-3,MRN-3,Lind\n", "text/csv", get_format("json"))
    assert [orjson.loads(r.raw) for r in read.records] == [
        {"referralId": "REF-3", "patient": {"mrn": "MRN-3", "name": {"family": "Lind"}}}]
    for header in (b"patient,patient.mrn", b"a,a", b"a,,b", b"a..b"):
        clashing = read_body(header + b"\n1,2,3\n", "text/csv", get_format("json"))
        assert clashing.unreadable == 1 and "header" in str(clashing.records[0].error), header
