"""``middleware inspect`` on X12: one block per record as ``publish`` splits it, every element at the path a
route's map reads it with (``NM1[IL]-9``, ``DTP[348]-3``, ``HD-3.1``), checked by reading each path back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from middleware.formats import get_format
from middleware.inspect import detect_format, inspect_input, render_text
from tests.unit.test_inspect import assert_round_trip, documents

REPO = Path(__file__).resolve().parents[2]
X12_SAMPLES = sorted((REPO / "samples").rglob("*.x12"))
ISA = "ISA*00*          *00*          *ZZ*NORTHWIND      *ZZ*LAKESIDEHP     *261124*0930*^*00501*000000101*0*T*:~"


def record(*segments: str) -> bytes:
    return "\n".join([ISA, "GS*BE*NORTHWIND*LAKESIDEHP*20261124*0930*101*X*005010X220A1~",
                      "ST*834*0001*005010X220A1~", *segments, "SE*9*0001~", "GE*1*101~", "IEA*1*000000101~"]
                     ).encode()


@pytest.mark.parametrize("sample", X12_SAMPLES, ids=lambda p: p.name)
def test_every_printed_path_of_the_shipped_x12_samples_reads_its_value(sample: Path) -> None:
    raw = sample.read_bytes()
    assert detect_format(raw) == "x12"
    fmt, messages = inspect_input(raw)
    assert fmt == "x12" and len(messages) > 1  # one block per member / subscriber / dependent
    assert assert_round_trip(raw) > 0
    assert any(m.error for m in messages)  # each sample holds one record that cannot be framed


def test_the_834_member_prints_the_qualified_paths_maps_use() -> None:
    raw = (REPO / "samples/enrolment-x12/834-northwind-december.x12").read_bytes()
    first = inspect_input(raw)[1][0]
    values = {f.path: f.value for f in first.fields}
    assert first.message_type == "834"
    assert values["NM1[IL]-9"] == "M0000001"
    assert values["DTP[348]-3"] == "20261201"
    assert values["REF[0F]-2"] == "M0000001"
    assert values["INS-1"] == "Y" and values["HD-3"] == "HLT"  # not qualified: the first element is data
    assert values["ISA-16"] == ":" and values["ISA-6"] == "NORTHWIND"  # the envelope, trimmed, separators as sent


def test_components_repeats_and_a_second_segment_of_one_qualifier() -> None:
    raw = record("INS*Y*18*021*28*A~", "REF*0F*M1~", "REF*0F*M2~", "NM1*IL*1*DOE*JO~", "HI*ABK:J449*ABF:E119~",
                 "DTP*348*D8*20261201~", "DTP*349*D8*20261231~")
    (message,) = inspect_input(raw, "x12")[1]
    fields = {f.path: f for f in message.fields}
    assert fields["HI-1.1"].value == "ABK" and fields["HI-2.2"].value == "E119"
    assert fields["DTP[349]-3"].value == "20261231"
    second = fields["REF[0F]#2-2"]
    assert second.value == "M2" and not second.addressable and "REF[*]" in (second.note or "")
    (doc,) = documents(raw, "x12")
    assert get_format("x12").compile_path("REF[*]-2").read(doc) == ["M1", "M2"]
    assert assert_round_trip(raw) == sum(f.addressable for f in message.fields)
    lines = list(render_text("x.x12", "x12", [message]))
    assert lines[0] == f"# message 1 of x.x12: x12 834, {len(message.fields)} value(s)"
    assert any(line.startswith("REF[0F]#2-2") and line.endswith("reads every REF as a list)") for line in lines)


def test_cli_reads_x12_and_prints_json() -> None:
    sample = REPO / "samples/enrolment-x12/834-northwind-december.x12"
    out = subprocess.run([sys.executable, "-m", "middleware", "inspect", str(sample), "--json"],
                         capture_output=True, timeout=60)
    assert out.returncode == 1  # the sample's broken member does not parse
    document = orjson.loads(out.stdout)
    assert document["format"] == "x12"
    first = document["messages"][0]
    assert {"path": "NM1[IL]-9", "value": "M0000001"} in first["fields"]
