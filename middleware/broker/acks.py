"""Batched acks for one consumer: the acks its handlers send in one event-loop turn leave as a single
``basic.ack(multiple=True)`` (issue 14: each ack was a frame, a socket write and a drain of its own).

An ack is still sent only when a handler calls it (after the broker's confirm or the sink's answer,
DESIGN promise 1), and it never waits longer than the current loop turn. ``multiple=True`` acks every
unsettled delivery up to a tag, so it is used only across a run of consecutive delivery tags that are
all known here and all settled or being acked now (tags of a consumer's own channel count 1, 2, 3...
in delivery order). A tag still in a handler, or not seen yet, ends the run: acks above it go one by one.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from middleware.broker.frames import COALESCE

TRACK_LIMIT = 65536  # tags tracked per channel above the settled floor; past it, acks go one by one


class _ChannelAcks:
    """The delivery tags of one (aiormq) channel above ``floor`` (every tag <= floor is settled)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.floor = 0
        self.settled: dict[int, bool] = {}  # registered tag -> settled (acked, rejected or handed back)
        self.pending: dict[int, asyncio.Future[None]] = {}  # tags whose ack waits for this turn's flush


class AckBatcher:
    """Coalesces the acks of one consumer's channel (robust channels change their aiormq channel on
    reconnect: each keeps its own tags)."""

    def __init__(self) -> None:
        self._channels: weakref.WeakKeyDictionary[Any, _ChannelAcks] = weakref.WeakKeyDictionary()
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    def _state(self, channel: Any) -> _ChannelAcks:
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _ChannelAcks(channel)
        return state

    def delivered(self, channel: Any, tag: int | None) -> None:
        """A message reached its handler (call before the handler runs)."""
        if tag is None:
            return
        state = self._state(channel)
        if len(state.settled) < TRACK_LIMIT and tag > state.floor:
            state.settled.setdefault(tag, False)

    def settled(self, channel: Any, tag: int | None) -> None:
        """The message was settled another way (rejected, handed back)."""
        state = self._channels.get(channel)
        if state is not None and tag is not None and tag in state.settled:
            state.settled[tag] = True

    async def ack(self, channel: Any, tag: int) -> None:
        """Ack ``tag`` with the others acked in this loop turn; raises what the channel raised."""
        loop = asyncio.get_running_loop()
        state = self._state(channel)
        future: asyncio.Future[None] = loop.create_future()
        state.pending[tag] = future
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        await future

    def _flush(self) -> None:
        self._scheduled = False
        for state in list(self._channels.values()):
            if state.pending:
                pending, state.pending = state.pending, {}
                task = asyncio.ensure_future(self._send(state, pending))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _send(self, state: _ChannelAcks, pending: dict[int, asyncio.Future[None]]) -> None:
        walk, top = state.floor, 0  # the run of consecutive settled-or-acked-now tags above the floor
        while (walk + 1 in pending) or state.settled.get(walk + 1, False):
            walk += 1
            if walk in pending:
                top = walk
        sends: list[tuple[list[int], int, bool]] = []
        if top:
            sends.append(([t for t in pending if t <= top], top, True))
            for tag in range(state.floor + 1, walk + 1):
                state.settled.pop(tag, None)
            state.floor = walk
        sends += [([tag], tag, False) for tag in pending if tag > walk]
        for tags, tag, multiple in sends:
            try:
                # wait=False: queued for the connection's writer, not waited for until written (it leaves
                # with the other frames of this turn, broker/frames.py); a closed channel still raises here
                await state.channel.basic_ack(delivery_tag=tag, multiple=multiple, wait=not COALESCE)
            except BaseException as exc:  # channel closed, connection lost: each waiting ack raises it
                for each in tags:
                    if not pending[each].done():
                        pending[each].set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for each in tags:
                if each in state.settled:
                    state.settled[each] = True
                if not pending[each].done():
                    pending[each].set_result(None)
