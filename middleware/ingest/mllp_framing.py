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

    Each byte is searched once (the end-block search resumes where it stopped), so decoding is
    linear in the input whatever the chunk sizes.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._buf = bytearray()
        self._in_frame = False
        self._searched = 0  # bytes of the current frame already searched for an end block
        self.skipped = 0  # junk bytes before start blocks (CR/LF between frames not counted)
        self.dropped_partial = 0  # frames abandoned because a new start block came before the end block

    @property
    def buffered(self) -> int:
        """Bytes held, waiting for the rest of their frame."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """True between a start block and its end block."""
        return self._in_frame

    def feed(self, data: bytes) -> None:
        """Add bytes received from the connection."""
        self._buf += data

    def clear(self) -> None:
        """Forget every byte held (the connection is being dropped)."""
        self._buf = bytearray()
        self._in_frame = False
        self._searched = 0

    def next(self) -> Frame | None:
        """The next whole frame, or None until more bytes are fed; raises :class:`FrameTooLarge`."""
        buf = self._buf
        while not self._in_frame:
            start = buf.find(START_BLOCK)
            end = buf.find(END_BLOCK, 0, start if start != -1 else len(buf))
            if end != -1:
                body = bytes(buf[:end]).strip(b"\r\n")
                del buf[:end + 1]
                if body:
                    return Frame(body, has_start=False)
                continue
            if start != -1:
                self._skip(start)
                del buf[:1]
                self._in_frame = True
                self._searched = 0
                break
            if len(buf) > self._max:
                raise FrameTooLarge(bytes(buf[:_HEAD_BYTES]), len(buf))
            if buf and buf[0] in b"\r\n" and not buf.strip(b"\r\n"):
                del buf[:]  # the CR after an end block, arrived on its own
            return None
        while True:
            end = buf.find(END_BLOCK, self._searched)
            restart = buf.find(START_BLOCK, self._searched, end if end != -1 else len(buf))
            if restart != -1:  # a new frame began before this one ended: drop the cut-off one
                self.dropped_partial += 1
                del buf[:restart + 1]
                self._searched = 0
                continue
            if end != -1:
                if end > self._max:
                    raise FrameTooLarge(bytes(buf[:_HEAD_BYTES]), end)
                body = bytes(buf[:end])
                del buf[:end + 1]
                if buf[:1] == CARRIAGE_RETURN:
                    del buf[:1]
                self._in_frame = False
                return Frame(body)
            self._searched = len(buf)
            if self._searched > self._max:
                raise FrameTooLarge(bytes(buf[:_HEAD_BYTES]), self._searched)
            return None

    def close(self) -> None:
        """The connection ended: junk left is counted; raises :class:`FramingError` inside a frame."""
        if self._in_frame:
            size = len(self._buf)
            self.clear()
            raise FramingError(f"connection closed inside a frame ({size} bytes, no end block)")
        self._skip(len(self._buf))

    def _skip(self, count: int) -> None:
        self.skipped += len(bytes(self._buf[:count]).strip(b"\r\n"))
        del self._buf[:count]
