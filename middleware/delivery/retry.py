"""Retrying a delivery with tenacity, per the connector's :class:`RetryPolicy`."""

from __future__ import annotations

from collections.abc import Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from middleware.delivery.base import Connector, Delivery, RetryPolicy
from middleware.errors import DeliveryError

RetryCallback = Callable[[int, DeliveryError], None]


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, DeliveryError) and exc.retryable


class _Wait:
    """Exponential backoff plus jitter, never shorter than the sink's Retry-After (capped at ``max``)."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.backoff = wait_exponential(multiplier=policy.initial, exp_base=policy.multiplier, max=policy.max)
        self.jitter = wait_random(0, policy.jitter)

    def __call__(self, state: RetryCallState) -> float:
        wait = self.backoff(state) + self.jitter(state)
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, DeliveryError) and error.retry_after:
            wait = max(wait, min(error.retry_after, self.policy.max))
        return wait


async def send_with_retry(connector: Connector, delivery: Delivery, policy: RetryPolicy,
                          on_retry: RetryCallback | None = None) -> int:
    """Send until accepted; returns the number of attempts made.

    Raises the last :class:`DeliveryError` (``attempts`` set) when it is not retryable or the
    policy's attempts are used up.
    """

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if on_retry is not None and isinstance(error, DeliveryError):
            on_retry(state.attempt_number, error)

    attempt = 0
    retrying = AsyncRetrying(
        stop=stop_after_attempt(max(policy.attempts, 1)),
        wait=_Wait(policy),
        retry=retry_if_exception(_retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        async for try_ in retrying:
            with try_:
                attempt = try_.retry_state.attempt_number
                await connector.send(delivery)
    except DeliveryError as exc:
        exc.attempts = attempt
        raise
    return attempt
