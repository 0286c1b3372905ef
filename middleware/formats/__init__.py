"""Input formats: bytes -> a document whose values are read through compiled path expressions.

Each format is one module that registers itself under the name used in route YAML
(``source.format``). The pure core only talks to the :class:`Format` protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from middleware import spec as registry


class Document(Protocol):
    """A parsed input message."""

    @property
    def message_type(self) -> str | None:
        """Type used by ``when: {message_type: ...}``, e.g. ``ADT^A01`` or ``Patient``."""

    @property
    def message_id(self) -> str | None:
        """The source system's id for this message (MSH-10, resource id), if any."""

    def occurred_at(self) -> str | None:
        """When the business event occurred, ISO 8601 (offset kept when the source has one)."""

    def source_identity(self) -> tuple[str, ...]:
        """The parts that tell this message apart from every other one, from any sender (HL7 v2: MSH-3,
        MSH-4, MSH-10, MSH-7; FHIR: resourceType, id, versionId or a content digest). Event ids are
        derived from it (:func:`middleware.envelope.event_id`); a document without this method is
        identified by a digest of its raw bytes."""


class PathAccessor(Protocol):
    """A compiled source expression; compile once, read many documents."""

    @property
    def expr(self) -> str:
        """The expression as written in YAML."""

    @property
    def multiple(self) -> bool:
        """True when the expression selects every repetition/segment (``[*]``): it maps to a list."""

    def read(self, doc: Any) -> list[Any]:
        """Every value the expression selects in ``doc``, absent/empty values left out."""


@dataclass(frozen=True)
class Record:
    """One record of an input (a message of a batch file, ...): published as one message.

    ``position`` counts records from 1 (None: the input is one message, published byte for byte);
    ``error`` says why the record cannot even be framed: it is dead-lettered, not published;
    ``headers`` are the format's own, added to the message (``x-mw-`` names).
    """

    raw: bytes
    position: int | None = None
    error: str | None = None
    headers: Mapping[str, str | int] = field(default_factory=dict)


@dataclass
class SplitInfo:
    """What splitting learned about the whole input, filled in while its records are read."""

    batch_id: str | None = None  # the sender's batch id (HL7 BHS-11 / FHS-11)
    declared: int | None = None  # the record count the sender declared (HL7 BTS-1), when it did
    records: int = 0  # records read so far
    problems: list[str] = field(default_factory=list)  # e.g. a declared count that does not match
    # a feed's sign of life the input was (FHIR subscription "handshake", "heartbeat", "event-notification"):
    # the feed is alive; a handshake or heartbeat has no record to publish
    feed: str | None = None


def split_whole(stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
    """The input is one message: a single record, byte for byte (formats without batches)."""
    info.records = 1
    yield Record(stream.read())


class Unsplit:
    """A format whose inputs are published whole (``source.split: false``): a FHIR Bundle stays one
    message; everything else is the wrapped format's."""

    def __init__(self, inner: Format) -> None:
        self.inner = inner
        self.name = inner.name

    def split(self, stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
        return split_whole(stream, info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Format(Protocol):
    """What every input format provides."""

    name: str

    def parse(self, raw: bytes) -> Any:
        """Parse ``raw`` into a :class:`Document`; raises :class:`middleware.errors.ParseError`."""

    def split(self, stream: BinaryIO, info: SplitInfo) -> Iterator[Record]:
        """The records of an input, read from ``stream`` as they are needed (linear, any size).

        A batch file yields one record per message; a single message yields itself unchanged
        (:func:`split_whole`). ``info`` is filled in while iterating.
        """

    def compile_path(self, expr: str) -> PathAccessor:
        """Compile a source expression; raises ``ValueError`` saying what is wrong with it."""

    def each_scope(self, expr: str) -> None:
        """Check an ``each:`` expression; raises ``ValueError`` saying what is wrong with it."""

    def each(self, doc: Any, expr: str) -> list[Any]:
        """One document per item ``expr`` selects; paths read on it are relative to that item."""


FormatFactory = Callable[[], Format]


def register(name: str, spec: Mapping[str, Any] | None = None) -> Callable[[FormatFactory], FormatFactory]:
    """Class/factory decorator: make a format available under ``name`` in route YAML.

    ``spec``: the JSON Schema of the keys it adds to a route's ``source:`` block (none by default);
    the module is found through a ``middleware.formats`` entry point (:mod:`middleware.spec`).
    """

    def add(factory: FormatFactory) -> FormatFactory:
        registry.register("format", name, spec, factory)
        return factory

    return add


def get_format(name: str, source: Mapping[str, Any] | None = None) -> Format:
    """The format registered as ``name``; raises ``KeyError`` for an unknown one.

    ``source``: a route's ``source:`` block; a format with options of its own (``csv``: delimiter,
    encoding...) reads them through its ``configure(source)`` method.
    """
    made: Format = registry.component("format", name).factory()
    configure = getattr(made, "configure", None)
    if source is not None and configure is not None:
        made = configure(source)
    return made


def format_names() -> list[str]:
    """Names usable as ``source.format``."""
    return list(registry.components("format"))
