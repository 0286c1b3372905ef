"""MLLP framing from bytes alone (middleware.ingest.mllp_framing): no sockets, no HL7."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from middleware.ingest.mllp_framing import Frame, FrameDecoder, FrameTooLarge, FramingError, frame


def decode(data: bytes, *, max_bytes: int = 1000, chunk: int | None = None) -> tuple[list[Frame], FrameDecoder]:
    decoder = FrameDecoder(max_bytes)
    frames = []
    step = chunk or max(len(data), 1)
    for offset in range(0, len(data), step):
        decoder.feed(data[offset:offset + step])
        while (item := decoder.next()) is not None:
            frames.append(item)
    return frames, decoder


def test_frames_in_one_chunk_come_out_in_order_with_their_trailing_cr_removed() -> None:
    frames, decoder = decode(frame(b"MSH|one") + frame(b"MSH|two"))
    assert frames == [Frame(b"MSH|one"), Frame(b"MSH|two")]
    assert decoder.buffered == 0 and not decoder.in_frame


def test_a_frame_fed_byte_by_byte_waits_for_its_end_block() -> None:
    decoder = FrameDecoder(1000)
    for byte in frame(b"MSH|x")[:-2]:
        decoder.feed(bytes([byte]))
        assert decoder.next() is None
    assert decoder.in_frame and decoder.buffered == 5
    decoder.feed(b"\x1c\r")
    assert decoder.next() == Frame(b"MSH|x")
    assert decoder.buffered == 0


def test_junk_before_a_start_block_is_skipped_and_counted_but_line_breaks_are_not() -> None:
    frames, decoder = decode(b"junk\r\n" + frame(b"MSH|a") + b"\r\n\r\n" + frame(b"MSH|b"))
    assert frames == [Frame(b"MSH|a"), Frame(b"MSH|b")]
    assert decoder.skipped == 4


def test_bytes_ended_without_a_start_block_are_a_frame_without_start() -> None:
    frames, _ = decode(b"MSH|nostart\x1c\r" + frame(b"MSH|ok"))
    assert frames == [Frame(b"MSH|nostart", has_start=False), Frame(b"MSH|ok")]


def test_a_start_block_inside_a_frame_drops_the_cut_off_frame() -> None:
    frames, decoder = decode(b"\x0bMSH|cut" + frame(b"MSH|whole"), chunk=3)
    assert frames == [Frame(b"MSH|whole")]
    assert decoder.dropped_partial == 1


@pytest.mark.parametrize("data", [
    frame(b"MSH|" + b"x" * 2000),          # whole frame, too big
    b"\x0bMSH|" + b"y" * 2000,             # no end block ever comes
    b"z" * 2000,                           # junk without any start block
], ids=["with-end-block", "without-end-block", "junk"])
def test_more_than_max_bytes_raises_frame_too_large_with_the_head(data: bytes) -> None:
    with pytest.raises(FrameTooLarge) as raised:
        decode(data, max_bytes=1000, chunk=256)
    assert raised.value.size > 1000
    assert raised.value.head == data.lstrip(b"\x0b")[:4096][:len(raised.value.head)]


def test_a_frame_of_exactly_max_bytes_passes() -> None:
    frames, _ = decode(frame(b"m" * 1000), max_bytes=1000, chunk=64)
    assert frames == [Frame(b"m" * 1000)]


def test_connection_closed_inside_a_frame_is_a_framing_error_and_frees_the_buffer() -> None:
    _, decoder = decode(b"\x0bMSH|half")
    with pytest.raises(FramingError, match="inside a frame"):
        decoder.close()
    assert decoder.buffered == 0


def test_connection_closed_after_junk_counts_it() -> None:
    _, decoder = decode(frame(b"MSH|a") + b"trailing")
    decoder.close()
    assert decoder.skipped == 8 and decoder.buffered == 0


def test_clear_forgets_an_unfinished_frame() -> None:
    _, decoder = decode(b"\x0bMSH|half")
    decoder.clear()
    assert decoder.buffered == 0 and not decoder.in_frame
    decoder.feed(frame(b"MSH|next"))
    assert decoder.next() == Frame(b"MSH|next")


_BODY = st.binary(min_size=1, max_size=200).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b"") or b"M")


@given(messages=st.lists(_BODY, max_size=8), chunk=st.integers(min_value=1, max_value=64))
def test_any_chunking_gives_the_same_frames(messages: list[bytes], chunk: int) -> None:
    data = b"".join(frame(m) for m in messages)
    frames, decoder = decode(data, max_bytes=1000, chunk=chunk)
    assert [f.body for f in frames] == messages
    assert all(f.has_start for f in frames)
    assert decoder.buffered == 0


_JUNK = st.binary(max_size=20).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))


@given(items=st.lists(st.tuples(_JUNK, _BODY), max_size=6), chunk=st.integers(min_value=1, max_value=50),
       cut=st.booleans())
def test_junk_and_cut_off_frames_decode_the_same_whatever_the_chunking(
        items: list[tuple[bytes, bytes]], chunk: int, cut: bool) -> None:
    data = b"".join(junk + frame(body) for junk, body in items)
    if cut:  # a frame cut off by the next start block
        data = b"\x0bMSH|cut-off" + data
    whole, whole_decoder = decode(data, max_bytes=1000)
    chunked, chunked_decoder = decode(data, max_bytes=1000, chunk=chunk)
    assert [f.body for f in chunked] == [f.body for f in whole] == [body for _, body in items]
    assert chunked_decoder.skipped == whole_decoder.skipped
    assert chunked_decoder.dropped_partial == whole_decoder.dropped_partial == (1 if cut and items else 0)
