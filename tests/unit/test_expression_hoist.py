"""Library calls hoisted out of CEL (middleware.expression_hoist): what is hoisted, what is left to CEL, and
that the results are those of the expression run by CEL alone."""

from __future__ import annotations

import cel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from middleware.expression_hoist import hoist
from middleware.expressions import EvaluationError, _Scanner, compile_expression
from middleware.formats import get_format

HL7 = get_format("hl7v2")
LIBRARY = frozenset({"upper", "lower", "trim", "coalesce", "substring", "join", "lookup", "date"})
MESSAGE = (b"MSH|^~\\&|EHR|GEN|BED|GEN|20240301120000||ADT^A01|MSG0001|P|2.5\r"
           b"PID|1||MRN123^^^GEN^MR||Doe^John^Q||19800215|F\rPV1|1|I|WARD1^101\r")


@pytest.mark.parametrize(("rewritten", "final", "functions"), [
    ("upper(_path0)", "_h0", ["upper"]),
    ("_path0.upper()", "_h0", ["upper"]),
    ("lower(trim(_path0))", "_h1", ["trim", "lower"]),
    ("substring(coalesce(_path0, ''), 0, 3)", "_h1", ["coalesce", "substring"]),
    ("join([_path0, _path1, 'x'], ' ')", "_h0", ["join"]),
    ("upper(_path0) + ', ' + _path1", "_h0 + ', ' + _path1", ["upper"]),
    ("upper(_path0 + 'x')", None, []),  # an operator inside the arguments: CEL's
])
def test_what_is_hoisted(rewritten: str, final: str | None, functions: list[str]) -> None:
    found = hoist(rewritten, LIBRARY)
    if final is None:
        assert found is None
        return
    assert found is not None
    text, calls = found
    assert text == final and [c.function for c in calls] == functions


@pytest.mark.parametrize("rewritten", [
    "_path0 == 'I' ? upper(_path1) : ''",  # CEL evaluates only one branch
    "_path0 != null && upper(_path0) == 'X'",
    "_path0 == null || upper(_path0) == 'X'",
    "[_path0].map(x, upper(_path1))",  # a comprehension body may never run
    "upper('it\\'s')",  # a string with an escape: left to CEL
])
def test_lazily_evaluated_or_unusual_expressions_are_left_to_cel(rewritten: str) -> None:
    assert hoist(rewritten, LIBRARY) is None


@pytest.mark.parametrize("expr", [
    "upper(path('PID-5.1'))", "lower(trim(path('PID-5.2'))) + '/' + path('PV1-2')",
    "join([path('PID-5.2'), path('PID-5.9'), path('PID-5.1')], ' ')", "substring(path('PID-3.1'), 0, 3)",
    "date(path('PID-7'))", "path('PID-5.1')", "coalesce(path('PID-5.9'), 'x').upper()",
])
def test_hoisted_results_are_cels(expr: str) -> None:
    compiled = compile_expression(expr, HL7)
    assert compiled.calls or compiled.direct
    doc = HL7.parse(MESSAGE)
    values = {b.name: (b.accessor.read(doc) or [None])[0] for b in compiled.bindings}
    rewritten = _Scanner(expr).run()
    by_cel = cel.compile(rewritten).execute({**values, **compiled.library, **compiled.functions})
    assert compiled.evaluate(doc) == by_cel


EXPRESSIONS = [
    "upper(path('PID-5.1'))", "lower(trim(path('PID-5.2'))) + '/' + path('PID-5.1')",
    "join([path('PID-5.2'), path('PID-5.1')], ' ')", "substring(path('PID-5.1'), 1, 4)",
    "date(path('PID-7'))", "age(path('PID-7'), '20240301')", "phone(path('PID-13'), '1')",
    "format_date(path('PID-7'), '%d.%m.%Y')", "split(path('PID-5.1'), 'a')", "replace(path('PID-5.1'), 'a', 'b')",
    "coalesce(path('PID-5.3'), path('PID-5.1')).upper()", "int(path('PID-7')) > 19000000",
]


@given(family=st.text(alphabet=st.characters(blacklist_characters="|^~\\&\r\n", blacklist_categories=("Cs",)),
                      max_size=12),
       birth=st.from_regex(r"\A[0-9]{0,14}\Z"), phone=st.text(alphabet="0123456789+()- x", max_size=16))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_values_give_cels_result_or_an_evaluation_error(family: str, birth: str, phone: str) -> None:
    raw = MESSAGE.replace(b"Doe^John^Q", f"{family}^John^Q".encode()).replace(b"19800215", birth.encode()) \
        .replace(b"|F\r", f"|F|||||{phone}\r".encode())
    doc = HL7.parse(raw)
    for expr in EXPRESSIONS:
        compiled = compile_expression(expr, HL7)
        values = {b.name: (b.accessor.read(doc) or [None])[0] for b in compiled.bindings}
        try:
            expected: object = cel.compile(_Scanner(expr).run()).execute(
                {**values, **compiled.library, **compiled.functions})
        except Exception:
            expected = EvaluationError
        try:
            got: object = compiled.evaluate(doc)
        except EvaluationError:
            got = EvaluationError
        assert got == expected, expr
