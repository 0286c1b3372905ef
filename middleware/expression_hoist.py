"""Library calls taken out of a CEL expression, to run in Python before CEL does the rest.

A call from CEL into a Python function costs the ``cel`` library several microseconds (its argument and
result conversions), about ten times a plain Python call. ``upper(path('PID-5.1'))``, whose arguments
are all paths, literals or such calls, is therefore computed in Python and handed to CEL as a variable;
an expression that is nothing but such a call does not run CEL at all. Only expressions without ``?:``,
``&&``, ``||`` and comprehensions are hoisted: CEL evaluates every call in them anyway, so computing
the calls first changes neither results nor errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SCALAR = r"(?:_path\d+|_h\d+|_s\d+|-?\d+)"
_ARG = rf"(?:{_SCALAR}|\[\s*(?:{_SCALAR}(?:\s*,\s*{_SCALAR})*)?\s*\])"  # a list literal of such, too
_ARGS = rf"\(\s*({_ARG}(?:\s*,\s*{_ARG})*)?\s*\)"
_SIMPLE_STRING = re.compile(r"'[^'\\\n]*'|\"[^\"\\\n]*\"")
_ANY_QUOTE = re.compile(r"['\"]")
_MACRO = re.compile(r"\.\s*(all|exists|exists_one|map|filter)\s*\(")  # their bodies run per item, maybe never


@dataclass(frozen=True)
class Call:
    """``target = function(*args)``; an argument is a variable name (``_path0``, ``_h1``), a literal or a
    list of those (a tuple)."""

    target: str
    function: str
    args: tuple[str | int | tuple[str | int, ...], ...]
    variables: frozenset[str]  # which args (and list items) are variable names


def hoist(rewritten: str, functions: frozenset[str]) -> tuple[str, tuple[Call, ...]] | None:
    """The expression with its hoistable calls replaced by ``_hN`` variables, and those calls in the order
    to run them; None when nothing can be hoisted (or the expression has conditional operators)."""
    literals: list[str] = []

    def mask(match: re.Match[str]) -> str:
        literals.append(match.group()[1:-1])
        return f"_s{len(literals) - 1}"

    masked = _SIMPLE_STRING.sub(mask, rewritten)
    if _ANY_QUOTE.search(masked) or "?" in masked or "&&" in masked or "||" in masked or _MACRO.search(masked):
        return None  # a string with escapes or raw/bytes/triple quotes, or parts CEL may not evaluate
    names = "|".join(sorted(functions, key=len, reverse=True))
    call = re.compile(rf"(?<![.\w])({names}){_ARGS}")
    method = re.compile(rf"(?<![.\w])({_ARG})\s*\.\s*({names}){_ARGS}")
    calls: list[Call] = []

    def value(arg: str, variables: set[str]) -> str | int:
        if arg.startswith("_s"):
            return literals[int(arg[2:])]
        if arg.startswith("_"):
            variables.add(arg)
            return arg
        return int(arg)

    def record(function: str, args: list[str]) -> str:
        variables: set[str] = set()
        values = tuple(tuple(value(item, variables) for item in split(arg[1:-1])) if arg.startswith("[")
                       else value(arg, variables) for arg in args)
        target = f"_h{len(calls)}"
        calls.append(Call(target, function, values, frozenset(variables)))
        return target

    def split(text: str | None) -> list[str]:
        return [a.strip() for a in re.findall(rf"{_ARG}", text)] if text else []

    while True:
        replaced = call.sub(lambda m: record(m.group(1), split(m.group(2))), masked, count=1)
        if replaced == masked:
            replaced = method.sub(lambda m: record(m.group(2), [m.group(1), *split(m.group(3))]), masked, count=1)
        if replaced == masked:
            break
        masked = replaced
    if not calls:
        return None
    unmasked = re.sub(r"\b_s(\d+)\b", lambda m: repr(literals[int(m.group(1))]), masked)
    return unmasked, tuple(calls)
