"""Segment groups of an HL7 v2 message, following the standard's message structures.

``for_each: OBR`` on an event rule and ``each: OBX`` in a map both cut a message into groups, one
per anchor segment. Which segments belong to a group follows the HL7 abstract message syntax:

- a group may start just before its anchor with *leaders*: ``[ORC] OBR`` (ORU_R01 ORDER_OBSERVATION),
  ``ORC [TQ1 {TQ2}] OBR`` (OML_O21), ``PID [PD1] MRG`` (ADT_A40 PATIENT);
- a *leaf* group holds its anchor and only the segments that annotate it: ``OBX {NTE} {PRT}``
  (OBSERVATION), ``AIS {NTE}`` and the other SIU resources, ``SPM {OBX {NTE}}`` (SPECIMEN: an OBX
  after an SPM describes the specimen, it is not one of the order's observations);
- any other group runs up to the next group, or up to a segment of a kind that came before the first
  group (its parents: the next patient's PID in an ORU with several patients);
- NTE, PRT, OBX and Z segments occur at several levels (patient, order, observation): they never end a
  group as "parents", and a group never reads the ones of another level.

Reading a group: its own segments of these kinds resolve within the group (an order without an ORC
reads no ORC, not the previous order's); parents that repeat resolve to the nearest one before the
group (its patient); everything else reads the whole message (MSH, EVN, a single PID). Segments of a
leaf group nested in the group (an OBX's NTEs) are read through that leaf (``each: OBX``), not at the
group's level: ``NTE[*]-3`` on an ORDER_OBSERVATION gives the order's notes only.
"""

from __future__ import annotations

from typing import Any

# anchor -> (the segment a run of leaders must start with, segments allowed between it and the anchor)
_ORDER_LEAD = ("ORC", frozenset({"TQ1", "TQ2", "PRT", "NTE"}))
LEADERS: dict[str, tuple[str, frozenset[str]]] = {
    **dict.fromkeys(("OBR", "RXO", "RXE", "RXD", "RXG", "RXA", "RQD", "RQ1", "ODS", "ODT"), _ORDER_LEAD),
    "MRG": ("PID", frozenset({"PD1"})),
}
# leaf anchor -> the segments that may follow it inside its group (Z segments always may)
LEAF_MEMBERS: dict[str, frozenset[str]] = {
    "OBX": frozenset({"NTE", "PRT"}),
    **dict.fromkeys(("AIS", "AIG", "AIL", "AIP"), frozenset({"NTE"})),
    "TQ1": frozenset({"TQ2"}),
    "SPM": frozenset({"OBX", "NTE", "PRT"}),  # SPECIMEN = SPM {OBX {NTE}}: the specimen's observations
}
MULTI_LEVEL = frozenset({"NTE", "PRT", "OBX"})  # found at several levels of one message


def _is_z(segment_id: str) -> bool:
    return segment_id[:1] == "Z"


def _lead_start(segments: list[Any], position: int, floor: int, anchor_id: str) -> int:
    """Where the group of the anchor at ``position`` starts: earlier when leaders open it."""
    lead = LEADERS.get(anchor_id)
    if lead is None:
        return position
    head, between = lead
    back = position - 1
    while back >= floor and segments[back].id in between:
        back -= 1
    return back if back >= floor and segments[back].id == head else position


def spans(segments: list[Any], anchors: list[int], anchor_id: str) -> tuple[int, list[tuple[int, int, int]]]:
    """Where the header ends, and ``(start, anchor, end)`` of each group; ``anchors`` are the positions of
    the selected anchors (a selector may leave some segments of the anchor's kind out)."""
    if not anchors:
        return 0, []
    first_any = next(i for i, s in enumerate(segments) if s.id == anchor_id)
    header_end = _lead_start(segments, first_any, 0, anchor_id)
    starts: list[int] = []
    floor = 0
    for position in anchors:
        starts.append(_lead_start(segments, position, floor, anchor_id))
        floor = position + 1
    parents = {s.id for s in segments[:header_end]} - MULTI_LEVEL
    members = LEAF_MEMBERS.get(anchor_id)
    found = []
    for number, (start, position) in enumerate(zip(starts, anchors, strict=True)):
        limit = starts[number + 1] if number + 1 < len(starts) else len(segments)
        end = position + 1
        while end < limit:
            segment_id = segments[end].id
            if segment_id == anchor_id:  # an anchor the selector left out (each: OBX[2=NM])
                break
            if members is not None:
                if segment_id not in members and not _is_z(segment_id):
                    break
            elif segment_id in parents and not _is_z(segment_id):
                break
            end += 1
        found.append((start, position, end))
    return header_end, found


def own_segments(segments: list[Any], anchor: int) -> list[Any]:
    """The segments read at this group's level: those of leaf groups nested in it (an OBX's NTEs) left out."""
    own = []
    nested: frozenset[str] | None = None
    for position, segment in enumerate(segments):
        segment_id = segment.id
        if nested is not None and (segment_id in nested or _is_z(segment_id)):
            continue
        nested = LEAF_MEMBERS.get(segment_id) if position != anchor else None
        own.append(segment)
    return own


def split(message: Any, chosen: list[Any], anchor_id: str) -> list[Any]:
    """One view of ``message`` per group anchored at the ``chosen`` segments (see the module doc)."""
    segments = message.segments
    wanted = {id(s) for s in chosen}
    anchors = [i for i, s in enumerate(segments) if id(s) in wanted]
    header_end, found = spans(segments, anchors, anchor_id)
    if not found:
        return []
    parents = {s.id for s in segments[:header_end]} - MULTI_LEVEL
    repeated = {p for p in parents if len(message.all(p)) > 1}
    scoped = {s.id for start, _, end in found for s in segments[start:end]} | MULTI_LEVEL | {anchor_id}
    views = []
    nearest: dict[str, Any] = {}
    cursor = 0
    for start, anchor, end in found:
        for segment in segments[cursor:start]:
            if segment.id in repeated:
                nearest[segment.id] = segment
        cursor = start
        group = segments[start:end]
        views.append(message.group(group, own_segments(group, anchor - start), scoped, dict(nearest)))
    return views
