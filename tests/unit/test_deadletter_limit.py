"""A message the embedded broker moved to the dead-letter queue at its delivery limit (no x-mw-
headers, only its mark) is presented with a reason, like one our workers dead-lettered."""

from __future__ import annotations

from pathlib import Path

from middleware.broker import make_broker
from middleware.broker.base import OutgoingMessage
from middleware.deadletter import LIMIT_ERROR_CLASS, browse, replay_target


async def test_embedded_broker_limit_dead_letter_reads_with_stage_attempts_and_connector(tmp_path: Path) -> None:
    broker = make_broker(f"filesystem://{tmp_path}/broker")
    await broker.connect()
    try:
        dlq, queue = "adt-inbound.dlq", "adt-inbound.to.case-management"
        await broker.declare_queue(dlq, kind="dead-letter")
        await broker.declare_queue(queue, kind="work", dead_letter_to=dlq, delivery_limit=2)
        event = OutgoingMessage(b"{}", {"x-mw-route": "adt-inbound", "x-mw-event-type": "patient.registered.v1"},
                                "corr-1", "evt-1", "application/cloudevents+json")
        await broker.publish(event, queue=queue)
        for _ in range(3):  # x-delivery-count 0, 1, 2: the third return dead-letters it
            message = await broker.get(queue)
            assert message is not None
            await message.reject(requeue=True)
        assert await broker.get(queue) is None
        held = await browse(broker, dlq, 10, route="adt-inbound", delivery_limit=2)
        [item] = held.matched
        letter = item.letter
        assert (letter.route, letter.stage, letter.connector) == ("adt-inbound", "deliver", "case-management")
        assert letter.error_class == LIMIT_ERROR_CLASS and queue in letter.error
        assert letter.attempts == 3 and letter.correlation_id == "corr-1"
        assert replay_target(letter) == queue
        await held.release()
    finally:
        await broker.close()


async def test_raw_inbound_message_dead_lettered_by_the_limit_reads_as_stage_parse() -> None:
    broker = make_broker("memory://")
    await broker.connect()
    try:
        await broker.declare_queue("r.dlq", kind="dead-letter")
        await broker.declare_queue("ehr.adt", kind="work", dead_letter_to="r.dlq", delivery_limit=1)
        await broker.publish(OutgoingMessage(b"MSH|^~\\&|", correlation_id="c"), queue="ehr.adt")
        for _ in range(2):
            message = await broker.get("ehr.adt")
            assert message is not None
            await message.reject(requeue=True)
        held = await browse(broker, "r.dlq", 10, route="adt-inbound", delivery_limit=1)
        [item] = held.matched
        assert (item.letter.route, item.letter.stage, item.letter.connector) == ("adt-inbound", "parse", None)
        assert item.letter.attempts == 2 and item.letter.replay_queue == "ehr.adt"
        await held.release()
    finally:
        await broker.close()
