"""The console's pages and actions, added to the operations listener that serves ``/metrics``.

Server-rendered (Jinja2 through aiohttp-jinja2); the vendored htmx (``static/htmx.min.js``)
re-fetches each page's table every few seconds. Every page but the login page and the static files
needs the token (:mod:`middleware.console.auth`); the two actions (replay a group, reveal a body)
are POSTs with a CSRF token and are written to the audit log.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web

from middleware.cli.dlq import render_body
from middleware.cli.status import format_age as status_age
from middleware.console.auth import (
    COOKIE,
    CSRF_FIELD,
    TOKEN_ENV,
    Auth,
    Identity,
    clear_session_cookie,
    csrf_ok,
    same_origin,
    set_session_cookie,
)
from middleware.console.data import DEAD_LETTER_SCAN, ConsoleData, Extras
from middleware.depths import DepthSampler
from middleware.errors import MiddlewareError
from middleware.observe import Metrics
from middleware.project import Project

log = logging.getLogger("middleware.console")
HERE = Path(__file__).parent
DISABLED = "console disabled: set CONSOLE_TOKEN to serve it at / beside /metrics"
REFRESH_SECONDS = 3  # the routes page
DEAD_LETTER_REFRESH_SECONDS = 5  # a route's dead letters: each refresh reads its dead-letter queue
_HEADERS = {  # Referrer-Policy same-origin: with no-referrer Chromium sends "Origin: null" on our own form posts
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Protected = Callable[[web.Request, Identity], Awaitable[web.StreamResponse]]


@dataclass
class Console:
    """What the handlers share: the token's sessions and the data source."""

    auth: Auth
    data: ConsoleData


CONSOLE: web.AppKey[Console] = web.AppKey("console", Console)


def setup_console(app: web.Application, project: Project, metrics: Metrics, *, extras: Extras | None = None,
                  depths: DepthSampler | None = None, token: str | None = None) -> bool:
    """Add the console at ``/`` to ``app`` (the listener of ``/metrics``); False when no token is
    configured (``CONSOLE_TOKEN``): the console is then off, ``/metrics`` unaffected."""
    token = os.environ.get(TOKEN_ENV, "") if token is None else token
    if not token.strip():
        return False  # `middleware run` logs DISABLED once its listener is bound
    data = ConsoleData(project, metrics, extras, depths)
    app[CONSOLE] = Console(Auth(token.strip()), data)
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    env.filters.update(age=format_age, rate=format_rate, ago=format_ago, dash=dash, when=format_when)
    env.globals.update(refresh=REFRESH_SECONDS, dead_letter_refresh=DEAD_LETTER_REFRESH_SECONDS,
                       csrf_field=CSRF_FIELD)

    async def close(_: web.Application) -> None:
        await data.close()

    app.on_cleanup.append(close)
    app.router.add_static("/static/", HERE / "static", name="console-static")
    app.add_routes([
        web.get("/", protected(routes_page)),
        web.get("/fragments/routes", protected(routes_fragment)),
        web.get("/routes/{route}", protected(route_page)),
        web.get("/fragments/routes/{route}", protected(dead_letters_fragment)),
        web.get("/routes/{route}/replay", protected(confirm_replay)),
        web.post("/routes/{route}/replay", protected(do_replay)),
        web.post("/routes/{route}/reveal", protected(reveal)),
        web.get("/trace", protected(trace_page)),
        web.get("/login", login_page),
        web.post("/login", login),
        web.post("/logout", protected(logout)),
    ])
    return True


# -- formatting --------------------------------------------------------------------------------------

def dash(value: Any) -> str:
    """None as an em dash (the figure is not known), else the value."""
    return "—" if value is None or value == "" else str(value)


def format_age(seconds: float | None) -> str:
    """``2m05s`` as ``middleware status`` writes it; ``—`` when unknown."""
    return "—" if seconds is None else status_age(seconds)


def format_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:g}/s"


def format_when(timestamp: float | None) -> str:
    """A Unix time as ``2026-01-31 08:00:00.123 UTC``."""
    if timestamp is None:
        return "—"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def format_ago(timestamp: float | None) -> str:
    """A Unix time as ``12 s ago (2026-01-31 08:00:00 UTC)``."""
    if timestamp is None:
        return "—"
    when = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{format_age(time.time() - timestamp)} ago ({when})"


# -- access ------------------------------------------------------------------------------------------

def _secure(response: web.StreamResponse) -> web.StreamResponse:
    for name, value in _HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def protected(handler: Protected) -> Handler:
    """``handler`` for signed-in requests only; POSTs must pass the CSRF check."""
    async def wrapper(request: web.Request) -> web.StreamResponse:
        console = request.app[CONSOLE]
        identity = console.auth.identify(request)
        if identity is None:
            return _secure(_unauthorized(request))
        if request.method == "POST":
            form = await request.post()
            value = form.get(CSRF_FIELD)
            if not csrf_ok(request, identity, value if isinstance(value, str) else None):
                log.warning("console: POST refused (CSRF check failed)",
                            extra={"path": request.path, "client": request.remote})
                return _secure(web.Response(status=403, text="The form was stale or came from another site: "
                                                             "reload the page and try again."))
        return _secure(await handler(request, identity))

    return wrapper


def _unauthorized(request: web.Request) -> web.StreamResponse:
    """401: htmx is sent to the login page, a browser gets the login page, anything else a challenge."""
    headers = {"WWW-Authenticate": 'Bearer realm="middleware console"'}
    if request.headers.get("HX-Request"):
        return web.Response(status=401, headers={**headers, "HX-Redirect": "/login"})
    if "text/html" in request.headers.get("Accept", ""):
        response = aiohttp_jinja2.render_template("login.html", request, {"next": _next(request.path_qs)},
                                                  status=401)
        response.headers.update(headers)
        return response
    return web.Response(status=401, text="console: token required (Authorization: Bearer <CONSOLE_TOKEN>)\n",
                        headers=headers)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _next(target: str) -> str:
    """A local path to return to after signing in (never another site: ``//host`` and ``/\\host`` are)."""
    return target if target.startswith("/") and target[1:2] not in ("/", "\\") else "/"


def _context(identity: Identity, **values: Any) -> dict[str, Any]:
    return {"csrf": identity.csrf, "operator": identity.operator, **values}


async def login_page(request: web.Request) -> web.StreamResponse:
    return _secure(aiohttp_jinja2.render_template("login.html", request,
                                                  {"next": _next(request.query.get("next", "/"))}))


async def login(request: web.Request) -> web.StreamResponse:
    """Check the token; on success a session cookie and a redirect to where the user was going."""
    form = await request.post()
    token, name, target = (str(form.get(key, "")) for key in ("token", "operator", "next"))
    console = request.app[CONSOLE]
    session_id = console.auth.login(token, name) if same_origin(request) else None
    if session_id is None:
        log.warning("console: sign-in refused (wrong token)", extra={"client": request.remote})
        response = aiohttp_jinja2.render_template("login.html", request, {"next": _next(target), "failed": True},
                                                  status=401)
        return _secure(response)
    log.info("console: signed in", extra={"client": request.remote})
    response = _see_other(_next(target))
    set_session_cookie(response, session_id)
    return _secure(response)


async def logout(request: web.Request, identity: Identity) -> web.StreamResponse:
    request.app[CONSOLE].auth.logout(request.cookies.get(COOKIE, ""))
    response = _see_other("/login")
    clear_session_cookie(response)
    return response


# -- pages -------------------------------------------------------------------------------------------

async def _routes_context(request: web.Request, identity: Identity) -> dict[str, Any]:
    rows = await request.app[CONSOLE].data.routes()
    return _context(identity, rows=rows, silent=[r.route for r in rows if r.silent],
                    updated=time.strftime("%H:%M:%S", time.gmtime()))


async def routes_page(request: web.Request, identity: Identity) -> web.StreamResponse:
    return aiohttp_jinja2.render_template("routes.html", request, await _routes_context(request, identity))


async def routes_fragment(request: web.Request, identity: Identity) -> web.StreamResponse:
    return aiohttp_jinja2.render_template("_routes_table.html", request, await _routes_context(request, identity))


def _route(request: web.Request) -> str:
    name = request.match_info["route"]
    if name not in request.app[CONSOLE].data.project.routes:
        raise web.HTTPNotFound(text=f"no route {name!r}")
    return name


async def _dead_letters_context(request: web.Request, identity: Identity) -> dict[str, Any]:
    route = _route(request)
    try:
        letters = await request.app[CONSOLE].data.dead_letters(route)
        problem = None
    except MiddlewareError as exc:
        letters, problem = None, str(exc)
    return _context(identity, route=route, letters=letters, problem=problem,
                    updated=time.strftime("%H:%M:%S", time.gmtime()),
                    replayed=request.query.get("replayed"), replay_group=request.query.get("group"))


async def route_page(request: web.Request, identity: Identity) -> web.StreamResponse:
    context = await _dead_letters_context(request, identity)
    context["description"] = request.app[CONSOLE].data.project.routes[context["route"]].description
    return aiohttp_jinja2.render_template("route.html", request, context)


async def dead_letters_fragment(request: web.Request, identity: Identity) -> web.StreamResponse:
    context = await _dead_letters_context(request, identity)
    return aiohttp_jinja2.render_template("_dead_letters.html", request, context)


async def confirm_replay(request: web.Request, identity: Identity) -> web.StreamResponse:
    """The confirmation step: what a replay of the group would send back, and the button that does it."""
    route = _route(request)
    stage, error_class = request.query.get("stage", ""), request.query.get("error_class", "")
    letters = await request.app[CONSOLE].data.dead_letters(route)
    group = next((g for g in letters.groups if g.stage == stage and g.error_class == error_class), None)
    return aiohttp_jinja2.render_template("confirm_replay.html", request, _context(
        identity, route=route, stage=stage, error_class=error_class, group=group,
        target=request.app[CONSOLE].data.topology.route(route).inbound))


async def do_replay(request: web.Request, identity: Identity) -> web.StreamResponse:
    route = _route(request)
    form = await request.post()
    stage, error_class = str(form.get("stage", "")), str(form.get("error_class", ""))
    try:
        limit = max(1, int(str(form.get("count", ""))))
    except ValueError:
        limit = DEAD_LETTER_SCAN
    try:
        count = await request.app[CONSOLE].data.replay_group(route, stage, error_class, limit=limit,
                                                             who=identity.operator, client=request.remote or "")
    except MiddlewareError as exc:  # the audit log or the broker: nothing (more) was replayed
        return aiohttp_jinja2.render_template("problem.html", request, _context(identity, problem=str(exc)),
                                              status=503)
    log.info("console: dead letters replayed", extra={"route": route, "stage": stage, "error_class": error_class,
                                                      "count": count, "client": request.remote})
    query = urlencode({"replayed": count, "group": f"{stage} / {error_class}"})
    raise web.HTTPSeeOther(f"/routes/{route}?{query}")


async def reveal(request: web.Request, identity: Identity) -> web.StreamResponse:
    """One dead letter's body, on an explicit request; audited before it is shown."""
    route = _route(request)
    letter_id = str((await request.post()).get("letter", ""))
    try:
        summary, body = await request.app[CONSOLE].data.reveal(route, letter_id, who=identity.operator,
                                                               client=request.remote or "")
    except KeyError:
        raise web.HTTPNotFound(text=f"no dead letter {letter_id!r} in route {route!r} (replayed or purged?)") from None
    except MiddlewareError as exc:
        return aiohttp_jinja2.render_template("problem.html", request, _context(identity, problem=str(exc)),
                                              status=503)
    log.info("console: dead letter revealed", extra={"route": route, "id": letter_id, "client": request.remote})
    return aiohttp_jinja2.render_template("reveal.html", request, _context(
        identity, route=route, letter=summary, body=render_body(body), size=len(body)))


async def trace_page(request: web.Request, identity: Identity) -> web.StreamResponse:
    wanted = request.query.get("id", "").strip()
    data = request.app[CONSOLE].data
    enabled = data.journal_enabled
    hops = None
    problem = None
    if wanted and enabled:
        try:
            hops = await data.trace(wanted)
        except MiddlewareError as exc:
            problem = str(exc)
    return aiohttp_jinja2.render_template("trace.html", request, _context(
        identity, wanted=wanted, enabled=enabled, paths=hops, problem=problem))
