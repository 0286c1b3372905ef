"""Built-in outbound maps of the ``fhir`` connector: a catalogue CloudEvent -> FHIR R4 resources.

Pure functions. Each resource comes with the request that stores it idempotently, keyed by a
business identifier: a patient event updates the Patient (``PUT Patient?identifier=system|mrn``,
a conditional update), other events create it only if absent (``ifNoneExist``) so an order's thin
PID never overwrites the registered demographics. Encounters, orders and appointments are keyed by
their visit number / order id / appointment id, observations by the event id and position.
Several resources go as one transaction Bundle, referring to each other by ``urn:uuid:`` fullUrls
derived from the event id (the same event always yields the same bundle).

=====================================================  ==============================================
event type                                             resources
=====================================================  ==============================================
patient.registered, patient.updated                    Patient
patient.admitted, patient.transferred, .discharged     Patient + Encounter
result.reported                                        Patient + one Observation per observation
order.placed                                           Patient + ServiceRequest
appointment.booked                                     Patient + Appointment
=====================================================  ==============================================
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from middleware.errors import MappingError

DEFAULT_SYSTEMS: dict[str, str] = {  # identifier systems; a connector's identifier_systems overrides them
    "patient": "urn:middleware:identifier:mrn",
    "encounter": "urn:middleware:identifier:visit",
    "order": "urn:middleware:identifier:order",
    "appointment": "urn:middleware:identifier:appointment",
    "event": "urn:middleware:identifier:event",
}
CODE_SYSTEMS = {"LN": "http://loinc.org", "LOINC": "http://loinc.org", "SCT": "http://snomed.info/sct",
                "SNM": "http://snomed.info/sct", "CPT": "http://www.ama-assn.org/go/cpt",
                "I10": "http://hl7.org/fhir/sid/icd-10", "UCUM": "http://unitsofmeasure.org"}
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ENCOUNTER_CLASS = {"inpatient": "IMP", "outpatient": "AMB", "emergency": "EMER", "preadmit": "PRENC",
                   "recurring": "AMB", "obstetrics": "IMP"}
OBSERVATION_STATUS = {"F": "final", "C": "corrected", "P": "preliminary", "X": "cancelled", "R": "registered",
                      "I": "registered", "D": "entered-in-error", "W": "entered-in-error", "A": "amended"}
PRIORITY = {"S": "stat", "A": "asap", "R": "routine", "P": "urgent", "C": "urgent", "T": "urgent"}
_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_NUMERIC_TYPES = {"NM", "SN"}


@dataclass(frozen=True)
class Entry:
    """One resource and how to store it: ``PUT`` to a conditional URL, or ``POST`` with ``if_none_exist``."""

    resource: dict[str, Any]
    method: str
    url: str  # relative to the base: ``Patient?identifier=s|v`` or ``Patient``
    full_url: str
    if_none_exist: str | None = None

    def bundle_entry(self) -> dict[str, Any]:
        request: dict[str, Any] = {"method": self.method, "url": self.url}
        if self.if_none_exist:
            request["ifNoneExist"] = self.if_none_exist
        return {"fullUrl": self.full_url, "resource": self.resource, "request": request}


@dataclass(frozen=True)
class Context:
    """What every map reads: the event, its data, and the identifier systems."""

    event: Mapping[str, Any]
    systems: Mapping[str, str] = field(default_factory=lambda: DEFAULT_SYSTEMS)

    @property
    def data(self) -> Mapping[str, Any]:
        data = self.event.get("data")
        return data if isinstance(data, Mapping) else {}

    def get(self, dotted: str) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    def full_url(self, name: str) -> str:
        return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.event.get('id', '')}/{name}"))

    def required(self, dotted: str) -> str:
        value = self.get(dotted)
        if value in (None, ""):
            raise MappingError(f"fhir: the event has no {dotted}, which the FHIR resource is keyed by",
                               hint="map it in the route, or give this delivery its own map:")
        return str(value)


def _search(system: str, value: str) -> str:
    return "identifier=" + quote(f"{system}|{value}", safe=":/|")


def keyed(resource: dict[str, Any], ctx: Context, name: str, system: str, value: str, *,
          update: bool = True) -> Entry:
    """The resource with its identifier, stored by conditional update (or create when ``update`` is false)."""
    resource_type = str(resource["resourceType"])
    resource["identifier"] = [{"system": system, "value": value}, *resource.get("identifier", [])]
    query = _search(system, value)
    if update:
        return Entry(resource, "PUT", f"{resource_type}?{query}", ctx.full_url(name))
    return Entry(resource, "POST", resource_type, ctx.full_url(name), if_none_exist=query)


def _drop_empty(node: Any) -> Any:
    """FHIR forbids empty objects, arrays and strings: leave them out."""
    if isinstance(node, dict):
        cleaned = {k: _drop_empty(v) for k, v in node.items()}
        return {k: v for k, v in cleaned.items() if v not in (None, "", [], {})}
    if isinstance(node, list):
        return [v for v in (_drop_empty(i) for i in node) if v not in (None, "", [], {})]
    return node


def _coding(code: Any, display: Any = None, system: Any = None) -> dict[str, Any]:
    code, display = (str(v) if v is not None else None for v in (code, display))
    coding = {"system": CODE_SYSTEMS.get(str(system or "").upper()), "code": code, "display": display}
    return {"coding": [coding] if code else [], "text": display}


def patient(ctx: Context, *, update: bool) -> Entry:
    p: Mapping[str, Any] = ctx.get("patient") or {}
    name = p.get("name") or {}
    given = [g for g in (name.get("given"), name.get("middle")) if g]
    address = p.get("address") or {}
    resource = _drop_empty({
        "resourceType": "Patient",
        "name": [{"family": name.get("family"), "given": given,
                  "prefix": [name["prefix"]] if name.get("prefix") else [],
                  "suffix": [name["suffix"]] if name.get("suffix") else []}],
        "gender": p.get("sex"),
        "birthDate": p.get("birth_date"),
        "address": [{"line": [address["line"]] if address.get("line") else [], "city": address.get("city"),
                     "state": address.get("state"), "postalCode": address.get("postal_code"),
                     "country": address.get("country")}],
        "telecom": [{"system": "phone", "value": p["phone"]}] if p.get("phone") else [],
    })
    return keyed(resource, ctx, "Patient", ctx.systems["patient"], ctx.required("patient.mrn"), update=update)


def encounter(ctx: Context, status: str, subject: Entry) -> Entry:
    e: Mapping[str, Any] = ctx.get("encounter") or {}
    location = e.get("location") or {}
    where = " ".join(str(location[k]) for k in ("point_of_care", "room", "bed") if location.get(k))
    kind = ENCOUNTER_CLASS.get(str(e.get("class")))
    resource = _drop_empty({
        "resourceType": "Encounter",
        "status": status,
        "class": ({"system": _ACT_CODE, "code": kind} if kind else
                  {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "UNK"}),
        "subject": {"reference": subject.full_url},
        "period": {"start": e.get("admitted_at"), "end": e.get("discharged_at")},
        "location": [{"location": {"display": where}}] if where else [],
    })
    visit = e.get("visit_number")
    if visit:
        return keyed(resource, ctx, "Encounter", ctx.systems["encounter"], str(visit))
    return keyed(resource, ctx, "Encounter", ctx.systems["event"], str(ctx.event.get("id")))


def _value(item: Mapping[str, Any]) -> dict[str, Any]:
    value = item.get("value")
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"valueBoolean": value}
    if isinstance(value, int | float) and (item.get("value_type") in _NUMERIC_TYPES or not item.get("value_type")):
        unit = item.get("unit")
        return {"valueQuantity": {"value": value, "unit": unit,
                                  "system": "http://unitsofmeasure.org" if unit else None, "code": unit}}
    if isinstance(value, Mapping) and value.get("code"):
        return {"valueCodeableConcept": _coding(value.get("code"), value.get("text") or value.get("name"),
                                                value.get("coding_system") or value.get("system"))}
    return {"valueString": value if isinstance(value, str) else str(value)}


def observations(ctx: Context, subject: Entry) -> list[Entry]:
    items = ctx.get("observations") or []
    if not items:
        raise MappingError("fhir: the result.reported event has no observations",
                           hint="map observations in the route, or give this delivery its own map:")
    entries = []
    for number, item in enumerate(items, start=1):
        resource = _drop_empty({
            "resourceType": "Observation",
            "status": OBSERVATION_STATUS.get(str(item.get("status") or ctx.get("result.status") or "F"), "unknown"),
            "code": _coding(item.get("code"), item.get("name"), item.get("coding_system")),
            "subject": {"reference": subject.full_url},
            "effectiveDateTime": item.get("observed_at") or ctx.get("result.observed_at"),
            "issued": ctx.get("result.reported_at") if _INSTANT.match(str(ctx.get("result.reported_at"))) else None,
            **_value(item),
            "referenceRange": [{"text": item["reference_range"]}] if item.get("reference_range") else [],
            "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0078",
                                            "code": item["abnormal_flag"]}]}] if item.get("abnormal_flag") else [],
            "note": [{"text": n} for n in item.get("notes") or []],
        })
        key = f"{ctx.event.get('id')}/{number}"
        entries.append(keyed(resource, ctx, f"Observation/{number}", ctx.systems["event"], key))
    return entries


def service_request(ctx: Context, subject: Entry) -> Entry:
    order: Mapping[str, Any] = ctx.get("order") or {}
    resource = _drop_empty({
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "priority": PRIORITY.get(str(order.get("priority"))),
        "code": _coding(order.get("code"), order.get("name"), order.get("coding_system")),
        "subject": {"reference": subject.full_url},
        "authoredOn": order.get("ordered_at"),
        "note": [{"text": n} for n in order.get("notes") or []],
    })
    return keyed(resource, ctx, "ServiceRequest", ctx.systems["order"], ctx.required("order.id"))


def appointment(ctx: Context, subject: Entry) -> Entry:
    a: Mapping[str, Any] = ctx.get("appointment") or {}
    start, end = a.get("start"), a.get("end")
    timed = bool(start and end and _INSTANT.match(str(start)) and _INSTANT.match(str(end)))
    resource = _drop_empty({
        "resourceType": "Appointment",
        # FHIR: only a proposed (or cancelled) appointment may lack its start and end instants
        "status": "booked" if timed else "proposed",
        "description": a.get("reason"),
        "serviceType": [_coding(s.get("code"), s.get("name"), s.get("coding_system"))
                        for s in a.get("services") or []],
        "start": start if timed else None,
        "end": end if timed else None,
        "minutesDuration": a.get("duration") if a.get("duration_unit") in ("min", None) and
        isinstance(a.get("duration"), int) and a["duration"] > 0 else None,
        "participant": [{"actor": {"reference": subject.full_url}, "status": "accepted"}],
    })
    return keyed(resource, ctx, "Appointment", ctx.systems["appointment"], ctx.required("appointment.id"))


def _with_patient(build: Callable[[Context, Entry], Entry | list[Entry]]) -> Callable[[Context], list[Entry]]:
    def plan(ctx: Context) -> list[Entry]:
        subject = patient(ctx, update=False)
        built = build(ctx, subject)
        return [subject, *(built if isinstance(built, list) else [built])]
    return plan


def _visit(status: str) -> Callable[[Context], list[Entry]]:
    def plan(ctx: Context) -> list[Entry]:
        subject = patient(ctx, update=True)
        return [subject, encounter(ctx, status, subject)]
    return plan


MAPS: dict[str, Callable[[Context], list[Entry]]] = {
    "patient.registered": lambda ctx: [patient(ctx, update=True)],
    "patient.updated": lambda ctx: [patient(ctx, update=True)],
    "patient.admitted": _visit("in-progress"),
    "patient.transferred": _visit("in-progress"),
    "patient.discharged": _visit("finished"),
    "result.reported": _with_patient(observations),
    "order.placed": _with_patient(service_request),
    "appointment.booked": _with_patient(appointment),
}


def base_type(event_type: str) -> str:
    """``patient.admitted.v1`` -> ``patient.admitted``."""
    head, _, last = event_type.rpartition(".")
    return head if head and last.startswith("v") and last[1:].isdigit() else event_type


def resources_for(event: Mapping[str, Any], systems: Mapping[str, str] | None = None) -> list[Entry]:
    """The entries of the built-in map for ``event``'s type; raises :class:`MappingError` when there is
    none or the event lacks an identifier its resources are keyed by."""
    kind = base_type(str(event.get("type", "")))
    build = MAPS.get(kind)
    if build is None:
        raise MappingError(f"fhir: no built-in FHIR map for event type {kind or '(none)'} "
                           f"(built in: {', '.join(sorted(MAPS))})",
                           hint="give this delivery a map: that builds the resource, or a when: that skips the type")
    return build(Context(event, {**DEFAULT_SYSTEMS, **(systems or {})}))
