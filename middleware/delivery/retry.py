"""Retrying a delivery in process with tenacity, per the connector's :class:`RetryPolicy`.

This covers short blips only. It stops early, leaving the message to be parked on the broker
(:mod:`.parking`), when the sink's ``Retry-After`` asks for more than ``backoff.max``, or when the
caller says to (``interrupted``: the connector's circuit breaker opened).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

from middleware.delivery.base import Connector, Delivery, RetryPolicy
from middleware.errors import DeliveryError

RetryCallback = Callable[[int, DeliveryError], None]
AttemptCallback = Callable[[DeliveryError | None], None]
SLEEP_SLICE = 0.1  # seconds: how often a backoff looks whether it was interrupted


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, DeliveryError) and exc.retryable


def asks_to_park(error: BaseException | None, policy: RetryPolicy) -> bool:
    """True when the sink's ``Retry-After`` is longer than in-process retry waits (``backoff.max``)."""
    return isinstance(error, DeliveryError) and error.retry_after is not None and error.retry_after > policy.max


class _Wait:
    """Exponential backoff plus jitter, never shorter than the sink's Retry-After."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.backoff = wait_exponential(multiplier=policy.initial, exp_base=policy.multiplier, max=policy.max)
        self.jitter = wait_random(0, policy.jitter)

    def __call__(self, state: RetryCallState) -> float:
        wait = self.backoff(state) + self.jitter(state)
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, DeliveryError) and error.retry_after:
            wait = max(wait, error.retry_after)  # above max only if we get here: a longer one is parked
        return wait


async def send_with_retry(connector: Connector, delivery: Delivery, policy: RetryPolicy,
                          on_retry: RetryCallback | None = None, *,
                          interrupted: Callable[[], bool] | None = None,
                          on_attempt: AttemptCallback | None = None) -> int:
    """Send until accepted; returns the number of attempts made.

    Raises the last :class:`DeliveryError` (``attempts`` set: the sends made) when it is not
    retryable, the policy's attempts are used up, the sink's ``Retry-After`` exceeds
    ``backoff.max`` (:func:`asks_to_park`) or ``interrupted()`` turns true (checked before each
    retry and during its backoff). ``on_attempt`` hears each send's outcome (None: accepted).
    """
    stopped = interrupted or (lambda: False)

    def stop(state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        return (state.attempt_number >= max(policy.attempts, 1) or asks_to_park(error, policy)
                or stopped())

    async def sleep(seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while not stopped() and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.sleep(min(left, SLEEP_SLICE))

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if on_retry is not None and isinstance(error, DeliveryError):
            on_retry(state.attempt_number, error)

    attempt = 0
    last: list[DeliveryError] = []
    retrying = AsyncRetrying(
        stop=stop,
        wait=_Wait(policy),
        retry=retry_if_exception(_retryable),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )
    try:
        async for try_ in retrying:
            with try_:
                if last and stopped():  # interrupted during the backoff: no further send
                    raise last[-1]
                attempt += 1
                try:
                    await connector.send(delivery)
                except DeliveryError as exc:
                    last.append(exc)
                    if on_attempt is not None:
                        on_attempt(exc)
                    raise
                if on_attempt is not None:
                    on_attempt(None)
    except DeliveryError as exc:
        exc.attempts = attempt
        raise
    return attempt
