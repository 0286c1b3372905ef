"""HL7 v2 values typed by their data type: OBX-5 read as OBX-2 says (``typed_by: OBX-2`` in a map).

| data type | JSON value |
|---|---|
| NM | a number (``7.25``, ``196``) |
| SN | ``{comparator, value, separator, value2}``: ``^182``, ``<^5``, ``1^:^2`` (absent parts left out) |
| CE, CWE, CNE, CF | a code ``{code, display, system}`` (the alternate triplet when the first is empty) |
| ST, TX, FT | text; repetitions joined by line breaks (``This~Is~A~Report``) |
| DT, DTM, TS | an ISO 8601 date or date-time at the precision sent (:mod:`middleware.dates`) |
| ED | ``{source, type, subtype, encoding, size}``: content stays in the message; ``size`` in bytes, decoded |
| RP | ``{pointer, application, type, subtype}`` |
| XTN | a telecom ``{system, value, use}`` (FHIR ContactPoint codes) |
| anything else | component 1 as text (as an untyped path reads it) |

Other repeated values become a list. A value that is not what its type says (``NM`` holding ``<5``, a
date that does not parse) is kept as the text sent rather than failing the whole message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from middleware import dates

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_TEXT = frozenset({"ST", "TX", "FT"})
_CODED = frozenset({"CE", "CWE", "CNE", "CF"})
_DATES = frozenset({"DT", "DTM", "TS"})
_NULL = '""'
_SEPARATORS = frozenset({"-", "+", "/", ".", ":"})
_COMPARATORS = frozenset({"", ">", "<", ">=", "<=", "=", "<>"})
# HL7 table 0202 telecommunication equipment type -> FHIR ContactPoint.system
_TELECOM_SYSTEM = {"PH": "phone", "CP": "phone", "FX": "fax", "BP": "pager", "INTERNET": "email",
                   "X.400": "email", "MD": "other", "TDD": "other", "TTY": "other", "SAT": "phone"}
# HL7 table 0201 telecommunication use code -> FHIR ContactPoint.use
_TELECOM_USE = {"PRN": "home", "ORN": "home", "VHN": "temp", "WPN": "work", "ASN": "work", "BPN": "work",
                "EMR": "temp", "PRS": "mobile"}


def number(text: str) -> int | float | None:
    """An HL7 NM as a JSON number (int when written without a decimal point); None when it is not one."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    return float(text) if "." in text else int(text)


def _components(message: Any, repetition: str) -> list[str]:
    return [message.unescape(c) for c in repetition.split(message.delimiters.component)]


def _part(parts: list[str], number_: int) -> str:
    """Component ``number_`` (1-based), its first subcomponent; "" when absent."""
    if number_ > len(parts):
        return ""
    return parts[number_ - 1]


def _compact(**values: Any) -> dict[str, Any] | None:
    kept = {k: v for k, v in values.items() if v not in ("", None)}
    return kept or None


def _structured(parts: list[str]) -> Any:
    if number(parts[0]) is not None and len(parts) > 1 and parts[1] in _SEPARATORS:
        parts = ["", *parts]  # ``1^:^2``: a sender that left out the empty comparator component
    comparator, first, separator, second = (_part(parts, n) for n in (1, 2, 3, 4))
    value, value2 = number(first), number(second)
    if (first and value is None) or (second and value2 is None) or comparator not in _COMPARATORS:
        return None
    return _compact(comparator=comparator, value=value, separator=separator, value2=value2)


def _coded(parts: list[str], sub: str) -> Any:
    code, display, system = (_part(parts, n).split(sub, 1)[0] for n in (1, 2, 3))
    if not (code or display):
        code, display, system = (_part(parts, n).split(sub, 1)[0] for n in (4, 5, 6))
    return _compact(code=code, display=display or _part(parts, 9), system=system)


def _encapsulated(parts: list[str]) -> Any:
    encoding, data = _part(parts, 4), _part(parts, 5).strip()
    size: int | None = None
    if data:
        kind = encoding.upper()
        if kind == "BASE64":
            body = "".join(data.split())
            size = len(body) * 3 // 4 - (len(body) - len(body.rstrip("=")))
        elif kind == "HEX":
            size = len(data) // 2
        else:  # A: ASCII text
            size = len(data.encode())
    return _compact(source=_part(parts, 1), type=_part(parts, 2), subtype=_part(parts, 3), encoding=encoding,
                    size=size)


def _telecom(parts: list[str]) -> Any:
    use_code, equipment = _part(parts, 2).upper(), _part(parts, 3).upper()
    system = _TELECOM_SYSTEM.get(equipment, "other" if equipment else "")
    email = _part(parts, 4)
    if email and (system in ("email", "") or not (_part(parts, 1) or _part(parts, 7))):
        system, value = "email", email
    else:
        pieces = [f"+{_part(parts, 5)}" if _part(parts, 5) else "", _part(parts, 6), _part(parts, 7)]
        composed = " ".join(p for p in pieces if p)
        if composed and _part(parts, 8):
            composed += f" ext. {_part(parts, 8)}"
        value = _part(parts, 12) or _part(parts, 1) or composed
        system = system or ("phone" if value else "")
    use = "mobile" if equipment == "CP" else _TELECOM_USE.get(use_code, "")
    return _compact(system=system, value=value, use=use)


def _one(message: Any, datatype: str, repetition: str) -> Any:
    """One repetition typed by ``datatype``; None when it holds nothing."""
    parts = _components(message, repetition)
    first = parts[0]
    if datatype == "NM":
        value = number(first)
        return first or None if value is None else value
    if datatype == "SN":
        return _structured(parts) or " ".join(p for p in parts if p) or None
    if datatype in _CODED:
        return _coded(parts, message.delimiters.subcomponent)
    if datatype in _DATES:
        stamp = first.split(message.delimiters.subcomponent, 1)[0]
        try:
            return dates.parse_hl7(stamp).iso() if stamp else None
        except ValueError:
            return stamp
    if datatype == "ED":
        return _encapsulated(parts)
    if datatype == "RP":
        return _compact(pointer=first, application=_part(parts, 2).split(message.delimiters.subcomponent, 1)[0],
                        type=_part(parts, 3), subtype=_part(parts, 4))
    if datatype == "XTN":
        return _telecom(parts)
    return first.split(message.delimiters.subcomponent, 1)[0] or None


def typed_value(message: Any, raw_field: str, datatype: str) -> Any:
    """The value of one field (raw, as in the segment) typed by ``datatype``; None when it is empty."""
    d = message.delimiters
    repetitions = [r for r in raw_field.split(d.repetition) if r and r != _NULL]
    datatype = datatype.strip().upper()
    if datatype in _TEXT:
        text = "\n".join(message.unescape(r) for r in repetitions).strip("\n")
        return text or None
    values = [v for v in (_one(message, datatype, r) for r in repetitions) if v is not None]
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class TypedFieldPath:
    """``{path: OBX-5, typed_by: OBX-2}``: each selected segment's field, typed by another field of it."""

    expr: str
    value_path: Any  # the compiled Hl7Path of the value field
    type_field: int

    @property
    def multiple(self) -> bool:
        return bool(self.value_path.segment_selector.every)

    def read(self, doc: Any) -> list[Any]:
        out = []
        field = self.value_path.field
        for segment in self.value_path.select_segments(doc):
            raw = segment.field(field)
            if not raw:
                continue
            datatype = doc.unescape(segment.field(self.type_field).split(doc.delimiters.component, 1)[0])
            value = typed_value(doc, raw, datatype)
            if value is not None:
                out.append(value)
        return out
