"""Invented, PHI-free X12 5010 files for tests, samples and bench/batch.py (834 enrolment, 271 eligibility).

Names, ids and addresses are made up (``TESTPERSON``-style names from a fixed list, ids from counters).
Write the shipped samples again with ``.venv/bin/python -m tests.x12_files`` (from the repository root).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

FAMILY = ("ALDER", "BIRCHWOOD", "CALLOWAY", "DUNMORE", "ELSWORTH", "FAIRBANK", "GRANTLEY", "HOLLOWAY")
GIVEN = ("AVERY", "BLAKE", "CORIN", "DALLAS", "EMERY", "FINLEY", "GALEN", "HARPER")


@dataclass(frozen=True)
class Delims:
    """Separators to write with: element, repetition, component, segment terminator, and what follows it."""

    element: str = "*"
    repetition: str = "^"
    component: str = ":"
    segment: str = "~"
    newline: str = "\n"


def isa(sender: str, receiver: str, control: int, d: Delims, date: str = "261124", time: str = "0930") -> str:
    """A fixed-width ISA segment (without its terminator)."""
    e = d.element
    fields = ["ISA", "00", " " * 10, "00", " " * 10, "ZZ", sender.ljust(15), "ZZ", receiver.ljust(15), date, time,
              d.repetition, "00501", f"{control:09d}", "0", "T", d.component]
    text = e.join(fields)
    assert len(text) == 105, len(text)
    return text


def _file(segments: list[str], d: Delims) -> bytes:
    return "".join(s.replace("*", d.element).replace(":", d.component) + d.segment + d.newline
                   for s in segments).encode("latin-1")


def _envelope(isa_segment: str, gs: str, st_body: list[str], st: str, d: Delims, *, group: int, interchange: int,
              se_count: int | None = None, ge_count: int = 1, iea_count: int = 1) -> list[str]:
    count = len(st_body) + 2 if se_count is None else se_count
    return [isa_segment, gs, st, *st_body, f"SE*{count}*0001", f"GE*{ge_count}*{group}",
            f"IEA*{iea_count}*{interchange:09d}"]


def member_834(n: int, *, broken: bool = False, garbled: bool = False) -> list[str]:
    """Member loop 2000 of member ``n`` (a subscriber; every third member a dependent of the one before).

    ``broken``: no member id anywhere (the route's map refuses it); ``garbled``: a segment without a
    valid segment id (the splitter cannot frame the member).
    """
    family, given = FAMILY[n % len(FAMILY)], GIVEN[(n * 3) % len(GIVEN)]
    dependent = n % 3 == 2
    subscriber_id = f"M{(n - 1 if dependent else n):07d}"
    ins = "INS*N*19*021*28*A" if dependent else "INS*Y*18*021*28*A***FT"
    loop = [ins, f"REF*0F*{subscriber_id}", "REF*1L*GRP-55012", "DTP*356*D8*20261201",
            f"NM1*IL*1*{family}*{given}****ZZ*{'D' if dependent else 'M'}{n:07d}",
            f"N3*{100 + n % 900} EXAMPLE AVE", "N4*SPRINGFIELD*IL*62701",
            f"DMG*D8*{1950 + n % 60}{1 + n % 12:02d}{1 + n % 28:02d}*{'F' if n % 2 else 'M'}",
            f"HD*021**HLT*{'PPO GOLD' if n % 4 else 'HMO SILVER'}*{'FAM' if n % 5 else 'EMP'}",
            "DTP*348*D8*20261201"]
    if n % 7 == 0:
        loop[0] = "INS*Y*18*024*07*A***FT"  # a cancellation: coverage ends
        loop.append("DTP*349*D8*20261231")
    if broken:
        loop = [s for s in loop if not s.startswith(("REF*0F", "NM1*IL"))] + [f"NM1*IL*1*{family}*{given}"]
    if garbled:
        loop.insert(4, "n#3 100 EXAMPLE AVE")
    return loop


def file_834(members: int, *, d: Delims = Delims(), broken: Collection[int] = (),
             garbled: Collection[int] = (), se_count: int | None = None, ge_count: int = 1,
             iea_count: int = 1, control: int = 101) -> bytes:
    """An 834 with ``members`` member loops (numbered from 1); counts can be made wrong on purpose;
    ``control``: the interchange control number ISA-13 (another one makes another file)."""
    body = ["BGN*00*ENR20261124*20261124*0930****4", "REF*38*GRP-55012", "DTP*007*D8*20261201",
            "N1*P5*NORTHWIND LOGISTICS*FI*990000001", "N1*IN*LAKESIDE HEALTH PLAN*FI*990000002"]
    for n in range(1, members + 1):
        body += member_834(n, broken=n in broken, garbled=n in garbled)
    segments = _envelope(isa("NORTHWIND", "LAKESIDEHP", control, d), "GS*BE*NORTHWIND*LAKESIDEHP*20261124*0930*101*X*"
                         "005010X220A1", body, "ST*834*0001*005010X220A1", d, group=101, interchange=control,
                         se_count=se_count, ge_count=ge_count, iea_count=iea_count)
    return _file(segments, d)


def stream_834(members: int, d: Delims = Delims()) -> Iterator[bytes]:
    """The same 834 as :func:`file_834`, written piece by piece (for files larger than memory should hold)."""
    head = [isa("NORTHWIND", "LAKESIDEHP", 101, d), "GS*BE*NORTHWIND*LAKESIDEHP*20261124*0930*101*X*005010X220A1",
            "ST*834*0001*005010X220A1", "BGN*00*ENR20261124*20261124*0930****4", "REF*38*GRP-55012",
            "DTP*007*D8*20261201", "N1*P5*NORTHWIND LOGISTICS*FI*990000001",
            "N1*IN*LAKESIDE HEALTH PLAN*FI*990000002"]
    yield _file(head, d)
    count = len(head) - 2
    for n in range(1, members + 1):
        loop = member_834(n)
        count += len(loop)
        yield _file(loop, d)
    yield _file([f"SE*{count + 1}*0001", "GE*1*101", "IEA*1*000000101"], d)


def subscriber_271(n: int, dependents: int = 0, *, hl: int, broken: bool = False,
                   garbled: bool = False) -> tuple[list[str], int]:
    """Loop 2000C (and 2000D per dependent) of subscriber ``n``; returns the segments and the next HL id.

    ``broken``: neither a member id nor an MRN (the schema refuses it); ``garbled``: a segment without a
    valid segment id (the splitter cannot frame the subscriber).
    """
    family, given = FAMILY[n % len(FAMILY)], GIVEN[(n * 5) % len(GIVEN)]
    active = n % 4 != 0
    loop = [f"HL*{hl}*2*22*{1 if dependents else 0}", f"TRN*2*TRACE{n:05d}*9CLINIC001",
            f"NM1*IL*1*{family}*{given}****MI*M{n:07d}", f"REF*EJ*MRN-{20000 + n}",
            f"DMG*D8*{1960 + n % 40}0{1 + n % 9}15*{'F' if n % 2 else 'M'}", "DTP*346*D8*20260101"]
    loop += ["EB*1*IND*30**PPO GOLD", "EB*C*IND*30***23*250"] if active else ["EB*6*IND*30**PPO GOLD",
                                                                          "DTP*347*D8*20261031"]
    if broken:
        loop = [s for s in loop if not s.startswith(("NM1*IL", "REF*EJ"))] + [f"NM1*IL*1*{family}*{given}"]
    if garbled:
        loop.insert(3, "rEF EJ MRN")
    parent, hl = hl, hl + 1
    for k in range(dependents):
        loop += [f"HL*{hl}*{parent}*23*0", f"TRN*2*TRACE{n:05d}{k + 1}*9CLINIC001",
                 f"NM1*03*1*{family}*{GIVEN[(n + k + 1) % len(GIVEN)]}", f"REF*EJ*MRN-{30000 + n * 10 + k}",
                 f"DMG*D8*{2010 + k}0601*{'M' if k % 2 else 'F'}", "INS*N*19", "DTP*346*D8*20260101",
                 "EB*1*IND*30**PPO GOLD"]
        hl += 1
    return loop, hl


def file_271(subscribers: int, *, dependents: dict[int, int] | None = None, broken: Collection[int] = (),
             garbled: Collection[int] = (), d: Delims = Delims()) -> bytes:
    """A 271 answering for ``subscribers`` subscribers (``dependents``: subscriber number -> how many)."""
    body = ["BHT*0022*11*ELIG20261124*20261124*1015", "HL*1**20*1",
            "NM1*PR*2*LAKESIDE HEALTH PLAN*****PI*990000002", "HL*2*1*21*1",
            "NM1*1P*2*RIVERSIDE FAMILY CLINIC*****XX*1234567893"]
    hl = 3
    for n in range(1, subscribers + 1):
        loop, hl = subscriber_271(n, (dependents or {}).get(n, 0), hl=hl, broken=n in broken, garbled=n in garbled)
        body += loop
    segments = _envelope(isa("LAKESIDEHP", "CLINIC01", 201, d, time="1015"),
                         "GS*HB*LAKESIDEHP*CLINIC01*20261124*1015*201*X*005010X279A1", body,
                         "ST*271*0001*005010X279A1", d, group=201, interchange=201)
    return _file(segments, d)


def write_samples(root: Path) -> list[Path]:
    """The shipped samples: samples/enrolment-x12/ and samples/eligibility-x12/, one record in each that cannot
    be framed (a garbled segment): published, it is dead-lettered alone with its position."""
    enrolment, eligibility = root / "samples" / "enrolment-x12", root / "samples" / "eligibility-x12"
    enrolment.mkdir(parents=True, exist_ok=True)
    eligibility.mkdir(parents=True, exist_ok=True)
    written = [enrolment / "834-northwind-december.x12", eligibility / "271-lakeside-batch.x12"]
    written[0].write_bytes(file_834(6, garbled={4}))
    written[1].write_bytes(file_271(4, dependents={2: 2}, garbled={3}))
    return written


if __name__ == "__main__":
    for path in write_samples(Path.cwd()):
        print(path)
