"""Newline-delimited JSON (``format: ndjson``; FHIR Bulk Data files): one JSON value per line.

:func:`split_lines` is the one NDJSON splitter: the ``ndjson`` format, the ``fhir`` format (which
recognises an NDJSON input by its content, so a Bulk Data export publishes resource by resource to
a FHIR route) and the HTTP gateway's ``application/x-ndjson`` bodies all use it. It reads the input
in chunks (any size, linear), skips blank lines, and gives a line that is not JSON as a record of
its own with an error (dead-lettered alone, with its position); the others are published one each.

A record of an ``ndjson`` route is read like a ``json`` document (same paths: ``patient.mrn``,
``items[*].code``).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from typing import Any, BinaryIO

import orjson

from middleware.formats import Record, SplitInfo, register
from middleware.formats.json_format import JsonDocument, JsonFormat, JsonPath

CHUNK_BYTES = 1 << 16


def _lines(stream: BinaryIO, first: bytes) -> Iterator[bytes]:
    """The lines of ``first`` + the rest of ``stream`` (without their line ends), read in chunks."""
    pending = first
    while True:
        chunk = stream.read(CHUNK_BYTES)
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            yield pending[start:end]
            start = end + 1
        pending = pending[start:]
        if not chunk:
            break
    if pending:
        yield pending


def split_lines(stream: BinaryIO, info: SplitInfo, *, first: bytes = b"") -> Iterator[Record]:
    """One record per non-blank line of ``first`` + ``stream``, positions from 1.

    A line that is not valid JSON is a record with ``error`` (its position and line number in the
    reason, never its content); a UTF-8 BOM at the start and ``\\r`` line ends are dropped.
    """
    number = 0
    for line in _lines(stream, first):
        number += 1
        if number == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        info.records += 1
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            yield Record(line, info.records, f"NDJSON record {info.records} (line {number}) is not valid JSON")
            continue
        yield Record(line, info.records)


def looks_like_ndjson(head: bytes) -> bool:
    """Whether ``head`` (the start of an input) is NDJSON rather than one JSON document: its first
    non-blank line is a complete JSON object and something follows it. A pretty-printed resource's
    first line (``{``) is not a complete object; a single minified resource has nothing after it."""
    text = head[len(codecs.BOM_UTF8):] if head.startswith(codecs.BOM_UTF8) else head
    text = text.lstrip()
    end = text.find(b"\n")
    if not text.startswith(b"{") or end < 0 or not text[end + 1:].strip():
        return False
    try:
        return isinstance(orjson.loads(text[:end]), dict)
    except orjson.JSONDecodeError:
        return False


@register("ndjson")
class NdjsonFormat:
    """``format: ndjson``: a file of JSON values, one per line, each published as one message and read
    like a ``json`` document."""

    name = "ndjson"

    def __init__(self) -> None:
        self._json = JsonFormat()

    def parse(self, raw: bytes) -> JsonDocument:
        return self._json.parse(raw)

    def split(self, stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
        return split_lines(stream, info)

    def compile_path(self, expr: str) -> JsonPath:
        return self._json.compile_path(expr)

    def each_scope(self, expr: str) -> None:
        self._json.each_scope(expr)

    def each(self, doc: Any, expr: str) -> list[Any]:
        return self._json.each(doc, expr)
