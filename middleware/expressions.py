"""``expr:`` in maps, filters and ``when:`` conditions: CEL (Common Expression Language) expressions.

CEL has no loops, no recursion and no access to the machine: an expression is a pure function of the
values it is given. The message is read with literal paths in the route's own notation, which are
compiled once at load like any map path:

- ``path('PID-5.1')``: the first value the path selects, or ``null`` when there is none;
- ``paths('OBX[*]-5')``: every value it selects (a list, possibly empty).

Each such call is replaced by a variable before CEL compiles the expression, so evaluating it reads
just those paths and calls no Python function to reach the message. The function library
(:mod:`middleware.expression_functions`) adds string, date, code-table, coalesce and phone functions;
calls to it whose arguments are known before CEL runs are made in Python first
(:mod:`middleware.expression_hoist`).

Bounds (the Rust CEL library offers no cost limit or interrupt, so they hold by construction): an
expression is at most :data:`MAX_LENGTH` characters, comprehensions (``all``, ``exists``,
``exists_one``, ``map``, ``filter``) are not nested, so work is linear in the message; every function
result and the expression's result are capped at :data:`MAX_RESULT` characters or items.
"""

from __future__ import annotations

import datetime as dt
import difflib
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from middleware.cel_core import cel
from middleware.expression_functions import ARITY, FUNCTIONS, MAX_RESULT, FunctionError, lookup_function
from middleware.expression_hoist import Call, hoist
from middleware.formats import Format, PathAccessor

MAX_LENGTH = 1000
"""Characters in one expression."""

logging.getLogger("cel").addHandler(logging.NullHandler())
logging.getLogger("cel").propagate = False  # it logs failing function calls, whose text may quote values

_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_READERS = frozenset({"path", "paths"})
# CEL's own functions and methods (cel-rust): allowed besides the library below
_BUILTINS = frozenset({
    "size", "int", "uint", "double", "string", "bytes", "bool", "timestamp", "duration", "type", "dyn", "has",
    "matches", "contains", "startsWith", "endsWith", "max", "min",
    "getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth", "getDate", "getDayOfWeek", "getHours",
    "getMinutes", "getSeconds", "getMilliseconds",
}) | _MACROS
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOOKUP_TABLE = re.compile(r"\blookup\s*\(\s*(['\"])([^'\"]*)\1")


class ExpressionError(ValueError):
    """An expression that cannot be compiled (syntax, unknown names, a bad path, a bound exceeded)."""


class EvaluationError(Exception):
    """An expression that failed on one message; the text never quotes the message's values."""


# -- compiling --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Binding:
    name: str  # the variable that replaced the path() / paths() call
    accessor: PathAccessor
    many: bool


@dataclass(frozen=True)
class _Frame:
    opener: str  # ( [ {
    function: str | None  # the function this ( calls
    method: bool  # called as receiver.function(...)
    macro: bool


class _Scanner:
    """One pass over the expression: replaces ``path('...')`` calls, finds comprehension variables,
    refuses nested comprehensions and counts the arguments of library calls."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.out: list[str] = []
        self.paths: list[tuple[str, bool]] = []  # (path, many) in variable order
        self.bound: set[str] = set()  # comprehension variables
        self.calls: list[tuple[str, int]] = []  # (library function, argument count incl. a receiver)

    def run(self) -> str:
        text, i = self.text, 0
        stack: list[tuple[_Frame, list[int]]] = []  # frame, [commas, has content]
        previous = ""  # last significant character outside strings
        while i < len(text):
            char = text[i]
            if char in "'\"" or (char in "rRbB" and i + 1 < len(text) and text[i + 1] in "'\""):
                end = self._string_end(i)
                self.out.append(text[i:end])
                self._content(stack)
                i, previous = end, "s"
                continue
            ident = _IDENT.match(text, i) if char.isalpha() or char == "_" else None
            if ident is not None:
                name, i = ident.group(), ident.end()
                method = previous == "."
                after = _skip_space(text, i)
                calls = after < len(text) and text[after] == "("
                if name in _READERS and calls and not method:
                    i = self._reader(name, after)
                    self._content(stack)
                    previous = "s"
                    continue
                if name in _READERS and calls:
                    raise ExpressionError(f"{name}() is a function, not a method: write {name}('...')")
                if calls:
                    self.out.append(text[ident.start():after + 1])
                    if stack and not method:
                        self._content(stack)
                    macro = method and name in _MACROS
                    if macro and any(f.macro for f, _ in stack):
                        raise ExpressionError(f"nested comprehensions are not allowed (.{name}() inside another): "
                                              "they make the cost grow with the square of the message")
                    if macro:
                        var = _IDENT.match(text, _skip_space(text, after + 1))
                        if var is not None:
                            self.bound.add(var.group())
                    stack.append((_Frame("(", name, method, macro), [0, 0]))
                    i, previous = after + 1, "("
                    continue
                self.out.append(name)
                if not method:
                    self._content(stack)
                previous = "a"
                continue
            if char in "([{":
                self._content(stack)
                stack.append((_Frame(char, None, False, False), [0, 0]))
            elif char in ")]}":
                if stack:
                    frame, (commas, content) = stack.pop()
                    if frame.function is not None and frame.function in ARITY:
                        self.calls.append((frame.function, (commas + 1 if content else 0) + frame.method))
            elif char == "," and stack:
                stack[-1][1][0] += 1
            elif not char.isspace():
                self._content(stack)
            self.out.append(char)
            if not char.isspace():
                previous = char
            i += 1
        return "".join(self.out)

    @staticmethod
    def _content(stack: list[tuple[_Frame, list[int]]]) -> None:
        if stack:
            stack[-1][1][1] = 1

    def _string_end(self, start: int) -> int:
        text, i = self.text, start
        raw = text[i] in "rR"
        if text[i] in "rRbB":
            i += 1
        quote = text[i:i + 3] if text[i:i + 3] in ("'''", '"""') else text[i]
        i += len(quote)
        while i < len(text):
            if text[i] == "\\" and not raw:
                i += 2
                continue
            if text.startswith(quote, i):
                return i + len(quote)
            if len(quote) == 1 and text[i] == "\n":
                break
            i += 1
        raise ExpressionError(f"unclosed string starting at character {start + 1}")

    def _reader(self, name: str, paren: int) -> int:
        """``path('X')`` at ``paren`` (its opening parenthesis): replaced by a variable; returns the end."""
        text = self.text
        start = _skip_space(text, paren + 1)
        usage = f"{name}() takes one quoted path, e.g. {name}('PID-5.1')"
        if start >= len(text) or text[start] not in "'\"":
            raise ExpressionError(usage)
        end = self._string_end(start)
        close = _skip_space(text, end)
        if close >= len(text) or text[close] != ")":
            raise ExpressionError(usage)
        literal = text[start + 1:end - 1]
        if "\\" in literal or not literal.strip():
            raise ExpressionError(usage)
        self.out.append(f"_path{len(self.paths)}")
        self.paths.append((literal.strip(), name == "paths"))
        return close + 1


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


@dataclass(frozen=True, eq=False)  # equal and hashed by identity, like the compiled program it holds
class Expression:
    """A compiled ``expr:``; :meth:`evaluate` per message."""

    source: str  # as written in YAML, for error messages
    program: Any  # cel.Program
    bindings: tuple[_Binding, ...]
    functions: Mapping[str, Callable[..., Any]]  # those CEL calls back (the others are hoisted)
    calls: tuple[Call, ...] = ()  # library calls run in Python first (middleware.expression_hoist)
    library: Mapping[str, Callable[..., Any]] = field(default_factory=dict)  # what ``calls`` call
    direct: str | None = None  # the expression is this one hoisted call (or path): no CEL run at all
    needed: tuple[str, ...] | None = None  # the variables the CEL program reads (None: all)
    _local: threading.local = field(default_factory=threading.local, compare=False, repr=False)

    def _context(self) -> tuple[Any, list[dict[str, Any]]]:
        """This thread's cel.Context (functions converted once, not per message: about twice as fast as
        a dict per call) and the holder its variable resolver reads the current message's values from."""
        made: tuple[Any, list[dict[str, Any]]] | None = getattr(self._local, "made", None)
        if made is None:
            holder: list[dict[str, Any]] = [{}]
            names = [b.name for b in self.bindings] + [c.target for c in self.calls]
            context = cel.Context(variables=dict.fromkeys(names), functions=dict(self.functions))
            context.set_variable_resolver(lambda name: holder[0].get(name))  # None: the registered null
            made = self._local.made = (context, holder)
        return made

    def evaluate(self, doc: Any) -> Any:
        """The expression's value on ``doc`` (None for CEL null); raises :class:`EvaluationError`."""
        values: dict[str, Any] = {}
        for binding in self.bindings:
            found = binding.accessor.read(doc)
            values[binding.name] = found if binding.many else (found[0] if found else None)
        for call in self.calls:
            try:
                values[call.target] = self.library[call.function](*(
                    [values[i] if i in call.variables else i for i in a] if isinstance(a, tuple)
                    else values[a] if a in call.variables else a for a in call.args))
            except FunctionError as exc:
                raise EvaluationError(str(exc)) from None
            except Exception:  # a library function given what it cannot use
                raise EvaluationError(f"{call.function}() cannot use its arguments") from None
        if self.direct is not None:
            result = values[self.direct]
        elif not self.functions:  # no callbacks: the values as a plain dict is the cheapest way in
            try:
                result = self.program.execute(values if self.needed is None else {n: values[n] for n in self.needed})
            except Exception as exc:  # whatever CEL raises is this message's failure, never the worker's
                raise EvaluationError(_reason(exc)) from None
        else:
            context, holder = self._context()
            holder[0] = values
            try:
                result = self.program.execute(context)
            except Exception as exc:  # whatever CEL raises is this message's failure, never the worker's
                raise EvaluationError(_reason(exc)) from None
            finally:
                holder[0] = {}
        if isinstance(result, str | list) and len(result) > MAX_RESULT:
            raise EvaluationError(f"result is longer than {MAX_RESULT:,}")
        if isinstance(result, dt.datetime):  # timestamp(): event data is JSON
            return result.isoformat().replace("+00:00", "Z")
        if isinstance(result, dt.timedelta | bytes):
            raise EvaluationError(f"a {type(result).__name__} is not a JSON value: convert it with string()")
        return result

    def test(self, doc: Any) -> bool:
        """A condition's expression: must give true or false."""
        result = self.evaluate(doc)
        if not isinstance(result, bool):
            raise EvaluationError(f"a condition must give true or false, got {type(result).__name__}")
        return result


def _reason(exc: Exception) -> str:
    """The library's message without the parts that may quote values (Python errors of our functions
    carry only our own text)."""
    text = str(exc)
    inner = re.search(r"FunctionError: (.*?)(\. Check function arguments.*)?$", text, re.S)
    if inner:
        return inner.group(1)
    function = re.match(r"Function '([^']+)' error", text)
    if function:  # a CEL or library function refusing its arguments: name it, not the values (regex, number)
        return f"{function.group(1)}() cannot use its arguments"
    if isinstance(exc, ArithmeticError):
        return "arithmetic overflow or division by zero"
    if isinstance(exc, LookupError):
        return "index or key not found"
    if not isinstance(exc, TypeError | RuntimeError | ValueError):
        return f"failed ({type(exc).__name__})"
    for end in (". Convert explicitly", ". Check that", ". CEL does not coerce"):
        text = text.split(end)[0]
    return text[:300]


def compile_expression(text: Any, fmt: Format, lookups: Mapping[str, Any] | None = None) -> Expression:
    """Compile ``text`` for routes of format ``fmt``; raises :class:`ExpressionError` saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("expr must be a non-empty string")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression is longer than {MAX_LENGTH} characters: split it into fields")
    try:
        cel.compile(text)  # syntax first, on the text as written: the columns are the author's
    except ValueError as exc:
        raise ExpressionError(_syntax(str(exc))) from None
    scanner = _Scanner(text)
    rewritten = scanner.run()
    bindings = []
    for number, (path, many) in enumerate(scanner.paths):
        try:
            accessor = fmt.compile_path(path)
        except ValueError as exc:
            raise ExpressionError(f"path {path!r}: {exc}") from None
        bindings.append(_Binding(f"_path{number}", accessor, many))
    try:
        program = cel.compile(rewritten)
    except ValueError as exc:
        raise ExpressionError(_syntax(str(exc))) from None
    references = program.references()
    names = {b.name for b in bindings} | scanner.bound
    unknown = sorted(set(references["variables"]) - names)
    if unknown:
        raise ExpressionError(f"unknown name {unknown[0]!r}: read the message with path('...'), e.g. "
                              "path('PID-5.1'), and quote text ('...')")
    tables = lookups or {}
    library: dict[str, Callable[..., Any]] = {**FUNCTIONS, "lookup": lookup_function(tables)}
    called = {f for f in references["functions"] if f[0].isalpha()}
    for name in sorted(called - set(library) - _BUILTINS):
        close = difflib.get_close_matches(name, [*library, *_BUILTINS], n=1)
        raise ExpressionError(f"unknown function {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + " (functions: docs/routes.md, Expressions)")
    for name, count in scanner.calls:
        low, high = ARITY[name]
        if not low <= count <= high:
            want = str(low) if low == high else f"{low} to {high}"
            raise ExpressionError(f"{name}() takes {want} argument{'s' if high > 1 else ''}, given {count}")
    for match in _LOOKUP_TABLE.finditer(text):
        if match.group(2) not in tables:
            known = ", ".join(sorted(tables)) or "none"
            raise ExpressionError(f"lookup(): no table {match.group(2)!r} in config/lookups/ (known: {known})")
    functions = {n: library[n] for n in sorted(called & set(library))}
    _probe_types(program, bindings, functions, typed=fmt.name not in _TEXT_FORMATS)
    hoisted = hoist(rewritten, frozenset(functions))
    if hoisted is None:
        alone = re.fullmatch(r"\s*(_path\d+)\s*", rewritten)  # just path('X'): no CEL run
        return Expression(text, program, tuple(bindings), functions, direct=alone.group(1) if alone else None)
    final_text, calls = hoisted
    direct = final_text.strip() if re.fullmatch(r"\s*_h\d+\s*", final_text) else None
    final = cel.compile(final_text)
    references = final.references()
    remaining = {n: library[n] for n in references["functions"] if n in library}
    return Expression(text, final, tuple(bindings), remaining, calls, functions, direct,
                      tuple(references["variables"]) if not scanner.bound else None)


_TEXT_FORMATS = frozenset({"hl7v2", "csv", "x12"})  # their paths give strings only
_TYPE_ERRORS = ("Unsupported operation", "No such overload")


def _probe_types(program: Any, bindings: list[_Binding], functions: Mapping[str, Callable[..., Any]],
                 typed: bool) -> None:
    """CEL here has no type checker: run the expression with every path absent, then holding text (and, for
    JSON and FHIR, a number, a boolean, an object, a list); a type error in every run is one on every message."""
    samples: list[Any] = ["1", None, *([1, 1.5, True, {}, []] if typed else [])]  # JSON: objects, lists too
    reasons = []
    for sample in samples:
        env: dict[str, Any] = dict(functions)
        for binding in bindings:
            env[binding.name] = ([] if sample is None else [sample]) if binding.many else sample
        try:
            program.execute(env)
        except TypeError as exc:
            if not str(exc).startswith(_TYPE_ERRORS):
                return
            reasons.append(_reason(exc))  # the first: with text, what HL7 and CSV paths give
            continue
        except Exception:  # an index, a parse, an overflow: not a type error
            return  # (a function refusing the sample value, a missing overload)
        return
    gives = "text, a number, a boolean, an object or a list" if typed else "text"
    raise ExpressionError(f"type error on every message: {reasons[0]} (path() gives {gives}; convert with "
                          "int(), double(), string())")


def _syntax(message: str) -> str:
    """cel's parse error, shortened to the first ERROR line with its caret picture."""
    found = re.search(r"ERROR: <input>:(\d+):(\d+): (.*?)(\n|$)", message)
    if not found:
        return f"invalid expression: {message}"
    line, column, what = found.groups()[:3]
    what = re.sub(r"expecting \{.*\}", "expecting a value or an operator", what)
    return f"invalid expression at line {line}, column {column}: {what}"
