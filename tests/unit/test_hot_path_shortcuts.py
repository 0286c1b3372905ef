"""The HL7 hot path's shortcuts give exactly what the general code gives (issue 8: the route stays fast).

- the source identity digests the undecoded bytes when they already are the segments joined by CR;
- HL7 dates of digits (and an offset) are read without the regex;
- a naive date-time in UTC needs no zone lookup;
- the envelope ``time`` is built from the checked date, not its ISO text read again;
- a ``{path: [A, B], as: datetime}`` value is parsed once;
- event ids are the UUIDv5 text without a UUID object;
- a subject template is split once, not substituted by a regex per event.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware import dates
from middleware.envelope import EVENT_ID_NAMESPACE, event_id, rfc3339, rfc3339_when, uuid5_text
from middleware.formats import get_format
from middleware.formats.hl7v2 import Hl7Message
from middleware.mapping import compile_field, data_get
from middleware.route import EventRule

HL7 = get_format("hl7v2")


def joined_digest(message: Hl7Message) -> str:
    """What the identity digest is defined as: the parsed segments joined by CR, UTF-8."""
    return "sha256:" + hashlib.sha256("\r".join(s.raw for s in message.segments).encode()).hexdigest()


SEGMENTS = st.lists(st.text(alphabet="ABCXYZ 019|^~&éü", max_size=12), min_size=1, max_size=4).map(
    lambda values: ["PID|1||" + values[0]] + [f"OBX|{n}|ST|||{v}" for n, v in enumerate(values[1:], start=1)])


@settings(max_examples=300, deadline=None)
@given(SEGMENTS, st.sampled_from(["\r", "\n", "\r\n"]), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from(["", "UNICODE UTF-8", "8859/1", "ASCII"]))
def test_the_identity_digest_is_the_digest_of_the_joined_segments(
        segments: list[str], line_end: str, blank_lines: bool, bom: bool, mllp: bool, charset: str) -> None:
    msh = f"MSH|^~\\&|APP|FAC|||20261124083000||ADT^A01|C1|P|2.5||||||{charset}"
    body = line_end.join([msh, *(["", *segments] if blank_lines else segments)]) + line_end
    codec = {"8859/1": "latin-1", "ASCII": "ascii"}.get(charset, "utf-8")
    try:
        raw = body.encode(codec)
    except UnicodeEncodeError:
        raw = body.encode(codec, "replace")
    if bom and codec == "utf-8":
        raw = b"\xef\xbb\xbf" + raw
    if mllp:
        raw = b"\x0b" + raw + b"\x1c\r"
    message = HL7.parse(raw)
    assert message.source_identity()[4] == joined_digest(message)
    for view in HL7.each(message, "OBX"):  # a group view answers with the whole message's digest
        assert view.source_identity() == message.source_identity()


_HL7_GRAMMAR = re.compile(
    r"(?P<y>\d{4})(?:(?P<mo>\d{2})(?:(?P<d>\d{2})(?:(?P<h>\d{2})(?:(?P<mi>\d{2})(?:(?P<s>\d{2})"
    r"(?:\.(?P<frac>\d{1,4}))?)?)?)?)?)?(?P<tz>[+-]\d{4})?"
)


def by_the_grammar(text: str) -> Any:
    """The HL7 date read through the regex alone (what the digit shortcut must agree with)."""
    match = _HL7_GRAMMAR.fullmatch(text.strip())
    if match is None:
        return "not a date"
    zone = match["tz"]
    try:
        offset = dates._offset_minutes(zone[0], zone[1:3], zone[3:5]) if zone else None
        return dates._checked(match, offset)
    except dates.DateFormatError as exc:
        return str(exc)


def read(text: str) -> Any:
    try:
        return dates.parse_hl7(text)
    except dates.DateFormatError as exc:
        return "not a date" if str(exc).startswith("not an HL7") else str(exc)


DIGITS = st.text(alphabet="0123456789", min_size=4, max_size=14)
ZONES = st.sampled_from(["", "+0100", "-0500", "+1900", "+0060", "-0000", "+01", "+01a0"])


@settings(max_examples=2000, deadline=None)
@given(DIGITS, ZONES, st.sampled_from(["", "\u0661", "\u00b2", ".5", " ", "x", "+"]), st.integers(0, 16))
def test_hl7_dates_read_without_the_regex_are_what_the_grammar_reads(digits: str, zone: str, odd: str,
                                                                      at: int) -> None:
    text = digits + zone
    text = text[:at] + odd + text[at:]  # a non-ASCII digit, a superscript, a fraction, a stray character somewhere
    assert read(text) == by_the_grammar(text)


@settings(max_examples=500, deadline=None)
@given(st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)),
       st.sampled_from(["UTC", "Etc/UTC", "Zulu", "Europe/Berlin"]))
def test_a_naive_time_in_utc_gets_offset_zero_like_a_zone_lookup(moment: dt.datetime, zone: str) -> None:
    when = dates.parse_hl7(moment.strftime("%Y%m%d%H%M%S").zfill(14))
    tz = ZoneInfo(zone)
    local = dt.datetime(when.year, when.month or 1, when.day or 1, when.hour or 0, when.minute or 0,
                        when.second or 0, tzinfo=tz)
    offset = local.utcoffset()
    assert offset is not None
    assert when.in_zone(tz).offset == int(offset.total_seconds()) // 60
    assert when.in_zone(dt.UTC).offset == 0


@settings(max_examples=500, deadline=None)
@given(DIGITS, ZONES)
def test_the_envelope_time_from_the_checked_date_equals_the_one_from_its_iso_text(digits: str, zone: str) -> None:
    try:
        when = dates.parse_hl7(digits + zone)
    except dates.DateFormatError:
        return
    for tz in (ZoneInfo("UTC"), ZoneInfo("America/New_York")):
        assert rfc3339_when(when, tz) == rfc3339(when.iso(), tz)


def test_occurred_when_is_occurred_at_unformatted() -> None:
    for evn in ("EVN|A01|20261124083000|||||1974", "EVN|A01|2026112408||||", "EVN|A01|||||20261124083015+0100",
                "EVN|A01|junk"):
        message = HL7.parse(f"MSH|^~\\&|A|B|||20261124|| ADT^A01|1|P|2.5\r{evn}\rPID|1\r".encode())
        when = message.occurred_when()
        assert message.occurred_at() == (None if when is None else when.iso())


def test_a_datetime_from_several_paths_is_the_conversion_of_the_chosen_value() -> None:
    rule = compile_field("at", {"path": ["PV1-44", "EVN-6", "EVN-2"], "as": "datetime"}, HL7, {})
    date_rule = compile_field("on", {"path": ["PV1-44", "EVN-2"], "as": "date"}, HL7, {})
    for pv1_44, evn_6, evn_2 in (("1974", "", "20261124083000"), ("", "202611240830+0100", "2026"),
                                 ("", "", "2026"), ("20261124", "", ""), ("2026112408", "", "")):
        message = HL7.parse(f"MSH|^~\\&|A|B|||20261124||ADT^A01|1|P|2.5\rEVN|A01|{evn_2}||||{evn_6}\r"
                            f"PV1|1|I{'|' * 42}{pv1_44}\r".encode())
        for tz in (ZoneInfo("UTC"), ZoneInfo("Europe/Berlin")):
            chosen = rule._most_precise(message)[0]
            assert rule.evaluate(message, tz) == dates.to_datetime(chosen, tz)
            assert date_rule.evaluate(message, tz) == dates.to_date(date_rule._most_precise(message)[0])


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=200))
def test_event_ids_are_the_uuid5_of_the_json_name(name: str) -> None:
    assert uuid5_text(name.encode()) == str(uuid.uuid5(EVENT_ID_NAMESPACE, name))
    identity = ("APP", "FAC", name, "20261124083000", "sha256:00")
    expected = orjson.dumps(["adt-inbound", list(identity), "patient.admitted.v1", 2]).decode()
    assert event_id("adt-inbound", identity, "patient.admitted.v1", 2) == str(uuid.uuid5(EVENT_ID_NAMESPACE, expected))


def subject_by_substitution(template: str, data: dict[str, Any]) -> str | None:
    """The subject as one regex substitution renders it (what the split-once template must agree with)."""
    missing = False

    def fill(match: re.Match[str]) -> str:
        nonlocal missing
        value = data_get(data, match.group(1))
        missing = missing or value is None
        return "" if value is None else str(value)

    rendered = re.sub(r"\{([^{}]+)\}", fill, template)
    return None if missing else rendered


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet="ab.{}/-", max_size=20),
       st.dictionaries(st.sampled_from(["a", "b", "a.b"]), st.one_of(st.none(), st.text(max_size=3), st.integers())))
def test_a_subject_is_rendered_as_by_substitution(template: str, flat: dict[str, Any]) -> None:
    data: dict[str, Any] = {key: value for key, value in flat.items() if "." not in key}
    if "a.b" in flat:
        data["a"] = {"b": flat["a.b"]}
    rule = EventRule("t", 1, None, (), subject=template)  # type: ignore[arg-type]  # no schema needed
    assert rule.render_subject(data) == subject_by_substitution(template, data)
