"""JSON documents (REST payloads): dotted paths with ``[n]`` and ``[*]`` indexes.

Path grammar: ``referral.patient.mrn``, ``items[0].code``, ``items[*].code``. ``message_type`` is
the top-level ``resourceType`` or ``type`` string when present; ``message_id`` the top-level
``id``. Indexes are 0-based, as in JSON.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

from middleware.errors import ParseError
from middleware.formats import Record, SplitInfo, register, split_whole

_STEP = re.compile(r"([A-Za-z_$][\w$-]*)((?:\[(?:\d+|\*)\])*)")
_INDEX = re.compile(r"\[(\d+|\*)\]")


@dataclass
class JsonDocument:
    """A decoded JSON value with the Document attributes the pipeline reads."""

    data: Any

    @property
    def message_type(self) -> str | None:
        if isinstance(self.data, dict):
            for key in ("resourceType", "type"):
                value = self.data.get(key)
                if isinstance(value, str):
                    return value
        return None

    @property
    def message_id(self) -> str | None:
        value = self.data.get("id") if isinstance(self.data, dict) else None
        return str(value) if isinstance(value, str | int) else None

    def source_identity(self) -> tuple[str, ...]:
        """What makes this document unique (event ids are derived from it): its type, its ``id`` and a
        digest of its content (keys sorted), since a JSON payload has no version of its own."""
        content = orjson.dumps(self.data, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        return self.message_type or "", self.message_id or "", "sha256:" + hashlib.sha256(content).hexdigest()

    def occurred_at(self) -> str | None:
        return None


@dataclass(frozen=True)
class JsonPath:
    """A compiled dotted path; ``read`` returns every non-null value it reaches."""

    expr: str
    steps: tuple[tuple[str, tuple[int | None, ...]], ...]
    multiple: bool

    def read(self, doc: Any) -> list[Any]:
        values = [doc.data if isinstance(doc, JsonDocument) else doc]
        for key, indexes in self.steps:
            values = [v[key] for v in values if isinstance(v, dict) and key in v]
            for index in indexes:
                if index is None:
                    values = [item for v in values if isinstance(v, list) for item in v]
                else:
                    values = [v[index] for v in values if isinstance(v, list) and len(v) > index]
        return [v for v in values if v is not None and v != ""]


@register("json")
class JsonFormat:
    """``format: json``: one JSON document per message."""

    name = "json"

    def parse(self, raw: bytes) -> JsonDocument:
        if not raw.strip():
            raise ParseError("input is empty", hint="send a JSON document")
        try:
            return JsonDocument(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            raise ParseError(f"not valid JSON: {exc}", hint="send a UTF-8 JSON document") from None

    def split(self, stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
        return split_whole(stream, info)

    def compile_path(self, expr: str) -> JsonPath:
        steps: list[tuple[str, tuple[int | None, ...]]] = []
        for part in expr.split("."):
            match = _STEP.fullmatch(part)
            if not match:
                raise ValueError(f"invalid JSON path {expr!r}: bad step {part!r} (use a.b[0].c or a[*].b)")
            indexes = tuple(None if i == "*" else int(i) for i in _INDEX.findall(match.group(2)))
            steps.append((match.group(1), indexes))
        return JsonPath(expr, tuple(steps), any(i is None for _, ix in steps for i in ix))

    def each_scope(self, expr: str) -> None:
        self.compile_path(expr)

    def each(self, doc: Any, expr: str) -> list[Any]:
        """``each: items[*]`` (or ``items``: a list is iterated): one document per item."""
        found = self.compile_path(expr).read(doc)
        items = found[0] if len(found) == 1 and isinstance(found[0], list) else found
        return [JsonDocument(item) for item in items]
