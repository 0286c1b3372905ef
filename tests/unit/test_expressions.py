"""``expr:`` (CEL) in maps, filters and ``when:``: the function library, load-time errors, bounds and
runtime failures that dead-letter at the right stage instead of crashing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from middleware.errors import FilterError, MappingError
from middleware.expressions import MAX_LENGTH, MAX_RESULT, EvaluationError, ExpressionError, compile_expression
from middleware.formats import get_format
from middleware.mapping import LookupTable, SpecError, apply_rules, compile_condition, compile_field
from middleware.project import check_project, load_project
from middleware.route import MessageContext, transform
from tests.project_copy import copy_project

REPO = Path(__file__).resolve().parents[2]
HL7 = get_format("hl7v2")
JSON = get_format("json")
CSV = get_format("csv")
MESSAGE = (b"MSH|^~\\&|EHR|GEN|BED|GEN|20240301120000||ADT^A01|MSG0001|P|2.5\r"
           b"EVN|A01|20240301115500\r"
           b"PID|1||MRN123^^^GEN^MR~SSN9^^^SSA^SS||Doe^John^Q||19800215|F|||12 Elm St^^Springfield^IL||"
           b"(555) 123-4567\r"
           b"PV1|1|I|WARD1^101^A^GEN\r")
LOOKUPS = {"sex": LookupTable("sex", {"F": "female", "M": "male"}, "unknown"),
           "strict": LookupTable("strict", {"A": "alpha"})}


def run(expr: str, fmt: Any = HL7, raw: bytes = MESSAGE) -> Any:
    return compile_expression(expr, fmt, LOOKUPS).evaluate(fmt.parse(raw))


@pytest.mark.parametrize(("expr", "expected"), [
    ("path('PID-5.1')", "Doe"),
    ("path('PID-99.1')", None),
    ("paths('PID-3[*].1')", ["MRN123", "SSN9"]),
    ("paths('OBX[*]-5')", []),
    ("upper(path('PID-5.1'))", "DOE"),
    ("path('PID-5.1').upper()", "DOE"),  # CEL's method sugar
    ("lower('ABC')", "abc"),
    ("trim('  a b  ')", "a b"),
    ("substring(path('PV1-3.1'), 0, 4)", "WARD"),
    ("substring('ab', 1)", "b"),
    ("substring('ab', 0, 10)", "ab"),  # clamps: a short value is not an error
    ("replace(path('PID-11.1'), ' St', ' Street')", "12 Elm Street"),
    ("split(path('PID-11.1'), ' ')", ["12", "Elm", "St"]),
    ("join([path('PID-5.2'), path('PID-5.4'), path('PID-5.1')], ' ')", "John Doe"),  # absent parts skipped
    ("join(['a', 'b'])", "ab"),
    ("coalesce(path('PID-5.4'), path('PID-5.3'), 'x')", "Q"),
    ("coalesce(path('PID-5.4'), '')", None),
    ("date(path('PID-7'))", "1980-02-15"),
    ("date(path('MSH-7'))", "2024-03-01"),
    ("datetime(path('MSH-7'))", "2024-03-01T12:00:00"),
    ("format_date(path('PID-7'), '%d/%m/%Y')", "15/02/1980"),
    ("age(path('PID-7'), path('MSH-7'))", 44),
    ("age('19800302', '20240301')", 43),  # the day before the birthday
    ("lookup('sex', path('PID-8'))", "female"),
    ("lookup('sex', 'Z')", "unknown"),  # the table's default
    ("lookup('strict', 'Z')", None),  # no default: null, so coalesce() can stand in
    ("phone(path('PID-13'))", "5551234567"),
    ("phone(path('PID-13'), '1')", "+15551234567"),
    ("phone('+44 (0)20 7946 0958')", "+4402079460958"),
    ("phone('0044 20 7946 0958')", "+442079460958"),
    ("phone('020 7946 0958', '44')", "+442079460958"),
    ("upper(path('PID-99'))", None),  # null in, null out
    ("path('PV1-2') == 'I' ? 'inpatient' : 'other'", "inpatient"),
    ("size(paths('PID-3[*]')) == 2 && path('PID-5.1').startsWith('D')", True),
    ("paths('PID-3[*].1').filter(x, x.startsWith('MRN'))", ["MRN123"]),
    ("timestamp('2024-03-01T12:00:00Z')", "2024-03-01T12:00:00Z"),
])
def test_functions_on_an_hl7_message(expr: str, expected: Any) -> None:
    assert run(expr) == expected


def test_age_without_a_reference_date_is_as_of_today() -> None:
    born = dt.date.today().replace(year=dt.date.today().year - 30) if dt.date.today() != dt.date(2024, 2, 29) \
        else dt.date(1994, 2, 28)
    assert run(f"age('{born.isoformat()}')") == 30


def test_the_type_probe_accepts_what_some_message_can_satisfy() -> None:
    for expr in ("int(path('PID-7')) > 3", "path('PID-5.1') + ', ' + path('PID-5.2')", "date(path('PID-7')) + 'x'",
                 "path('MSH-7') == null ? '' : path('MSH-7') + 1"):
        compile_expression(expr, HL7, LOOKUPS)
    compile_expression("path('amount') > 2 && path('flag')", JSON)  # JSON values may be numbers and booleans
    with pytest.raises(ExpressionError, match="gives text, a number, a boolean, an object or a list"):
        compile_expression("path('a') - 'x'", JSON)


def test_paths_read_json_csv_and_fhir_in_their_own_notation() -> None:
    fhir = get_format("fhir")
    patient = (REPO / "samples" / "fhir-inbound" / "patient-registered.json").read_bytes()
    assert run("upper(path('Patient.name.first().family'))", fhir, patient) == "TESTPERSON"
    assert run("path('Patient.name.first()').given[0] + ' ' + path('Patient.name.first()').family", fhir,
               patient) == "Ada Testperson"  # a complex value is a CEL map
    assert run("path('Patient.active') == true && size(paths('Patient.name.given')) == 3", fhir, patient) is True
    assert run("upper(path('patient.name'))", JSON, b'{"patient": {"name": "ann"}}') == "ANN"
    assert run("path('member_id') + '/' + path('plan')", CSV, b'{"member_id": "M1", "plan": "Gold"}') == "M1/Gold"


@pytest.mark.parametrize(("expr", "message"), [
    ("upper(path('PID-5.1'", "invalid expression at line 1, column 21"),
    ("family + 'x'", "unknown name 'family': read the message with path('...')"),
    ("uper(path('PID-5.1'))", "unknown function 'uper' (did you mean 'upper'?)"),
    ("upper('a', 'b')", "upper() takes 1 argument, given 2"),
    ("'a'.substring()", None),  # receiver counts: 1 argument is too few
    ("coalesce()", "coalesce() takes 1 to 99 arguments, given 0"),
    ("path(x)", "path() takes one quoted path, e.g. path('PID-5.1')"),
    ("path('PID-5.1' + 'x')", "path() takes one quoted path"),
    ("'x'.path('PID-5')", "path() is a function, not a method"),
    ("path('PID5')", "path 'PID5': invalid HL7 path"),
    ("lookup('nope', path('PID-8'))", "lookup(): no table 'nope' in config/lookups/ (known: sex, strict)"),
    ("paths('PID-3[*]').map(x, paths('PID-3[*]').exists(y, y == x))", "nested comprehensions are not allowed"),
    ("'" + "a" * MAX_LENGTH + "'", f"longer than {MAX_LENGTH} characters"),
    ("'unclosed", "invalid expression at line 1, column 1: Syntax error"),
    ("", "expr must be a non-empty string"),
    ("path('PID-5.1') + 1", "type error on every message: Unsupported operation: string + int (path() gives text; "
                            "convert with int(), double(), string())"),
    ("path('PV1-2') > 2 || !path('PID-8')", "type error on every message: No such overload"),
])
def test_compile_errors_say_what_is_wrong(expr: str, message: str | None) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(expr, HL7, LOOKUPS)
    if message:
        assert message in str(caught.value)


def test_quoted_text_that_looks_like_a_call_is_left_alone() -> None:
    assert run("'path(\"x\") and upper(' + path('PID-5.1')") == "path(\"x\") and upper(Doe"


@pytest.mark.parametrize(("expr", "message"), [
    ("substring('abc', 2, 1)", "substring() takes 0 <= start <= end"),
    ("format_date(path('PID-5.1'), '%Y')", "format_date(): not a date"),
    ("phone('x1')", "phone(): fewer than 3 digits"),
    ("path('PID-5.9') == null ? path('PID-5.1') + 1 : ''", "Unsupported operation: string + int"),
    ("int(path('PID-5.1'))", "int"),
    ("join('notalist')", "join() expects a list"),
    ("upper(['a'])", "upper() expects a string, got list"),
])
def test_evaluation_errors_are_typed_and_never_quote_the_value(expr: str, message: str) -> None:
    with pytest.raises(EvaluationError) as caught:
        run(expr)
    assert message in str(caught.value)
    assert "Doe" not in str(caught.value)  # message values may be PHI


def test_results_are_bounded() -> None:
    grow = ("replace(replace(replace(replace(path('PID-11.1'), ' ', '" + "x" * 100 + "'), 'x', 'yyyyyyyyyy'), "
            "'y', 'zzzzzzzzzz'), 'z', 'wwwwwwwwww')")
    with pytest.raises(EvaluationError, match=f"longer than {MAX_RESULT:,}"):
        run(grow)
    with pytest.raises(EvaluationError, match="non-empty"):
        run("replace(path('PID-5.1'), '', 'x')")


def test_a_failing_expr_field_is_a_mapping_error_naming_target_and_expression() -> None:
    rule = compile_field("patient.facility", {"expr": "substring(path('PID-5.1'), 3, 1)"}, HL7, LOOKUPS)
    with pytest.raises(MappingError) as caught:
        apply_rules((rule,), HL7.parse(MESSAGE))
    assert caught.value.stage == "map"
    assert "patient.facility: expr \"substring(path('PID-5.1'), 3, 1)\" failed" in caught.value.message


def test_expr_fields_keep_their_type_convert_with_as_and_honour_default_and_required() -> None:
    doc = HL7.parse(MESSAGE)
    rules = tuple(compile_field(t, s, HL7, LOOKUPS) for t, s in {
        "age": {"expr": "age(path('PID-7'), path('MSH-7'))"},
        "age_text": {"expr": "age(path('PID-7'), path('MSH-7'))", "as": "string"},
        "ids": {"expr": "paths('PID-3[*].1')"},
        "none": {"expr": "path('PID-99')"},
        "fallback": {"expr": "path('PID-99')", "default": "n/a"},
        "sex": {"expr": "trim(path('PID-8'))", "lookup": "sex"},
    }.items())
    assert apply_rules(rules, doc) == {"age": 44, "age_text": "44", "ids": ["MRN123", "SSN9"], "fallback": "n/a",
                                       "sex": "female"}
    required = compile_field("x", {"expr": "path('PID-99')", "required": True}, HL7, LOOKUPS)
    with pytest.raises(MappingError, match="required value missing"):
        apply_rules((required,), doc)


def test_expr_field_spec_errors_name_the_target() -> None:
    with pytest.raises(SpecError) as caught:
        compile_field("patient.name", {"expr": "uper(path('PID-5.1'))"}, HL7, LOOKUPS)
    assert caught.value.key == "expr"
    assert str(caught.value).startswith("patient.name: expr \"uper(path('PID-5.1'))\": unknown function 'uper'")
    with pytest.raises(SpecError, match="exactly one of path, value, template, expr"):
        compile_field("x", {"expr": "'a'", "path": "PID-5"}, HL7, LOOKUPS)


def test_conditions_with_expr() -> None:
    doc = HL7.parse(MESSAGE)
    assert compile_condition({"expr": "path('PV1-2') == 'I'"}, HL7).matches(doc)
    assert not compile_condition({"message_type": "ADT^A01", "expr": "path('PV1-2') == 'E'"}, HL7).matches(doc)
    assert compile_condition({"expr": "lookup('sex', path('PID-8')) == 'female'"}, HL7, LOOKUPS).matches(doc)
    not_bool = compile_condition({"expr": "path('PV1-2')"}, HL7, error=FilterError)
    with pytest.raises(FilterError, match="a condition must give true or false, got str"):
        not_bool.matches(doc)
    with pytest.raises(SpecError, match="expr 'path\\(PV1-2\\)': path\\(\\) takes one quoted path"):
        compile_condition({"expr": "path(PV1-2)"}, HL7)


# -- in a project: load-time errors at file:line, runtime failures dead-letter ------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path)


def add_to_route(project: Path, old: str, new: str) -> Path:
    path = project / "routes" / "adt-inbound.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_a_bad_expression_is_reported_at_its_file_and_line_with_the_expression(project: Path) -> None:
    route = add_to_route(project, "      patient.name.family: PID-5.1\n",
                         "      patient.name.family: {expr: \"upper(path('PID-5.1')\"}\n")
    _, problems = check_project(project, {})
    assert [str(p) for p in problems] == [
        f"routes/adt-inbound.yaml:{line_of(route, 'upper(path')}: patient.name.family: expr "
        "\"upper(path('PID-5.1')\": invalid expression at line 1, column 22: Syntax error: missing ')' at '<EOF>'"]


def test_a_bad_filter_expression_is_reported_at_its_line(project: Path) -> None:
    route = add_to_route(project, "filter:\n", "filter:\n  expr: \"path('MSH-9.1') == ADT\"\n")
    _, problems = check_project(project, {})
    assert [str(p) for p in problems] == [
        f"routes/adt-inbound.yaml:{line_of(route, 'expr:')}: expr \"path('MSH-9.1') == ADT\": unknown name 'ADT': "
        "read the message with path('...'), e.g. path('PID-5.1'), and quote text ('...')"]


def test_failing_expressions_dead_letter_at_their_stage_never_crash(project: Path) -> None:
    fragment = project / "routes" / "_fragments" / "patient-demographics.yaml"  # A01's patient fields
    fragment.write_text(fragment.read_text().replace(
        "  patient.name.family: PID-5.1\n",
        "  patient.name.family: {expr: \"substring(path('PID-5.1'), 0, int(path('PID-5.2')))\"}\n"))
    route = load_project(project, {}).routes["adt-inbound"]
    with pytest.raises(MappingError) as caught:
        transform(route, MESSAGE, MessageContext(correlation_id="c-1"))
    error = caught.value
    assert (error.stage, error.route, error.correlation_id) == ("map", "adt-inbound", "c-1")
    assert "patient.name.family: expr" in error.message and "int" in error.message

    add_to_route(project, "filter:\n", "filter:\n  expr: \"int(path('PID-5.1')) > 1\"\n")
    route = load_project(project, {}).routes["adt-inbound"]
    with pytest.raises(FilterError) as filtered:
        transform(route, MESSAGE)
    assert filtered.value.stage == "filter"
    assert "condition expr \"int(path('PID-5.1')) > 1\" failed" in filtered.value.message


def test_when_expr_picks_the_event_rule(project: Path) -> None:
    add_to_route(project, "  - when: {message_type: ADT^A01}\n",
                 "  - when: {message_type: ADT^A01, expr: \"path('PV1-2') != 'I'\"}\n")
    route = load_project(project, {}).routes["adt-inbound"]
    with pytest.raises(MappingError, match="no event rule matches message type ADT\\^A01"):
        transform(route, MESSAGE)
    assert transform(route, MESSAGE.replace(b"PV1|1|I|", b"PV1|1|E|")).events[0]["type"] == "patient.admitted.v1"


def test_one_compiled_expression_serves_several_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    expression = compile_expression("upper(path('PID-5.1')) + '/' + path('PID-3.1')", HL7, LOOKUPS)
    docs = [HL7.parse(MESSAGE.replace(b"Doe^John", f"Doe{n}^John".encode()).replace(b"MRN123", f"M{n}".encode()))
            for n in range(40)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(expression.evaluate, docs * 5))
    assert results == [f"DOE{n}/M{n}" for n in range(40)] * 5


def test_expr_in_a_deliver_entrys_when_and_map_reads_the_cloudevent() -> None:
    import orjson

    from middleware.delivery.outbound import Outbound, compile_map, compile_when

    event = {"type": "patient.admitted.v1", "data": {"patient": {"mrn": "m-1", "name": {"family": "Doe"}}}}
    outbound = Outbound(compile_when({"type": "patient.admitted", "expr": "path('data.patient.mrn').startsWith('m')"}),
                        compile_map({"id": {"expr": "upper(path('data.patient.mrn'))"},
                                     "name": {"expr": "lower(path('data.patient.name.family'))"}}, LOOKUPS))
    prepared = outbound.prepare(orjson.dumps(event))
    assert prepared is not None and orjson.loads(prepared[0]) == {"id": "M-1", "name": "doe"}
    event["data"]["patient"]["mrn"] = "x-2"
    assert outbound.prepare(orjson.dumps(event)) is None  # when: is false: skipped
    failing = Outbound(compile_when({"expr": "int(path('data.patient.mrn')) > 0"}))
    with pytest.raises(MappingError, match=r"condition expr .* failed"):
        failing.prepare(orjson.dumps(event))


def test_expr_inside_each_reads_the_item() -> None:
    raw = MESSAGE + b"OBX|1|NM|GLU^Glucose||5.4|mmol/L\rOBX|2|NM|HB^Hemoglobin||13|g/dL\r"
    rule = compile_field("results", {"each": "OBX", "map": {
        "code": {"expr": "lower(path('OBX-3.1'))"},
        "value": {"expr": "double(path('OBX-5'))"},
        "label": {"expr": "path('OBX-3.2') + ' (' + path('OBX-6') + ')'"}}}, HL7, LOOKUPS)
    assert apply_rules((rule,), HL7.parse(raw)) == {"results": [
        {"code": "glu", "value": 5.4, "label": "Glucose (mmol/L)"},
        {"code": "hb", "value": 13.0, "label": "Hemoglobin (g/dL)"}]}


@pytest.mark.parametrize(("expr", "message"), [
    ("[path('PID-5.1')][5]", "index or key not found"),
    ("{'a': 1}[path('PID-5.1')] == 1", "index or key not found"),
    ("int(path('PID-7')) * 9223372036854775807 > 0", "arithmetic overflow or division by zero"),
    ("size(path('PID-5.1')) / (size(path('PID-5.1')) - 3) > 0", "arithmetic overflow or division by zero"),
    ("'x'.matches(path('PID-5.1') + '(')", "matches() cannot use its arguments"),
    ("int(path('PID-5.1')) > 0", "int() cannot use its arguments"),
])
def test_every_failure_of_cel_is_an_evaluation_error_without_values(expr: str, message: str) -> None:
    with pytest.raises(EvaluationError) as caught:
        compile_expression(expr, HL7, LOOKUPS).evaluate(HL7.parse(MESSAGE))
    assert str(caught.value) == message


def test_every_expression_in_the_docs_compiles() -> None:
    import re

    text = (REPO / "docs" / "routes.md").read_text(encoding="utf-8")
    found = re.findall(r"expr: \"([^\"]+)\"", text)
    assert len(found) >= 6
    for expr in found:
        compile_expression(expr, HL7, LOOKUPS)


def test_compiled_rules_with_expressions_stay_hashable_like_the_others() -> None:
    rule = compile_field("a", {"expr": "upper(path('PID-5.1'))"}, HL7, LOOKUPS)
    condition = compile_condition({"expr": "path('PV1-2') == 'I'"}, HL7)
    assert len({rule, rule, condition}) == 2
