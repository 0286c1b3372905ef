"""A real local HTTP server playing a downstream system, for tests and benchmarks (bench/ imports it too).

A subclass answers ``POST <path>`` in :meth:`LocalHttpServer.handle`; :meth:`start` binds 127.0.0.1 on a
free port and sets ``url``; :meth:`stop` closes it.
"""

from __future__ import annotations

from aiohttp import web


class LocalHttpServer:
    """An aiohttp server on 127.0.0.1 and a free port; ``url`` is its ``path`` once started."""

    path = "/events"

    def __init__(self) -> None:
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one ``POST <path>``."""
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(self.path, self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}{self.path}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
