"""What the engine calls again and again on the broker leaves nothing behind (issue 14, memory goal).

The console's depth gauges and the breakers' depth checks call ``queue_info`` per queue every few
seconds for as long as the engine runs: each call must leave no task, channel or aio-pika object behind.
"""

from __future__ import annotations

import asyncio
import collections
import gc

import pytest

from middleware.broker.amqp import AmqpBroker
from middleware.errors import BrokerError

pytestmark = pytest.mark.rabbitmq

CALLS = 100


def _library_objects() -> collections.Counter[str]:
    gc.collect()
    names = (f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    return collections.Counter(name for name in names if name.startswith(("aio_pika.", "aiormq.")))


async def test_queue_info_leaves_no_task_channel_or_callback(amqp_url: str, queue_prefix: str) -> None:
    broker = AmqpBroker(amqp_url)
    await broker.connect()
    queue = queue_prefix + "depth"
    await broker.declare_queue(queue)
    try:
        for _ in range(5):  # warm-up: anything created once (caches, the first channel numbers)
            await broker.queue_info(queue)
        await asyncio.sleep(0.1)
        tasks, objects = len(asyncio.all_tasks()), _library_objects()
        for _ in range(CALLS):
            assert (await broker.queue_info(queue)).messages == 0
        for _ in range(CALLS // 10):  # a 404 closes the channel on the broker's side
            with pytest.raises(BrokerError, match="does not exist"):
                await broker.queue_info(queue_prefix + "nobody-declared-me")
        await asyncio.sleep(0.1)
        grown = {name: n - objects[name] for name, n in _library_objects().items() if n - objects[name] > 2}
        assert grown == {}, f"aio-pika/aiormq objects left by {CALLS} queue_info calls: {grown}"
        assert len(asyncio.all_tasks()) <= tasks
    finally:
        await broker.delete_queue(queue)
        await broker.close()
