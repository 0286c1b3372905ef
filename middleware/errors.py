"""The error hierarchy: every failure the engine reports is one of these.

Pipeline errors know their stage (parse, filter, map, validate, deliver), the route and the
correlation id, and their message says what the user should do. Dead letters record the class
name and message of the error that sent them there.
"""

from __future__ import annotations

from dataclasses import dataclass


class MiddlewareError(Exception):
    """Base of every error raised on purpose by the middleware."""

    stage: str | None = None

    def __init__(
        self,
        message: str,
        *,
        route: str | None = None,
        correlation_id: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.route = route
        self.correlation_id = correlation_id
        self.hint = hint

    def with_context(self, *, route: str | None = None, correlation_id: str | None = None) -> MiddlewareError:
        """Fill in route and correlation id where they are still unknown; returns self."""
        self.route = self.route or route
        self.correlation_id = self.correlation_id or correlation_id
        return self

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


@dataclass(frozen=True)
class Problem:
    """One finding in a project's files, printed as ``file:line: message``."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ConfigError(MiddlewareError):
    """The project (config, routes, connectors, schemas) is invalid; carries every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        first = str(problems[0]) if problems else "invalid project"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(first + more, hint="run `middleware validate` for the full list")


class PipelineError(MiddlewareError):
    """A message could not be turned into events; it is dead-lettered with this error."""


class ParseError(PipelineError):
    """The input bytes are not a well-formed message of the route's format."""

    stage = "parse"


class FilterError(PipelineError):
    """A filter condition could not be evaluated on the message."""

    stage = "filter"


class MappingError(PipelineError):
    """A mapping rule failed: names the rule, target path and source expression."""

    stage = "map"


class SchemaValidationError(PipelineError):
    """The mapped event data does not conform to its JSON Schema."""

    stage = "validate"


class DeliveryError(PipelineError):
    """A sink did not accept an event.

    ``retryable`` says whether trying again may help, ``status`` is the HTTP status if any,
    ``retry_after`` the sink's Retry-After in seconds, ``attempts`` how many tries were made.
    """

    stage = "deliver"

    def __init__(self, message: str, *, retryable: bool, status: int | None = None,
                 retry_after: float | None = None, route: str | None = None,
                 correlation_id: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, route=route, correlation_id=correlation_id, hint=hint)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.attempts = 1


class BrokerError(MiddlewareError):
    """The message broker is unreachable or refused an operation."""


class BrokerUnavailable(BrokerError):
    """The broker could not take a message for a while (connection lost, a cluster node down, a queue
    electing a new leader refused it): not the message's fault, so a worker hands the message back
    without counting a failed delivery, and never dead-letters it for this."""


class AuditError(MiddlewareError):
    """The audit log cannot be written: the audited action (reveal, export, replay, purge) is not done."""


class EngineStopping(MiddlewareError):
    """Work arrived after shutdown began: the message goes back to its queue, unharmed."""
