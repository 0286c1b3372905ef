"""Batched acks (middleware.broker.acks): multiple=True only over a run of consecutive settled tags."""

from __future__ import annotations

import asyncio

import pytest

from middleware.broker.acks import AckBatcher


class RecordingChannel:
    """Stands for one aiormq channel: records the basic.ack frames it is asked to send."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[int, bool]] = []
        self.fail = fail

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        if self.fail:
            raise ConnectionError("channel closed")
        self.sent.append((delivery_tag, multiple))


async def deliver(batcher: AckBatcher, channel: RecordingChannel, tags: range) -> None:
    for tag in tags:
        batcher.delivered(channel, tag)


def test_acks_of_one_turn_leave_as_one_multiple_ack() -> None:
    async def scenario() -> list[tuple[int, bool]]:
        batcher, channel = AckBatcher(), RecordingChannel()
        await deliver(batcher, channel, range(1, 6))
        await asyncio.gather(*(batcher.ack(channel, tag) for tag in range(1, 6)))
        return channel.sent

    assert asyncio.run(scenario()) == [(5, True)]


def test_a_message_still_in_its_handler_is_never_covered_by_a_multiple_ack() -> None:
    async def scenario() -> list[tuple[int, bool]]:
        batcher, channel = AckBatcher(), RecordingChannel()
        await deliver(batcher, channel, range(1, 5))
        await asyncio.gather(*(batcher.ack(channel, tag) for tag in (1, 3, 4)))  # 2 still in flight
        await batcher.ack(channel, 2)
        return channel.sent

    assert asyncio.run(scenario()) == [(1, True), (3, False), (4, False), (2, True)]


def test_rejected_and_unseen_tags() -> None:
    async def scenario() -> list[tuple[int, bool]]:
        batcher, channel = AckBatcher(), RecordingChannel()
        await deliver(batcher, channel, range(1, 4))
        batcher.settled(channel, 1)  # rejected or handed back: settled, not acked again
        await asyncio.gather(*(batcher.ack(channel, tag) for tag in (2, 3)))
        await batcher.ack(channel, 9)  # never seen (tag 4..8 unknown): acked alone
        return channel.sent

    assert asyncio.run(scenario()) == [(3, True), (9, False)]


def test_each_waiting_ack_raises_what_the_channel_raised() -> None:
    async def scenario() -> list[BaseException | None]:
        batcher, channel = AckBatcher(), RecordingChannel(fail=True)
        await deliver(batcher, channel, range(1, 3))
        return await asyncio.gather(*(batcher.ack(channel, tag) for tag in (1, 2)), return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)


def test_channels_keep_their_own_tags() -> None:
    async def scenario() -> tuple[list[tuple[int, bool]], list[tuple[int, bool]]]:
        batcher, old, new = AckBatcher(), RecordingChannel(), RecordingChannel()
        await deliver(batcher, old, range(1, 3))
        await deliver(batcher, new, range(1, 3))  # a robust channel restored: tags start again at 1
        await asyncio.gather(batcher.ack(old, 1), batcher.ack(new, 1), batcher.ack(new, 2))
        return old.sent, new.sent

    assert asyncio.run(scenario()) == ([(1, True)], [(2, True)])


@pytest.mark.parametrize("count", [1, 50])
def test_every_ack_returns(count: int) -> None:
    async def scenario() -> int:
        batcher, channel = AckBatcher(), RecordingChannel()
        await deliver(batcher, channel, range(1, count + 1))
        await asyncio.wait_for(asyncio.gather(*(batcher.ack(channel, t) for t in range(count, 0, -1))), 5)
        return sum(1 for _ in channel.sent)

    assert asyncio.run(scenario()) >= 1
