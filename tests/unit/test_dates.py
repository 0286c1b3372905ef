"""Strict dates with their precision: the parser itself, ``as: date/datetime`` and the envelope ``time``
on the shipped routes (HL7 v2 DT/DTM/TS and FHIR date/dateTime/instant)."""

from __future__ import annotations

import calendar
import datetime as dt
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from middleware import dates
from middleware.dates import DateFormatError, Precision, When
from middleware.envelope import rfc3339
from middleware.errors import MappingError
from middleware.project import Project, load_project
from middleware.route import transform

REPO = Path(__file__).resolve().parents[2]
BERLIN = ZoneInfo("Europe/Berlin")
ISO_OUT = re.compile(r"\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})?)?)?)?")


# -- the parser --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "iso", "precision"), [
    ("1974", "1974", Precision.YEAR),
    ("197405", "1974-05", Precision.MONTH),
    ("19740503", "1974-05-03", Precision.DAY),
    ("1974050312", "1974-05-03T12:00:00", Precision.DATETIME),
    ("197405031230", "1974-05-03T12:30:00", Precision.DATETIME),
    ("19740503123045", "1974-05-03T12:30:45", Precision.DATETIME),
    ("19740503123045.4", "1974-05-03T12:30:45.4", Precision.DATETIME),
    ("19740503123045.1234-0530", "1974-05-03T12:30:45.1234-05:30", Precision.DATETIME),
    ("20261124082500+0000", "2026-11-24T08:25:00Z", Precision.DATETIME),
    ("20240229", "2024-02-29", Precision.DAY),  # leap day
    ("19740503+0100", "1974-05-03", Precision.DAY),  # an offset on a date alone says nothing
])
def test_hl7_values_keep_their_precision(text: str, iso: str, precision: Precision) -> None:
    when = dates.parse_hl7(text)
    assert (when.iso(), when.precision) == (iso, precision)
    assert dates.parse(text).iso() == iso


@pytest.mark.parametrize(("text", "iso"), [
    ("2016", "2016"),
    ("2016-03", "2016-03"),
    ("2016-03-28", "2016-03-28"),
    ("2016-03-28T10:15", "2016-03-28T10:15:00"),
    ("2016-03-28T10:15:30.4+02:00", "2016-03-28T10:15:30.4+02:00"),
    ("2016-03-28T10:15:30.123456789Z", "2016-03-28T10:15:30.123456789Z"),
    ("2016-03-28T10:15:30+00:00", "2016-03-28T10:15:30Z"),
])
def test_fhir_values_keep_their_precision(text: str, iso: str) -> None:
    assert dates.parse_iso(text).iso() == iso
    assert dates.to_datetime(text) == iso


@pytest.mark.parametrize("text", [
    "19840312XYZ", "1" * 100_000, "1" * 41, "198413", "19840001", "20230229", "19840332", "1984031224",
    "198403121260", "19840312123060", "19840312123045.12345", "2026112408+2500", "2026112408+1860", "0000",
    "84", "abc", "", " ", "1984 03 12",
    "2016-13-01", "2016-02-30", "2016-3-28", "2016-03-28T", "2016-03-28T25:00:00Z", "2016-03-28T10:00:00+25:00",
    "2016-03-28 10:00:00", "2016-03-28T10:00:00.1234567890Z", "2016-03-28T10Z", "2016-03-28Z", "+2016-03-28",
])
def test_garbage_raises_the_typed_error(text: str) -> None:
    with pytest.raises(DateFormatError):
        dates.parse(text)


@pytest.mark.parametrize("value", [19840312, 1984.0, True, None, ["1984"], {"y": 1984}])
def test_a_date_must_be_a_string(value: object) -> None:
    with pytest.raises(DateFormatError, match="must be a string"):
        dates.to_date(value)


def test_as_date_cuts_a_date_time_to_its_date_and_never_adds_precision() -> None:
    assert dates.to_date("198403121200+0100") == "1984-03-12"
    assert dates.to_date("1984-03-12T23:30:00-05:00") == "1984-03-12"  # the date as written, not moved to UTC
    assert (dates.to_date("1974"), dates.to_date("1974-05")) == ("1974", "1974-05")


def test_naive_date_times_get_the_zone_with_its_daylight_saving_offset() -> None:
    assert dates.to_datetime("20260701082500", BERLIN) == "2026-07-01T08:25:00+02:00"
    assert dates.to_datetime("2026-01-15T08:25:00.4", BERLIN) == "2026-01-15T08:25:00.4+01:00"
    assert dates.to_datetime("20260701082500-0400", BERLIN) == "2026-07-01T08:25:00-04:00"  # sent offset kept
    assert dates.to_datetime("20260701", BERLIN) == "2026-07-01"  # a date has no zone
    assert dates.to_datetime("20260701082500") == "2026-07-01T08:25:00"  # no zone given: stays naive


def test_envelope_time_keeps_fraction_digits_and_reads_naive_times_in_the_zone() -> None:
    utc = ZoneInfo("UTC")
    assert rfc3339("2026-11-24T08:25:00.4+01:00", utc) == "2026-11-24T08:25:00.4+01:00"  # not .400000
    assert rfc3339("2026-11-24T08:25:00", BERLIN) == "2026-11-24T08:25:00+01:00"
    assert rfc3339("2026-11-24", BERLIN) == "2026-11-24T00:00:00+01:00"
    assert rfc3339("2026-11", utc) is None
    assert rfc3339("2026-11-24XYZ", utc) is None


# -- hypothesis: valid values round-trip, anything else is the typed error ---------------------

@st.composite
def whens(draw: st.DrawFn) -> When:
    precision = draw(st.sampled_from(list(Precision)))
    year = draw(st.integers(1, 9999))
    if precision is Precision.YEAR:
        return When(year)
    month = draw(st.integers(1, 12))
    if precision is Precision.MONTH:
        return When(year, month)
    day = draw(st.integers(1, calendar.monthrange(year, month)[1]))
    if precision is Precision.DAY:
        return When(year, month, day)
    second = draw(st.integers(0, 59))
    fraction = draw(st.from_regex(r"\d{1,4}", fullmatch=True)) if draw(st.booleans()) else ""
    offset = draw(st.none() | st.integers(-18 * 60, 18 * 60))
    return When(year, month, day, draw(st.integers(0, 23)), draw(st.integers(0, 59)), second, fraction, offset)


def hl7_text(when: When) -> str:
    out = f"{when.year:04d}" + "".join(f"{part:02d}" for part in (when.month, when.day, when.hour, when.minute,
                                                                  when.second) if part is not None)
    if when.fraction:
        out += f".{when.fraction}"
    if when.offset is not None:
        sign = "-" if when.offset < 0 else "+"
        out += f"{sign}{abs(when.offset) // 60:02d}{abs(when.offset) % 60:02d}"
    return out


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])  # slow to generate on a loaded machine
@given(whens())
def test_valid_values_round_trip_with_their_precision(when: When) -> None:
    from_hl7 = dates.parse_hl7(hl7_text(when))
    assert from_hl7 == when
    from_iso = dates.parse_iso(from_hl7.iso())
    assert from_iso == when and from_iso.iso() == when.iso()
    assert dates.to_datetime(hl7_text(when)) == when.iso()
    assert dates.to_date(when.iso()) == when.truncate(Precision.DAY).iso()


def _check_iso(iso: str, precision: Precision) -> None:
    assert ISO_OUT.fullmatch(iso), iso
    if precision is Precision.DAY:
        dt.date.fromisoformat(iso)  # a real calendar day
    elif precision is Precision.DATETIME:
        dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))


@settings(max_examples=1000)
@given(st.text(max_size=30)
       | st.from_regex(r"[0-9]{0,16}(\.[0-9]{0,5})?([+-][0-9]{0,5})?", fullmatch=True)
       | st.from_regex(r"[0-9]{4}(-[0-9]{1,3}){0,2}(T[0-9:]{0,9}(\.[0-9]{0,10})?)?(Z|[+-][0-9:]{0,6})?",
                       fullmatch=True))
@example("19840312XYZ")
@example("1" * 100_000)
@example("20230229")
def test_arbitrary_strings_parse_to_a_valid_iso_value_or_raise_the_typed_error(text: str) -> None:
    try:
        when = dates.parse(text)
    except DateFormatError:
        return
    _check_iso(when.iso(), when.precision)
    _check_iso(dates.to_date(text), min(when.precision, Precision.DAY))
    _check_iso(dates.to_datetime(text, BERLIN), when.precision)


@given(st.integers() | st.floats() | st.booleans() | st.none() | st.lists(st.text(), max_size=2))
def test_arbitrary_non_strings_raise_the_typed_error(value: object) -> None:
    with pytest.raises(DateFormatError):
        dates.parse(value)


# -- on the shipped routes ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO, {})


def adt(*, pid7: str = "19840312", evn: str = "EVN|A01|20261124082900+0100", pv1_44: str = "20261124082500+0100",
        msh7: str = "20261124083000+0100", kind: str = "ADT^A01") -> bytes:
    segments = [
        f"MSH|^~\\&|EPIC|GHH|CASEMGR|GHH|{msh7}||{kind}|CTRL-1|P|2.5.1",
        evn,
        f"PID|1||MRN-4711^^^GHH^MR||Doe^Jane||{pid7}|F",
        "PV1|1|I|WARD7^0712^B^GHH" + "|" * 16 + "V-9001" + "|" * 25 + pv1_44,
    ]
    return "\r".join(segments).encode() + b"\r"


def hl7_events(project: Project, raw: bytes, tz: ZoneInfo | None = None) -> list[dict[str, Any]]:
    return transform(project.routes["adt-inbound"], raw, tz=tz).events


def fhir_events(project: Project, resource: Mapping[str, Any]) -> list[dict[str, Any]]:
    return transform(project.routes["fhir-inbound"], orjson.dumps(resource)).events


@pytest.mark.parametrize("pid7", ["19840312XYZ", "1" * 100_000, "19841312", "19840230"])
def test_hl7_garbage_birth_date_is_a_map_error_naming_the_field(project: Project, pid7: str) -> None:
    with pytest.raises(MappingError) as caught:
        hl7_events(project, adt(pid7=pid7))
    assert caught.value.stage == "map"
    assert "patient.birth_date" in caught.value.message and "PID-7" in caught.value.message
    assert pid7[:8] not in caught.value.message  # the value is PHI: never quoted


@pytest.mark.parametrize(("pid7", "expected"), [("1974", "1974"), ("197405", "1974-05"), ("19740503", "1974-05-03")])
def test_hl7_partial_birth_dates_keep_their_precision_and_pass_the_schema(project: Project, pid7: str,
                                                                          expected: str) -> None:
    [event] = hl7_events(project, adt(pid7=pid7))
    assert event["data"]["patient"]["birth_date"] == expected


def test_year_only_pv1_44_gives_way_to_the_full_evn_6(project: Project) -> None:
    evn = "EVN|A01|20261124082900+0100||||20261124081500+0100"
    [event] = hl7_events(project, adt(pv1_44="2013", evn=evn))
    assert event["data"]["encounter"]["admitted_at"] == "2026-11-24T08:15:00+01:00"


def test_year_only_pv1_44_without_a_fuller_fallback_keeps_its_precision(project: Project) -> None:
    [event] = hl7_events(project, adt(pv1_44="2013", evn="EVN|A01"))
    assert event["data"]["encounter"]["admitted_at"] == "2013"


def test_garbage_in_a_consulted_fallback_is_an_error_naming_that_path(project: Project) -> None:
    evn = "EVN|A01|2026112408290X"
    with pytest.raises(MappingError, match=r"encounter\.admitted_at: EVN-2 is not a valid datetime"):
        hl7_events(project, adt(pv1_44="2013", evn=evn))


def test_envelope_time_prefers_a_full_time_and_keeps_its_fraction(project: Project) -> None:
    [event] = hl7_events(project, adt(evn="EVN|A01|20261124082900.4+0100||||2026"))  # EVN-6 year only
    assert event["time"] == "2026-11-24T08:29:00.4+01:00"


def test_naive_times_follow_the_engine_zone_in_time_and_data_alike(project: Project) -> None:
    [event] = hl7_events(project, adt(evn="EVN|A01|20260701082900", pv1_44="20260701082500"), tz=BERLIN)
    assert event["time"] == "2026-07-01T08:29:00+02:00"
    assert event["data"]["encounter"]["admitted_at"] == "2026-07-01T08:25:00+02:00"


OBSERVATION = {
    "resourceType": "Observation", "id": "obs-1", "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]},
    "subject": {"identifier": {"value": "MRN-5820"}},
    "valueQuantity": {"value": 5.9, "unit": "mmol/L"},
}


def test_fhir_date_only_effective_gets_no_invented_midnight(project: Project) -> None:
    [event] = fhir_events(project, {**OBSERVATION, "effectiveDateTime": "2016-03-28",
                                    "issued": "2016-03-29T10:00:00.4+02:00"})
    data = event["data"]
    assert data["result"]["observed_at"] == "2016-03-28"
    assert data["observations"][0]["observed_at"] == "2016-03-28"
    assert event["time"] == "2016-03-29T10:00:00.4+02:00"  # the full `issued`, not 2016-03-28T00:00


@pytest.mark.parametrize("birth_date", [19840317, "1984-03-17XYZ", "1984-02-30", True])
def test_fhir_birth_date_that_is_not_a_valid_date_string_is_a_map_error(project: Project, birth_date: object) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "identifier": [{"value": "MRN-1"}], "birthDate": birth_date}
    with pytest.raises(MappingError) as caught:
        fhir_events(project, patient)
    assert "patient.birth_date" in caught.value.message and "Patient.birthDate" in caught.value.message


@pytest.mark.parametrize("birth_date", ["1984", "1984-03", "1984-03-17"])
def test_fhir_partial_birth_dates_are_kept(project: Project, birth_date: str) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "identifier": [{"value": "MRN-1"}],
               "name": [{"family": "Doe", "given": ["Jane"]}], "gender": "female", "birthDate": birth_date}
    [event] = fhir_events(project, patient)
    assert event["data"]["patient"]["birth_date"] == birth_date
