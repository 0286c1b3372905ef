"""MLLP release 1 framing from bytes alone: ``0x0B <message> 0x1C 0x0D``. Knows nothing of sockets or HL7.

:class:`FrameDecoder` is fed the bytes a connection received and hands back whole frames. It is
forgiving where senders are sloppy and strict where memory is at stake:

- bytes before a start block are skipped and counted (CR/LF between frames are not counted);
- bytes ended by an end block with no start block before them come back as a frame with
  ``has_start=False`` (the gateway answers AE);
- a start block inside a frame drops the cut-off frame (counted) and starts a new one;
- more than ``max_bytes`` without an end block raises :class:`FrameTooLarge`, with the first
  4 KiB so the caller can still read MSH for its answer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\r"
_HEAD_BYTES = 4096


class FramingError(Exception):
    """Bytes that break MLLP framing (oversize, cut off by the end of the connection)."""


class FrameTooLarge(FramingError):
    """A frame (or junk before one) longer than the decoder's ``max_bytes``."""

    def __init__(self, head: bytes, size: int) -> None:
        super().__init__(f"message exceeds the maximum size ({size} bytes read)")
        self.head = head
        self.size = size


@dataclass(frozen=True)
class Frame:
    """One message taken out of its MLLP frame."""

    body: bytes
    has_start: bool = True  # False: bytes ended by an end block with no start block before them


def frame(message: bytes) -> bytes:
    """Wrap ``message`` in MLLP start and end blocks."""
    return START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN


class FrameDecoder:
    """Incremental MLLP decoder: :meth:`feed` bytes, take frames with :meth:`next` until it returns None.

    Each byte is searched once, so decoding is linear in the input whatever the chunk sizes. Inside
    a frame the received chunks are kept as they came and joined once, at the end block: a growing
    buffer would be copied and reallocated as it grows, which with many half-open frames costs
    half as much memory again as the frames themselves.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._head = bytearray()  # bytes outside a frame: junk, line breaks, or a start block to come
        self._pending: deque[bytes] = deque()  # fed, not yet looked at (the first one from _pos on)
        self._pending_size = 0  # bytes in _pending from _pos on
        self._pos = 0
        self._parts: list[bytes] = []  # the current frame's bytes so far (after its start block)
        self._frame_size = 0
        self._in_frame = False
        self.skipped = 0  # junk bytes before start blocks (CR/LF between frames not counted)
        self.dropped_partial = 0  # frames abandoned because a new start block came before the end block

    @property
    def buffered(self) -> int:
        """Bytes held, waiting for the rest of their frame."""
        return len(self._head) + self._pending_size + self._frame_size

    @property
    def in_frame(self) -> bool:
        """True between a start block and its end block."""
        return self._in_frame

    def feed(self, data: bytes) -> None:
        """Add bytes received from the connection."""
        if data:
            self._pending.append(bytes(data))
            self._pending_size += len(data)

    def clear(self) -> None:
        """Forget every byte held (the connection is being dropped)."""
        self._head = bytearray()
        self._pending.clear()
        self._pending_size = self._pos = 0
        self._parts = []
        self._frame_size = 0
        self._in_frame = False

    def next(self) -> Frame | None:
        """The next whole frame, or None until more bytes are fed; raises :class:`FrameTooLarge`."""
        while True:
            if not self._in_frame:
                item = self._outside_frame()
                if item is not None or not self._in_frame:
                    return item
            if not self._pending:
                return None
            chunk, pos = self._pending[0], self._pos
            end = chunk.find(END_BLOCK, pos)
            restart = chunk.find(START_BLOCK, pos, end if end != -1 else len(chunk))
            if restart != -1:  # a new frame began before this one ended: drop the cut-off one
                self.dropped_partial += 1
                self._parts, self._frame_size = [], 0
                self._advance(restart + 1)
                continue
            if end == -1:
                self._parts.append(chunk[pos:] if pos else chunk)
                self._frame_size += len(chunk) - pos
                self._advance(len(chunk))
                if self._frame_size > self._max:
                    raise FrameTooLarge(self._frame_head(), self._frame_size)
                continue
            self._parts.append(chunk[pos:end])
            self._frame_size += end - pos
            if self._frame_size > self._max:
                raise FrameTooLarge(self._frame_head(), self._frame_size)
            self._advance(end + 2 if chunk[end + 1:end + 2] == CARRIAGE_RETURN else end + 1)
            body = b"".join(self._parts)
            self._parts, self._frame_size, self._in_frame = [], 0, False
            return Frame(body)

    def close(self) -> None:
        """The connection ended: junk left is counted; raises :class:`FramingError` inside a frame."""
        if self._in_frame:
            size = self.buffered
            self.clear()
            raise FramingError(f"connection closed inside a frame ({size} bytes, no end block)")
        self._outside_frame()
        self._skip(len(self._head))

    def _outside_frame(self) -> Frame | None:
        """Look for a start block (or a stray end block) in the bytes outside a frame."""
        while self._pending and not self._head:  # the usual case: search the received chunk in place
            chunk, pos = self._pending[0], self._pos
            start = chunk.find(START_BLOCK, pos)
            end = chunk.find(END_BLOCK, pos, start if start != -1 else len(chunk))
            if end != -1:
                body = chunk[pos:end].strip(b"\r\n")
                self._advance(end + 1)
                if body:
                    return Frame(body, has_start=False)
                continue
            if start != -1:
                self.skipped += len(chunk[pos:start].strip(b"\r\n"))
                self._advance(start + 1)
                self._in_frame = True
                return None
            self._head += chunk[pos:] if pos else chunk  # no block yet: keep it until one comes
            self._advance(len(chunk))
        return self._scan_head()

    def _scan_head(self) -> Frame | None:
        """The same search over bytes that arrived before any block did (junk, line breaks)."""
        head = self._head
        while self._pending:
            chunk = self._pending[0]
            head += chunk[self._pos:] if self._pos else chunk
            self._advance(len(chunk))
        while True:
            start = head.find(START_BLOCK)
            end = head.find(END_BLOCK, 0, start if start != -1 else len(head))
            if end != -1:
                body = bytes(head[:end]).strip(b"\r\n")
                del head[:end + 1]
                if body:
                    return Frame(body, has_start=False)
                continue
            if start != -1:
                self._skip(start)
                if len(head) > 1:
                    self._pending.appendleft(bytes(head[1:]))
                    self._pending_size += len(head) - 1
                self._head = bytearray()
                self._in_frame = True
                return None
            if len(head) > self._max:
                raise FrameTooLarge(bytes(head[:_HEAD_BYTES]), len(head))
            if head and head[0] in b"\r\n" and not head.strip(b"\r\n"):
                del head[:]  # the CR after an end block, arrived on its own
            return None

    def _advance(self, to: int) -> None:
        """Consume the first pending chunk up to offset ``to`` (all of it: drop it)."""
        chunk = self._pending[0]
        self._pending_size -= to - self._pos
        if to >= len(chunk):
            self._pending.popleft()
            self._pos = 0
        else:
            self._pos = to

    def _frame_head(self) -> bytes:
        head, size = [], 0
        for part in self._parts:
            head.append(part)
            size += len(part)
            if size >= _HEAD_BYTES:
                break
        return b"".join(head)[:_HEAD_BYTES]

    def _skip(self, count: int) -> None:
        self.skipped += len(bytes(self._head[:count]).strip(b"\r\n"))
        del self._head[:count]
