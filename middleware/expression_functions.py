"""The function library of ``expr:`` (docs/routes.md, Expressions): string, date, code-table, coalesce and
phone functions. Each takes and gives plain Python values; given ``null`` (None) a string or date function
gives ``null``; what it cannot use raises :class:`FunctionError` with a message that quotes no value."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from middleware import dates

MAX_RESULT = 100_000
"""Characters of a string (or items of a list) a function or an expression may produce."""


class FunctionError(ValueError):
    """A library function given something it cannot use (raised inside CEL, reported as EvaluationError)."""


def _text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FunctionError(f"{name}() expects a string, got {type(value).__name__}")
    return str(value)


def _capped(name: str, value: Any) -> Any:
    if isinstance(value, str | list) and len(value) > MAX_RESULT:
        raise FunctionError(f"{name}() result is longer than {MAX_RESULT:,}")
    return value


def _upper(s: Any) -> Any:
    return None if s is None else _text("upper", s).upper()


def _lower(s: Any) -> Any:
    return None if s is None else _text("lower", s).lower()


def _trim(s: Any) -> Any:
    return None if s is None else _text("trim", s).strip()


def _substring(s: Any, start: int, end: int | None = None) -> Any:
    if s is None:
        return None
    if not isinstance(start, int) or (end is not None and not isinstance(end, int)) or start < 0 \
            or (end is not None and end < start):
        raise FunctionError("substring() takes 0 <= start <= end (whole numbers)")
    return _text("substring", s)[start:end]


def _replace(s: Any, old: Any, new: Any) -> Any:
    if s is None:
        return None
    old_text = _text("replace", old)
    if not old_text:
        raise FunctionError("replace() needs a non-empty text to replace")
    return _capped("replace", _text("replace", s).replace(old_text, "" if new is None else _text("replace", new)))


def _split(s: Any, separator: Any) -> Any:
    if s is None:
        return []
    sep = _text("split", separator)
    if not sep:
        raise FunctionError("split() needs a non-empty separator")
    return _capped("split", _text("split", s).split(sep))


def _join(items: Any, separator: Any = "") -> Any:
    if items is None:
        return None
    if not isinstance(items, list):
        raise FunctionError(f"join() expects a list, got {type(items).__name__}")
    return _capped("join", _text("join", separator).join(_text("join", i) for i in items if i not in (None, "")))


def _coalesce(*values: Any) -> Any:
    for value in values:
        if value is not None and value != "" and value != []:
            return value
    return None


def _when(name: str, value: Any) -> dates.When:
    try:
        return dates.parse(value)
    except dates.DateFormatError as exc:
        raise FunctionError(f"{name}(): not a date: {exc}") from None


def _date(s: Any) -> Any:
    return None if s in (None, "") else _when("date", s).truncate(dates.Precision.DAY).iso()


def _datetime(s: Any) -> Any:
    return None if s in (None, "") else _when("datetime", s).iso()


def _format_date(s: Any, pattern: Any) -> Any:
    if s in (None, ""):
        return None
    when = _when("format_date", s)
    if when.day is None:
        raise FunctionError("format_date() needs a value with at least a day")
    moment = dt.datetime(when.year, when.month or 1, when.day, when.hour or 0, when.minute or 0, when.second or 0)
    return _capped("format_date", moment.strftime(_text("format_date", pattern)))


def _age(birth: Any, at: Any = None) -> Any:
    if birth in (None, ""):
        return None
    born = _when("age", birth)
    if born.day is None or born.month is None:
        raise FunctionError("age() needs a birth date with a day")
    if at in (None, ""):
        today = dt.datetime.now(dt.UTC).date()
        year, month, day = today.year, today.month, today.day
    else:
        then = _when("age", at)
        year, month, day = then.year, then.month or 12, then.day or 31
    years = year - born.year - ((month, day) < (born.month, born.day))
    return max(years, 0)


def _phone(s: Any, country: Any = None) -> Any:
    """``+<digits>`` when the number is international (``+``/``00``) or a country code is given, else digits."""
    if s in (None, ""):
        return None
    text = _text("phone", s).strip()
    digits = "".join(c for c in text if c.isdigit())
    if len(digits) < 3:
        raise FunctionError("phone(): fewer than 3 digits")
    if text.startswith("+"):
        return "+" + digits
    if digits.startswith("00"):
        return "+" + digits[2:]
    if country not in (None, ""):
        code = _text("phone", country).lstrip("+")
        if not code.isdigit():
            raise FunctionError("phone(): the country code is digits, e.g. '44'")
        if digits.startswith(code) and len(digits) > 10:
            return "+" + digits
        return "+" + code + digits.lstrip("0")
    return digits


FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    "upper": _upper, "lower": _lower, "trim": _trim, "substring": _substring, "replace": _replace,
    "split": _split, "join": _join, "coalesce": _coalesce, "date": _date, "datetime": _datetime,
    "format_date": _format_date, "age": _age, "phone": _phone,
}
"""The library every expression may call (besides CEL's own and ``lookup``); see docs/routes.md."""
ARITY: Mapping[str, tuple[int, int]] = {
    "upper": (1, 1), "lower": (1, 1), "trim": (1, 1), "substring": (2, 3), "replace": (3, 3), "split": (2, 2),
    "join": (1, 2), "coalesce": (1, 99), "date": (1, 1), "datetime": (1, 1), "format_date": (2, 2),
    "age": (1, 2), "phone": (1, 2), "lookup": (2, 2),
}


def lookup_function(tables: Mapping[str, Any]) -> Callable[[Any, Any], Any]:
    def lookup(table: Any, code: Any) -> Any:
        found = tables.get(table)
        if found is None:
            raise FunctionError(f"lookup(): no table {table!r} in config/lookups/")
        if code is None:
            return None
        try:
            return found.translate(code)
        except KeyError:
            return None

    return lookup
