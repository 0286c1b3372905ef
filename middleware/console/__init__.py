"""The operations console: routes, dead letters (grouped, replayable), trace search, served by
``middleware run`` beside ``/metrics`` when ``CONSOLE_TOKEN`` is set."""

from middleware.console.app import DISABLED, setup_console
from middleware.console.data import ConsoleData, Extras, console_extras

__all__ = ["DISABLED", "ConsoleData", "Extras", "console_extras", "setup_console"]
