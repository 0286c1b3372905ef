"""Strict dates and times that keep the precision they were sent with.

Two grammars are read, and nothing else:

- HL7 v2 DT / DTM / TS: ``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]``
  (``1974`` -> ``1974``, ``197405`` -> ``1974-05``, ``20261124082500+0100`` -> ``2026-11-24T08:25:00+01:00``);
- ISO 8601 as FHIR uses it for date / dateTime / instant: ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``,
  ``YYYY-MM-DDThh:mm[:ss[.fffffffff]][Z|+hh:mm|-hh:mm]``.

Anything else -- trailing letters (``19840312XYZ``), 100k digits, month 13, 31 February, a JSON number where a
string belongs -- raises :class:`DateFormatError`; a value is never truncated into a date it does not say.

Precision is one of year, month, day or date-time. A time of day given to the hour or minute is written with
the missing minutes / seconds as ``00`` (RFC 3339 and FHIR have no shorter time); fraction digits are kept
exactly as sent (``.4`` stays ``.4``). A date-time without an offset is *naive*: :meth:`When.in_zone` gives it
the configured ``engine.timezone`` -- the one rule the envelope ``time`` and the event ``data`` share.
"""

from __future__ import annotations

import calendar
import datetime as dt
import enum
import re
from typing import Any, NamedTuple

MAX_LENGTH = 40  # longer than any legal value in either grammar: refused before any regex runs

_HL7 = re.compile(
    r"(?P<y>\d{4})(?:(?P<mo>\d{2})(?:(?P<d>\d{2})(?:(?P<h>\d{2})(?:(?P<mi>\d{2})(?:(?P<s>\d{2})"
    r"(?:\.(?P<frac>\d{1,4}))?)?)?)?)?)?(?P<tz>[+-]\d{4})?"
)
_ISO = re.compile(
    r"(?P<y>\d{4})(?:-(?P<mo>\d{2})(?:-(?P<d>\d{2})(?:T(?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})"
    r"(?:\.(?P<frac>\d{1,9}))?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_MAX_OFFSET_MINUTES = 18 * 60
_DIGITS_ONLY = frozenset({4, 6, 8, 10, 12, 14})  # YYYY ... YYYYMMDDHHMMSS: what _HL7 matches without . or +/-
_UTC_KEYS = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu"})
_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February checked for leap years apart


class DateFormatError(ValueError):
    """A value is not a date / date-time of the HL7 v2 or ISO 8601 (FHIR) grammar; says why, never quotes it."""


class Precision(enum.IntEnum):
    """How much of a date / date-time the source gave."""

    YEAR = 1
    MONTH = 2
    DAY = 3
    DATETIME = 4


class When(NamedTuple):
    """A checked date or date-time with its precision; absent parts are None (a tuple: cheap to build).

    ``offset`` is the UTC offset in minutes (None: naive, or a date without time). ``fraction`` holds the
    fraction-of-second digits as sent ("" when none).
    """

    year: int
    month: int | None = None
    day: int | None = None
    hour: int | None = None
    minute: int | None = None
    second: int | None = None
    fraction: str = ""
    offset: int | None = None

    @property
    def precision(self) -> Precision:
        if self.hour is not None:
            return Precision.DATETIME
        if self.day is not None:
            return Precision.DAY
        return Precision.MONTH if self.month is not None else Precision.YEAR

    @property
    def naive(self) -> bool:
        """A date-time without a UTC offset."""
        return self.hour is not None and self.offset is None

    def iso(self) -> str:
        """ISO 8601 / RFC 3339 text at this value's precision (``1974``, ``1974-05``, ``…T08:25:00.4+01:00``)."""
        year, month, day, hour, minute, second, fraction, offset = self
        if hour is not None:
            out = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute or 0:02d}:{second or 0:02d}"
            if fraction:
                out += "." + fraction
            return out if offset is None else out + _offset_text(offset)
        if day is not None:
            return f"{year:04d}-{month:02d}-{day:02d}"
        return f"{year:04d}" if month is None else f"{year:04d}-{month:02d}"

    def truncate(self, precision: Precision) -> When:
        """This value cut to ``precision`` (a date-time to its date, as written); never adds precision."""
        if precision >= self.precision:
            return self
        return When(self.year, self.month if precision >= Precision.MONTH else None,
                    self.day if precision >= Precision.DAY else None)

    def in_zone(self, tz: dt.tzinfo | None) -> When:
        """A naive date-time read as local time in ``tz`` (DST-aware); anything else unchanged."""
        if tz is None or not self.naive:
            return self
        if tz is dt.UTC or getattr(tz, "key", None) in _UTC_KEYS:  # no local time to look up
            return self._replace(offset=0)
        assert self.month is not None and self.day is not None and self.hour is not None
        local = dt.datetime(self.year, self.month, self.day, self.hour, self.minute or 0, self.second or 0,
                            tzinfo=tz)
        delta = local.utcoffset()
        return self._replace(offset=0 if delta is None else int(delta.total_seconds()) // 60)


def _offset_text(minutes: int) -> str:
    if minutes == 0:
        return "Z"
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{mins:02d}"


def _checked(match: re.Match[str], offset: int | None) -> When:
    y, mo, d, h, mi, s, fraction = match.group("y", "mo", "d", "h", "mi", "s", "frac")
    return _when(int(y), None if mo is None else int(mo), None if d is None else int(d),
                 None if h is None else int(h), None if mi is None else int(mi), None if s is None else int(s),
                 fraction or "", offset)


def _when(year: int, month: int | None, day: int | None, hour: int | None, minute: int | None,
          second: int | None, fraction: str, offset: int | None) -> When:
    if year < 1:
        raise DateFormatError("year 0000 does not exist")
    if month is not None and not 1 <= month <= 12:
        raise DateFormatError("month out of range (01-12)")
    if day is not None and month is not None and not 1 <= day <= (
            _DAYS[month] if month != 2 or day < 29 else 28 + calendar.isleap(year)):
        raise DateFormatError("day out of range for its month")
    if hour is not None and hour > 23:
        raise DateFormatError("hour out of range (00-23)")
    if minute is not None and minute > 59:
        raise DateFormatError("minute out of range (00-59)")
    if second is not None and second > 59:
        raise DateFormatError("second out of range (00-59)")
    if hour is None:
        offset = None  # an offset on a date alone says nothing about the date
    return When(year, month, day, hour, minute, second, fraction, offset)


def _offset_minutes(sign: str, hours: str, minutes: str) -> int:
    total = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or total > _MAX_OFFSET_MINUTES:
        raise DateFormatError("UTC offset out of range")
    return -total if sign == "-" else total


def _text(value: Any) -> str:
    if not isinstance(value, str):
        kind = "a boolean" if isinstance(value, bool) else "a number" if isinstance(value, int | float) else (
            f"a {type(value).__name__}")
        raise DateFormatError(f"a date must be a string, got {kind}")
    if len(value) > MAX_LENGTH:
        raise DateFormatError(f"too long for a date ({len(value)} characters)")
    return value.strip()


def parse_hl7(value: Any) -> When:
    """An HL7 v2 DT / DTM / TS value (``YYYY[MM[DD[HH[MM[SS[.S…]]]]]][+/-ZZZZ]``); raises DateFormatError."""
    return _hl7(_text(value))


def parse_iso(value: Any) -> When:
    """An ISO 8601 date / dateTime / instant as FHIR writes them; raises DateFormatError."""
    return _iso(_text(value))


def parse(value: Any) -> When:
    """A value in either grammar: ISO 8601 when it has ``-`` after the year or a ``T``, else HL7 v2."""
    text = _text(value)
    return _iso(text) if text[4:5] == "-" or "T" in text else _hl7(text)


def _hl7(text: str) -> When:
    size = len(text)
    zone = text[-5:] if size > 5 and text[-5] in "+-" else ""
    if zone:
        size -= 5
    if size in _DIGITS_ONLY and text[:size].isdecimal() and (not zone or zone[1:].isdecimal()):
        # the common shapes (digits, an offset), read without the regex: the same value and checks
        return _when(int(text[:4]), int(text[4:6]) if size > 4 else None, int(text[6:8]) if size > 6 else None,
                     int(text[8:10]) if size > 8 else None, int(text[10:12]) if size > 10 else None,
                     int(text[12:14]) if size > 12 else None, "",
                     _offset_minutes(zone[0], zone[1:3], zone[3:5]) if zone else None)
    match = _HL7.fullmatch(text)
    if match is None:
        raise DateFormatError("not an HL7 date/time (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])")
    zone = match["tz"]
    return _checked(match, _offset_minutes(zone[0], zone[1:3], zone[3:5]) if zone else None)


def _iso(text: str) -> When:
    match = _ISO.fullmatch(text)
    if match is None:
        raise DateFormatError("not an ISO 8601 date/time (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss±hh:mm)")
    zone = match["tz"]
    offset = None if not zone else 0 if zone == "Z" else _offset_minutes(zone[0], zone[1:3], zone[4:6])
    return _checked(match, offset)


def to_date(value: Any) -> str:
    """``as: date``: the value at its own precision, at most a day (a date-time gives its date as written)."""
    return parse(value).truncate(Precision.DAY).iso()


def to_datetime(value: Any, tz: dt.tzinfo | None = None) -> str:
    """``as: datetime``: the value at its own precision; a naive date-time gets ``tz`` when given."""
    return parse(value).in_zone(tz).iso()

