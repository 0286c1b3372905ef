"""FHIR R4 JSON resources and Bundles, read with a small FHIRPath subset (``format: fhir``).

The hot path is orjson plus compiled paths evaluated on plain dicts; fhir.resources models are
used only to recognise resource types and, for ``validation: strict`` routes, to validate the
whole resource (see :meth:`FhirFormat.check_structure`). fhir.resources ships the R4B (4.3.0)
models as its closest match to R4; R4 resources validate against them.

Document:

- ``message_type`` is the ``resourceType`` (``Patient``). For a Bundle (type transaction, batch,
  collection or message; others are rejected) it is ``Bundle/<type>`` where ``<type>`` is the
  resourceType of the first entry's resource, skipping a MessageHeader (``Bundle/Patient``), or
  plain ``Bundle`` when there is no entry.
- ``message_id`` is the resource ``id``; for a Bundle, ``Bundle.id`` else the first entry's fullUrl.
- ``occurred_at`` is the resource's own timing (:data:`TIMINGS`: Observation/DiagnosticReport
  effective[x] then issued, Encounter.period.start, Appointment.created, ServiceRequest and
  MedicationRequest authoredOn, Procedure performed[x], Condition.recordedDate, Bundle.timestamp
  then its first entry's timing), else ``meta.lastUpdated``.

Path grammar (FHIRPath subset):

- ``Patient.name.family``: an *absolute* path starts with a resource type (a capitalised name). It
  reads the innermost enclosing resource of that type: the document itself, or inside ``each:`` the
  item's resource or the resource around it; in a Bundle, every entry resource of that type. A path
  whose type matches nothing reads nothing, so one route maps several types with ``when``.
- ``name.family``: a *relative* path (lower-case first step) reads from the current node: the
  resource, or inside ``each:`` the item (``each: Observation.component`` then ``code.coding.code``).
  ``$this`` is the current node itself.
- Arrays flatten implicitly: ``Patient.name.given`` is every given of every name.
- ``[n]`` (0-based) indexes the collection built so far; ``.first()``, ``.last()``.
- ``.where(a.b = 'x')``: keeps the items on which the dotted child path has a value equal to the
  literal (``'string'``, number, ``true``/``false``); ``.where(a.startsWith('x'))`` likewise.
- ``.where(a.b.exists())``; the tested path may use functions (``where(getReferenceKey(Patient).exists())``).
- ``.replace('from', 'to')``: on strings (``subject.reference.replace('Patient/', '')``).
- ``.resolve()``: the resource a Reference (or reference string) points to, when the message holds it:
  ``#p1`` in ``contained[]``, ``urn:uuid:...`` / an absolute URL by Bundle ``entry.fullUrl``, a relative
  ``Patient/77662`` (or absolute ``https://.../Patient/77662/_history/2``) by type and id among the entries.
- ``.getReferenceKey(Patient)``: the id a reference names (``Patient/77662`` and ``https://.../Patient/77662``
  give ``77662``; a ``urn:uuid:`` entry gives its resource's id), only for references to that type (any
  type without an argument). From SQL on FHIR v2.
- ``A | B``: the union (values of A then of B).

A path maps to **one value** (the first it selects) unless it ends with ``[*]``, this project's list
marker (as in ``OBX[*]-5`` and ``items[*]``): ``Observation.code.coding.code[*]`` yields a list.
Numbers are passed on as parsed (``valueQuantity.value`` 7.20 reads as 7.2).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

from middleware.errors import ParseError
from middleware.formats import Record, SplitInfo, register
from middleware.formats.fhir_types import RESOURCE_TYPES
from middleware.formats.ndjson import CHUNK_BYTES, looks_like_ndjson, split_lines

BUNDLE_TYPES = frozenset({"transaction", "batch", "collection", "message", "searchset"})  # split one per entry
# The bundle a split entry travels in (:func:`split`): the entry first, then the entries it references.
SPLIT_TAG = {"system": "urn:middleware:bundle", "code": "split-entry"}
BUNDLE_ID_HEADER = "x-mw-bundle-id"
BUNDLE_TYPE_HEADER = "x-mw-bundle-type"
BATCH_TOTAL_HEADER = "x-mw-batch-total"
FULL_URL_HEADER = "x-mw-fullurl"
SUBSCRIPTION_HEADER = "x-mw-subscription"
# R4B SubscriptionStatus.type (and the R4 backport's Parameters "type"): which carry focus resources.
NOTIFICATION_TYPES = frozenset({"event-notification", "query-event"})
STATUS_TYPES = frozenset({"handshake", "heartbeat", "query-status"}) | NOTIFICATION_TYPES
TIMINGS: dict[str, tuple[tuple[str, ...], ...]] = {
    "Observation": (("effectiveDateTime",), ("effectiveInstant",), ("effectivePeriod", "start"), ("issued",)),
    "DiagnosticReport": (("effectiveDateTime",), ("effectivePeriod", "start"), ("issued",)),
    "Encounter": (("period", "start"),),
    "Appointment": (("created",),),
    "ServiceRequest": (("authoredOn",),),
    "MedicationRequest": (("authoredOn",),),
    "Procedure": (("performedDateTime",), ("performedPeriod", "start")),
    "Condition": (("recordedDate",),),
    "Bundle": (("timestamp",),),
}
_NAME = re.compile(r"\$this|[A-Za-z_][A-Za-z0-9_]*")
_STRING = r"'(?:[^'\\]|\\.)*'"
_LITERAL = rf"{_STRING}|-?\d+(?:\.\d+)?|true|false"
_WHERE_EQ = re.compile(rf"\s*(.+?)\s*=\s*({_LITERAL})\s*", re.DOTALL)
_WHERE_STARTS = re.compile(rf"\s*(.+)\.startsWith\(\s*({_STRING})\s*\)\s*", re.DOTALL)
_WHERE_EXISTS = re.compile(r"\s*(.+)\.exists\(\s*\)\s*", re.DOTALL)
_REPLACE_ARGS = re.compile(rf"\s*({_STRING})\s*,\s*({_STRING})\s*")
_ESCAPE = re.compile(r"\\(.)")
_SAFE_LOC = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# A literal reference (FHIR R4 3.1.0.4.2): relative ``Patient/77662`` or absolute ``<base>/Patient/77662``,
# optionally ``/_history/<version>``.
_LITERAL_REFERENCE = re.compile(r"(?P<url>(?P<base>[A-Za-z][A-Za-z0-9+.-]*://\S*/)?(?P<type>[A-Z][A-Za-z]{1,63})/"
                                r"(?P<id>[A-Za-z0-9.-]{1,64}))(?:/_history/[A-Za-z0-9.-]{1,64})?")


def is_resource_type(name: str) -> bool:
    """Whether ``name`` is a FHIR resource type (per fhir.resources' R4B model registry, kept as data in
    :mod:`middleware.formats.fhir_types` so that only ``validation: strict`` imports the models)."""
    return name in RESOURCE_TYPES


# -- document ---------------------------------------------------------------------------------


def _get(node: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _timing(resource: Any) -> str | None:
    """The first timing with a time of day, else the first date (a date-only effectiveDateTime does not
    hide a full ``issued``)."""
    if not isinstance(resource, dict):
        return None
    fallback = None
    for keys in TIMINGS.get(str(resource.get("resourceType")), ()):
        value = _get(resource, keys)
        if isinstance(value, str) and value:
            if "T" in value:
                return value
            fallback = fallback or value
    return fallback


def _entry_resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return []
    return [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)]


def _first_entry_resource(bundle: dict[str, Any]) -> dict[str, Any] | None:
    for resource in _entry_resources(bundle):
        if resource.get("resourceType") != "MessageHeader":
            return resource
    return None


@dataclass(frozen=True, slots=True)
class FhirDocument:
    """A decoded resource (``scopes[0]``) and the node paths are read from.

    ``data`` is the current node: the resource itself, or an ``each:`` item; ``scopes`` are the
    enclosing resources, outermost first. ``bundle``: for an entry split out of a Bundle, the bundle
    it travelled in (the entry and the entries it references), against which references resolve.
    """

    data: Any
    scopes: tuple[dict[str, Any], ...]
    bundle: dict[str, Any] | None = None

    @property
    def root(self) -> dict[str, Any]:
        return self.scopes[0] if self.scopes else {}

    @property
    def references_bundle(self) -> dict[str, Any] | None:
        """The Bundle whose entries references resolve against: the document itself, or the split entry's."""
        return self.root if self.root.get("resourceType") == "Bundle" else self.bundle

    @property
    def message_type(self) -> str | None:
        kind = self.root.get("resourceType")
        if kind != "Bundle":
            return kind if isinstance(kind, str) else None
        first = _first_entry_resource(self.root)
        inner = first.get("resourceType") if first is not None else None
        return f"Bundle/{inner}" if isinstance(inner, str) else "Bundle"

    @property
    def unsplit_reason(self) -> str | None:
        """Why a whole Bundle that a route's filter does not take must not be dropped silently (its entries
        are what routes read: publishing splits bundles unless the route says ``source.split: false``).
        None otherwise."""
        if self.root.get("resourceType") != "Bundle":
            return None
        return (f"a FHIR Bundle of type {self.root.get('type')} with {len(_entry_resources(self.root))} entry "
                "resource(s) reached the route whole and its filter does not take it")

    @property
    def message_id(self) -> str | None:
        value = self.root.get("id")
        if isinstance(value, str) and value:
            return value
        bundle = self.bundle if self.bundle is not None else self.root
        if bundle.get("resourceType") == "Bundle":
            entries = bundle.get("entry")
            if isinstance(entries, list) and entries and isinstance(entries[0], dict):
                url = entries[0].get("fullUrl")
                if isinstance(url, str) and url:
                    return url
        return None

    def source_identity(self) -> tuple[str, ...]:
        """What makes this resource version unique (event ids are derived from it): resourceType, id and
        meta.versionId, or without a versionId a digest of the resource's content (keys sorted, so the
        same resource sent with other whitespace or key order keeps its identity). An entry split out of
        a Bundle uses its fullUrl when it has no id, and adds the bundle's id: the same entry ids in two
        bundles give other events (the publisher's batch id and position are added too, see route.py)."""
        root = self.root
        version = _get(root, ("meta", "versionId"))
        if not isinstance(version, str | int) or isinstance(version, bool) or version == "":
            content = orjson.dumps(root, option=orjson.OPT_SORT_KEYS)
            version = "sha256:" + hashlib.sha256(content).hexdigest()
        kind, rid = root.get("resourceType"), root.get("id")
        identity: tuple[str, ...] = (str(kind or ""), rid if isinstance(rid, str) else "", str(version))
        if self.bundle is not None:
            if not identity[1]:
                identity = (identity[0], str(self.message_id or ""), identity[2])
            bundle_id = self.bundle.get("id")
            identity += ("Bundle", bundle_id if isinstance(bundle_id, str) else "")
        return identity

    def occurred_at(self) -> str | None:
        root = self.root
        found = _timing(root)
        if found is None and root.get("resourceType") == "Bundle":
            found = _timing(_first_entry_resource(root))
        if found is None:
            updated = _get(root, ("meta", "lastUpdated"))
            found = updated if isinstance(updated, str) and updated else None
        return found


def _as_document(doc: Any) -> FhirDocument:
    if isinstance(doc, FhirDocument):
        return doc
    return FhirDocument(doc, (doc,) if isinstance(doc, dict) else ())


# -- paths ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Context:
    """What resolve() and getReferenceKey() need besides their input values: the document (its Bundle
    and scopes) and the nodes the path started from (contained references resolve against them). Other
    steps get None: a path without those functions builds no context."""

    doc: FhirDocument
    starts: list[Any]


Step = Callable[[list[Any], Any], list[Any]]  # (values, _Context or None) -> values
_CONTEXTUAL = frozenset({"resolve", "getReferenceKey"})


def _child(name: str) -> Step:
    def step(values: list[Any], ctx: Any) -> list[Any]:
        out: list[Any] = []
        for value in values:
            if type(value) is dict:
                found = value.get(name)
                if found is None:
                    continue
                if type(found) is list:
                    out.extend(item for item in found if item is not None)
                else:
                    out.append(found)
        return out

    return step


def _index(n: int) -> Step:
    return lambda values, ctx: values[n:n + 1] if n >= 0 else values[n:][:1]


def _literal(text: str) -> Any:
    if text.startswith("'"):
        return _ESCAPE.sub(lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), text[1:-1])
    if text in ("true", "false"):
        return text == "true"
    return float(text) if "." in text else int(text)


def _equal(value: Any, literal: Any) -> bool:
    if isinstance(literal, bool) or isinstance(value, bool):
        return value is literal
    if isinstance(literal, str):
        return isinstance(value, str) and value == literal
    return isinstance(value, int | float) and value == literal


def _where(expr: str, args: str) -> Step:
    test: Callable[[list[Any]], bool]
    match = _WHERE_STARTS.fullmatch(args)
    if match and not match.group(1).rstrip().endswith("="):
        prefix = _literal(match.group(2))
        test = lambda found: any(isinstance(x, str) and x.startswith(prefix) for x in found)  # noqa: E731
    elif (match := _WHERE_EXISTS.fullmatch(args)) is not None:
        test = bool
    elif (match := _WHERE_EQ.fullmatch(args)) is not None and match.group(1).count("'") % 2 == 0:
        literal = _literal(match.group(2))
        test = lambda found: any(_equal(x, literal) for x in found)  # noqa: E731
    else:
        raise ValueError(f"invalid FHIRPath {expr!r}: where() takes one test, e.g. where(type.coding.code = 'MR'), "
                         "where(reference.startsWith('Patient/')) or where(getReferenceKey(Patient).exists())")
    branch, star = _compile_branch(expr, match.group(1).strip(), item=True)
    if branch.resource_type is not None or star:
        raise ValueError(f"invalid FHIRPath {expr!r}: inside where() the tested path is relative to each item "
                         "(type.coding.code, not Patient.type...), without [*]")
    steps = branch.steps
    return lambda values, ctx: [v for v in values if test(_run(steps, [v], ctx))]


def _replace(expr: str, args: str) -> Step:
    match = _REPLACE_ARGS.fullmatch(args)
    if not match:
        raise ValueError(f"invalid FHIRPath {expr!r}: replace() takes two strings, e.g. replace('Patient/', '')")
    old, new = _literal(match.group(1)), _literal(match.group(2))
    return lambda values, ctx: [v.replace(old, new) if isinstance(v, str) else v for v in values]


# -- references -------------------------------------------------------------------------------


def parse_reference(text: str) -> tuple[str, str, str | None] | None:
    """A literal reference -> (resource type, id, base URL or None when relative), else None
    (``urn:uuid:...``, ``#p1``, a URL that does not end in Type/id)."""
    match = _LITERAL_REFERENCE.fullmatch(text)
    if match is None or not is_resource_type(match["type"]):
        return None
    return match["type"], match["id"], match["base"]


def _reference_text(value: Any) -> str | None:
    """The reference a Reference element (or a reference string) carries."""
    if type(value) is dict:
        value = value.get("reference")
    return value if isinstance(value, str) and value else None


def _contained(container: Any, local: str) -> dict[str, Any] | None:
    if type(container) is not dict or not isinstance(container.get("resourceType"), str):
        return None
    if not local:
        return container  # ``#`` alone: the container itself
    contained = container.get("contained")
    for resource in contained if isinstance(contained, list) else ():
        if type(resource) is dict and resource.get("id") == local:
            return resource
    return None


def resolve_reference(reference: str, doc: FhirDocument, containers: Sequence[Any] = ()) -> dict[str, Any] | None:
    """The resource ``reference`` points to, when ``doc`` holds it; None otherwise.

    ``#id`` is looked up in ``contained[]`` of ``containers`` (the resources a path started from), then of
    the enclosing resources, innermost first. Anything else in the entries of a Bundle document: by
    ``fullUrl`` (``urn:uuid:...``, absolute URLs; a version suffix ignored), and a relative reference also
    by resource type and id.
    """
    if reference.startswith("#"):
        for container in (*containers, *reversed(doc.scopes)):
            found = _contained(container, reference[1:])
            if found is not None:
                return found
        return None
    root = doc.references_bundle
    if root is None:
        return None
    literal = parse_reference(reference)
    url = reference
    if literal is not None and literal[2] is not None:
        url = f"{literal[2]}{literal[0]}/{literal[1]}"  # without /_history/n
    entries = root.get("entry")
    for entry in entries if isinstance(entries, list) else ():
        if type(entry) is not dict or type(entry.get("resource")) is not dict:
            continue
        resource = entry["resource"]
        full_url = entry.get("fullUrl")
        if full_url in (url, reference) or (literal is not None and literal[2] is None and (
                resource.get("resourceType"), resource.get("id")) == literal[:2]):
            return resource  # type: ignore[no-any-return]
    return None


def _resolve(values: list[Any], ctx: _Context) -> list[Any]:
    out: list[Any] = []
    for value in values:
        reference = _reference_text(value)
        found = resolve_reference(reference, ctx.doc, ctx.starts) if reference else None
        if found is not None:
            out.append(found)
    return out


def _reference_key(expr: str, args: str) -> Step:
    kind = args.strip().strip("'") or None
    if kind is not None and not is_resource_type(kind):
        raise ValueError(f"invalid FHIRPath {expr!r}: getReferenceKey() takes a resource type, e.g. "
                         "getReferenceKey(Patient)")

    def step(values: list[Any], ctx: _Context) -> list[Any]:
        out: list[Any] = []
        for value in values:
            reference = _reference_text(value)
            if reference is None or reference.startswith("#"):
                continue  # a contained resource's id is local to its container: not a key
            literal = parse_reference(reference)
            found_kind: Any
            key: Any
            if literal is not None:
                found_kind, key = literal[0], literal[1]
            else:
                resource = resolve_reference(reference, ctx.doc)  # urn:uuid:... of a Bundle entry
                if resource is None:
                    continue
                found_kind, key = resource.get("resourceType"), resource.get("id")
            if isinstance(key, str) and key and (kind is None or found_kind == kind):
                out.append(key)
        return out

    return step


# -- compiling --------------------------------------------------------------------------------


def _unquoted(expr: str, start: int = 0) -> Iterator[tuple[int, str, int]]:
    """(index, char, parenthesis depth after it) of every character outside quoted strings."""
    depth, i = 0, start
    while i < len(expr):
        char = expr[i]
        if char == "'":
            i += 1
            while i < len(expr) and expr[i] != "'":
                i += 2 if expr[i] == "\\" else 1
        else:
            depth += {"(": 1, ")": -1}.get(char, 0)
            yield i, char, depth
        i += 1


def _close_paren(expr: str, start: int) -> int:
    """Index of the ``)`` matching the ``(`` at ``start``, skipping quoted strings."""
    for i, char, depth in _unquoted(expr, start):
        if char == ")" and depth == 0:
            return i
    raise ValueError(f"invalid FHIRPath {expr!r}: unbalanced parentheses or quotes")


def _split_union(expr: str) -> list[str]:
    """``A | B`` -> [A, B], ignoring ``|`` inside parentheses and quotes."""
    cuts = [i for i, char, depth in _unquoted(expr) if char == "|" and depth == 0]
    bounds = zip([-1, *cuts], [*cuts, len(expr)], strict=True)
    return [expr[a + 1:b].strip() for a, b in bounds]


def _run(steps: tuple[Step, ...], values: list[Any], ctx: Any) -> list[Any]:
    for step in steps:
        if not values:
            return values
        values = step(values, ctx)
    return values


@dataclass(frozen=True)
class _Branch:
    resource_type: str | None  # None: relative to the current node
    steps: tuple[Step, ...]
    contextual: bool = False  # uses resolve() / getReferenceKey(): steps get a _Context

    def read(self, doc: FhirDocument) -> list[Any]:
        values = [doc.data] if self.resource_type is None else _resources(doc, self.resource_type)
        ctx = _Context(doc, values) if self.contextual else None
        for step in self.steps:
            if not values:
                return values
            values = step(values, ctx)
        return values


def _resources(doc: FhirDocument, kind: str) -> list[Any]:
    for scope in reversed(doc.scopes):
        if scope.get("resourceType") == kind:
            return [scope]
    if doc.scopes and doc.root.get("resourceType") == "Bundle":
        return [r for r in _entry_resources(doc.root) if r.get("resourceType") == kind]
    return []


def _compile_branch(expr: str, text: str, *, item: bool = False) -> tuple[_Branch, bool]:
    """One union member -> (branch, ends with [*]); ``item``: the path tested inside where(), which may
    start with a function applied to the item (``getReferenceKey(Patient).exists()``)."""
    if not text:
        raise ValueError(f"invalid FHIRPath {expr!r}: empty path")
    steps: list[Step] = []
    resource_type: str | None = None
    star, i, first = False, 0, True
    while True:
        match = _NAME.match(text, i)
        if not match:
            raise ValueError(f"invalid FHIRPath {expr!r}: expected a name at {text[i:i + 12]!r}")
        name, i = match.group(0), match.end()
        if i < len(text) and text[i] == "(":
            end = _close_paren(text, i)
            args, i = text[i + 1:end], end + 1
            if first and not item:
                raise ValueError(f"invalid FHIRPath {expr!r}: a path starts with a resource type or element name")
            steps.append(_function(expr, name, args))
        elif first and name == "$this":
            pass
        elif first and name[0].isupper():
            if not is_resource_type(name):
                raise ValueError(f"invalid FHIRPath {expr!r}: {name} is not a FHIR R4 resource type")
            resource_type = name
        elif name == "$this":
            raise ValueError(f"invalid FHIRPath {expr!r}: $this can only start a path")
        else:
            steps.append(_child(name))
        first = False
        while i < len(text) and text[i] == "[":
            end = text.find("]", i)
            content = text[i + 1:end] if end > 0 else ""
            if content == "*" and end == len(text) - 1:
                star = True
            elif content.isascii() and content.isdigit():
                steps.append(_index(int(content)))
            elif content == "*":
                raise ValueError(f"invalid FHIRPath {expr!r}: [*] may only end a path (it makes the path a list)")
            else:
                raise ValueError(f"invalid FHIRPath {expr!r}: an index is [n] (0-based) or a final [*]")
            i = end + 1
        if i == len(text):
            contextual = any(name in _CONTEXTUAL for name in re.findall(r"([A-Za-z]+)\(", text))
            return _Branch(resource_type, tuple(steps), contextual), star
        if text[i] != ".":
            raise ValueError(f"invalid FHIRPath {expr!r}: unexpected {text[i]!r} (supported: a.b, [n], first(), "
                             "last(), where(...), replace('a', 'b'), resolve(), getReferenceKey(Type), A | B)")
        i += 1


def _function(expr: str, name: str, args: str) -> Step:
    if name in ("first", "last", "resolve"):
        if args.strip():
            raise ValueError(f"invalid FHIRPath {expr!r}: {name}() takes no arguments")
        return _resolve if name == "resolve" else _index(0 if name == "first" else -1)
    if name == "where":
        return _where(expr, args)
    if name == "replace":
        return _replace(expr, args)
    if name == "getReferenceKey":
        return _reference_key(expr, args)
    raise ValueError(f"invalid FHIRPath {expr!r}: function {name}() is not supported "
                     "(supported: first(), last(), where(), replace(), resolve(), getReferenceKey())")


@dataclass(frozen=True)
class FhirPath:
    """A compiled FHIRPath subset expression; ``read`` returns every non-empty value it selects."""

    expr: str
    branches: tuple[_Branch, ...]
    multiple: bool

    def read(self, doc: Any) -> list[Any]:
        document = _as_document(doc)
        if len(self.branches) == 1:
            values = self.branches[0].read(document)
        else:
            values = [v for branch in self.branches for v in branch.read(document)]
        # a truthy value is kept at once; of the falsy ones only 0 / 0.0 / false are values
        return [v for v in values if v or (v is not None and v != "" and type(v) not in (list, dict))]


def compile_path(expr: str) -> FhirPath:
    """Compile ``expr``; raises ``ValueError`` naming what is unsupported."""
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError("invalid FHIRPath: empty expression")
    compiled = [_compile_branch(expr, part) for part in _split_union(expr.strip())]
    stars = {star for _, star in compiled}
    if len(stars) > 1:
        raise ValueError(f"invalid FHIRPath {expr!r}: end every member of a union with [*], or none")
    return FhirPath(expr, tuple(branch for branch, _ in compiled), stars == {True})


_compiled = functools.lru_cache(maxsize=256)(compile_path)


# -- parsing ----------------------------------------------------------------------------------


def parse(raw: bytes) -> FhirDocument:
    """Decode one FHIR JSON resource or Bundle; raises :class:`ParseError` (never quoting values)."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    if not raw.strip():
        raise ParseError("input is empty", hint="send a FHIR R4 JSON resource")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise ParseError(f"input is not UTF-8 (invalid byte at offset {bad.start})",
                             hint="FHIR JSON is UTF-8") from None
        raise ParseError(f"not valid JSON (line {exc.lineno}, column {exc.colno})",
                         hint="send a FHIR R4 JSON resource") from None
    if not isinstance(data, dict):
        got = {list: "an array", str: "a string", bool: "a boolean"}.get(type(data), "a number or null")
        raise ParseError(f"a FHIR resource is a JSON object, got {got}", hint="send one resource or a Bundle")
    kind = data.get("resourceType")
    if not isinstance(kind, str) or not kind:
        raise ParseError("no resourceType: not a FHIR resource", hint="every FHIR resource names its resourceType")
    if not is_resource_type(kind):
        raise ParseError("resourceType is not a FHIR R4 resource type",
                         hint="check the sender's resourceType spelling and FHIR version")
    if kind == "Bundle" and _is_split_entry(data):
        focus = data["entry"][0].get("resource") if isinstance(data["entry"][0], dict) else None
        focus_kind = focus.get("resourceType") if isinstance(focus, dict) else None
        if not isinstance(focus, dict) or not isinstance(focus_kind, str) or not is_resource_type(focus_kind):
            raise ParseError("a split Bundle entry without a FHIR resource",
                             hint="every entry resource names its resourceType")
        return FhirDocument(focus, (focus,), data)
    if kind == "Bundle" and data.get("type") not in BUNDLE_TYPES:
        raise ParseError("Bundle type is missing or not accepted",
                         hint=f"send a Bundle of type {', '.join(sorted(BUNDLE_TYPES))}")
    return FhirDocument(data, (data,))


# -- splitting --------------------------------------------------------------------------------


def _is_split_entry(bundle: dict[str, Any]) -> bool:
    """Whether ``bundle`` is one entry split out of a Bundle (tagged :data:`SPLIT_TAG`, entry first)."""
    tags = _get(bundle, ("meta", "tag"))
    entries = bundle.get("entry")
    return (isinstance(tags, list) and SPLIT_TAG in tags and isinstance(entries, list) and bool(entries))


def _references(node: Any, out: list[str]) -> list[str]:
    """Every ``reference`` string in ``node`` (an entry resource), depth first."""
    if type(node) is dict:
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                out.append(value)
            elif type(value) in (dict, list):
                _references(value, out)
    elif type(node) is list:
        for item in node:
            _references(item, out)
    return out


class _EntryIndex:
    """Which entry a reference names, by fullUrl (``urn:uuid:``, absolute) or by type and id."""

    def __init__(self, entries: list[Any]) -> None:
        self.by_url: dict[str, int] = {}
        self.by_key: dict[tuple[str, str], int] = {}
        for index, entry in enumerate(entries):
            resource = entry.get("resource") if type(entry) is dict else None
            url = entry.get("fullUrl") if type(entry) is dict else None
            if isinstance(url, str) and url:
                self.by_url.setdefault(url, index)
            if type(resource) is dict and isinstance(resource.get("id"), str):
                self.by_key.setdefault((str(resource.get("resourceType")), resource["id"]), index)

    def find(self, reference: str) -> int | None:
        if reference.startswith("#"):
            return None  # contained: inside the resource itself
        found = self.by_url.get(reference)
        if found is not None:
            return found
        literal = parse_reference(reference)
        if literal is None:
            return None
        if literal[2] is not None:
            found = self.by_url.get(f"{literal[2]}{literal[0]}/{literal[1]}")
            if found is not None:
                return found
        return self.by_key.get(literal[:2])


def _referenced(start: int, entries: list[Any], index: _EntryIndex, direct: dict[int, list[int]]) -> list[int]:
    """The entries entry ``start`` references, directly or through other entries (each once, in order)."""
    seen, order, queue = {start}, [], [start]
    while queue:
        current = queue.pop(0)
        if current not in direct:
            resource = entries[current].get("resource")
            found = (index.find(ref) for ref in _references(resource, []))
            direct[current] = list(dict.fromkeys(i for i in found if i is not None))
        for target in direct[current]:
            if target not in seen:
                seen.add(target)
                order.append(target)
                queue.append(target)
    return order


def _subscription_status(bundle: dict[str, Any]) -> tuple[str, str | None] | None:
    """A subscription notification (R4B backport, a ``history`` Bundle whose first entry is the
    status): (status type, subscription reference); None for any other Bundle."""
    entries = bundle.get("entry")
    if bundle.get("type") != "history" or not isinstance(entries, list) or not entries:
        return None
    status = entries[0].get("resource") if type(entries[0]) is dict else None
    if type(status) is not dict:
        return None
    kind: Any = None
    subscription: Any = None
    if status.get("resourceType") == "SubscriptionStatus":  # R4B
        kind, subscription = status.get("type"), _reference_text(status.get("subscription"))
    elif status.get("resourceType") == "Parameters":  # R4 backport: backport-subscription-status-r4
        parameters = status.get("parameter")
        for parameter in parameters if isinstance(parameters, list) else ():
            if type(parameter) is dict and parameter.get("name") == "type":
                kind = parameter.get("valueCode")
            elif type(parameter) is dict and parameter.get("name") == "subscription":
                subscription = _reference_text(parameter.get("valueReference"))
        if subscription is None:
            return None
    return (kind, subscription) if kind in STATUS_TYPES else None


def split_bundle(bundle: dict[str, Any], raw: bytes, info: SplitInfo) -> Iterator[Record]:
    """One record per entry of ``bundle`` (entries of a subscription notification after the status):
    a Bundle holding the entry first and then every entry it references, directly or not, tagged
    :data:`SPLIT_TAG` (the route reads the entry; references to the others resolve). Headers give
    the bundle's id and type, the position (publisher) and total, the entry's fullUrl. An entry
    without a resource (a transaction DELETE, an id-only notification) is a record with an error."""
    entries: list[Any] = bundle["entry"] if isinstance(bundle.get("entry"), list) else []
    first = 0
    headers: dict[str, str | int] = {BUNDLE_TYPE_HEADER: str(bundle.get("type"))}
    bundle_id = bundle.get("id")
    if isinstance(bundle_id, str) and bundle_id:
        headers[BUNDLE_ID_HEADER] = bundle_id
    status = _subscription_status(bundle)
    if status is not None:
        info.feed, first = status[0], 1
        if status[1]:
            headers[SUBSCRIPTION_HEADER] = status[1]
        if status[0] not in NOTIFICATION_TYPES:
            return
    info.batch_id = (f"Bundle/{bundle_id}" if isinstance(bundle_id, str) and bundle_id
                     else "sha256:" + hashlib.sha256(raw).hexdigest())
    total = len(entries) - first
    headers[BATCH_TOTAL_HEADER] = total
    info.declared = total
    shell: dict[str, Any] = {"resourceType": "Bundle"}
    shell.update((key, bundle[key]) for key in ("id", "type", "timestamp") if key in bundle)
    shell["meta"] = {"tag": [SPLIT_TAG]}
    index, direct = _EntryIndex(entries), dict[int, list[int]]()
    for position, number in enumerate(range(first, len(entries)), start=1):
        info.records = position
        entry = entries[number]
        own = dict(headers)
        url = entry.get("fullUrl") if type(entry) is dict else None
        if isinstance(url, str) and url:
            own[FULL_URL_HEADER] = url
        if type(entry) is not dict or type(entry.get("resource")) is not dict:
            request = _get(entry, ("request", "method"))
            what = f" (request {request})" if isinstance(request, str) else ""
            yield Record(orjson.dumps(entry), position, f"Bundle entry {position} of {total} has no resource{what}: "
                                                        "nothing to publish", own)
            continue
        carried = [entry, *(entries[i] for i in _referenced(number, entries, index, direct))]
        yield Record(orjson.dumps({**shell, "entry": carried}), position, None, own)


def split(stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
    """The records of a FHIR input: an NDJSON file (Bulk Data) one per line, a Bundle of a type in
    :data:`BUNDLE_TYPES` or a subscription notification one per entry, anything else
    (a resource, a Bundle kept whole, input that is not even JSON) one record, byte for byte."""
    head = stream.read(CHUNK_BYTES)
    if looks_like_ndjson(head):
        yield from split_lines(stream, info, first=head)
        return
    raw = head + stream.read()
    data = _loads_bundle(raw)
    if data is not None and (data.get("type") in BUNDLE_TYPES or _subscription_status(data) is not None):
        yield from split_bundle(data, raw, info)
        return
    info.records = 1
    yield Record(raw)


def _loads_bundle(raw: bytes) -> dict[str, Any] | None:
    """``raw`` decoded when it is a Bundle (a cheap look at the start first); None otherwise."""
    if b'"Bundle"' not in raw:
        return None
    body = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.get("resourceType") == "Bundle" else None


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = str(part) if _SAFE_LOC.fullmatch(str(part)) else "?"
            out += f".{name}" if out else name
    return out or "(resource)"


def check_structure(doc: Any) -> None:
    """``validation: strict``: validate the resource with fhir.resources (R4B models).

    Errors name element paths (``name[0].family``) and pydantic error kinds, never values.
    """
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    resource = _as_document(doc).root
    kind = str(resource.get("resourceType"))
    model = get_fhir_model_class(kind)
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        problems = list(dict.fromkeys(f"{_loc(tuple(e['loc']))} ({e['type']})" for e in exc.errors()))
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ParseError(f"does not conform to FHIR R4 {kind}: {', '.join(problems[:5])}{more}",
                         hint="fix the sender, or set validation: lenient on the route") from None
    except (ValueError, TypeError) as exc:
        raise ParseError(f"does not conform to FHIR R4 {kind}: {type(exc).__name__}",
                         hint="fix the sender, or set validation: lenient on the route") from None


@register("fhir")
class FhirFormat:
    """``format: fhir``: one FHIR R4 JSON resource (or Bundle) per message."""

    name = "fhir"

    def parse(self, raw: bytes) -> FhirDocument:
        return parse(raw)

    def split(self, stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
        """Bundles one message per entry, NDJSON one per line (:func:`split`)."""
        return split(stream, info)

    def compile_path(self, expr: str) -> FhirPath:
        return compile_path(expr)

    def check_structure(self, doc: Any) -> None:
        check_structure(doc)

    def each_scope(self, expr: str) -> None:
        compile_path(expr)

    def each(self, doc: Any, expr: str) -> list[Any]:
        """``each: Observation.component``: one document per selected element; relative paths read
        the element (``code.coding.first().code``), absolute ones the enclosing resources."""
        document = _as_document(doc)
        items = []
        for value in _compiled(expr).read(document):
            scopes = document.scopes
            if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
                scopes = (*scopes, value)
            items.append(FhirDocument(value, scopes, document.bundle))
        return items
