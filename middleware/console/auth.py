"""Who may use the console: one shared token (``CONSOLE_TOKEN``), as a bearer header or entered once
on the login page, which starts a server-side session held in a cookie.

- The token and session ids are compared in constant time (:func:`hmac.compare_digest`; sessions
  are looked up by the SHA-256 of the id, so a lookup's timing says nothing about a valid id).
- The cookie is ``HttpOnly; Secure; SameSite=Strict`` (browsers keep Secure cookies for
  ``http://127.0.0.1`` and ``localhost``; elsewhere, serve the console behind TLS).
- Every POST made with a session cookie carries the session's CSRF token (a form field or the
  ``X-CSRF-Token`` header) and, when the browser sends one, an ``Origin`` of this host. A bearer
  header is not sent by browsers on their own, so bearer requests need no CSRF token.
- Sessions live in memory: they end when the engine restarts, or after :data:`SESSION_SECONDS`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

TOKEN_ENV = "CONSOLE_TOKEN"
COOKIE = "mw_console"
SESSION_SECONDS = 12 * 3600
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"


def token_matches(given: str, expected: str) -> bool:
    """True if ``given`` is the token; constant time whatever the inputs."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


@dataclass
class Session:
    """A signed-in browser: when it ends, its CSRF token, the name it gave for the audit log."""

    expires: float
    csrf: str
    operator: str = ""


@dataclass
class Identity:
    """Who made a request: through a session (cookie) or the bearer header."""

    session: Session | None
    operator: str

    @property
    def csrf(self) -> str:
        return self.session.csrf if self.session else ""


@dataclass
class Auth:
    """The console's token and its sessions."""

    token: str
    sessions: dict[str, Session] = field(default_factory=dict)

    def login(self, given: str, operator: str = "") -> str | None:
        """A new session id if ``given`` is the token, else None."""
        if not token_matches(given, self.token):
            return None
        self._prune()
        session_id = secrets.token_urlsafe(32)
        self.sessions[_key(session_id)] = Session(time.time() + SESSION_SECONDS, secrets.token_urlsafe(32),
                                                  operator.strip()[:80])
        return session_id

    def logout(self, session_id: str) -> None:
        self.sessions.pop(_key(session_id), None)

    def identify(self, request: web.Request) -> Identity | None:
        """The request's identity: a valid bearer token or session cookie; None otherwise."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return Identity(None, "bearer token") if token_matches(value.strip(), self.token) else None
        session_id = request.cookies.get(COOKIE, "")
        session = self.sessions.get(_key(session_id)) if session_id else None
        if session is None or session.expires < time.time():
            return None
        return Identity(session, session.operator or "console session")

    def _prune(self) -> None:
        now = time.time()
        for key in [k for k, s in self.sessions.items() if s.expires < now]:
            del self.sessions[key]


def same_origin(request: web.Request) -> bool:
    """False only when the browser says the request comes from another origin (``Origin`` header)."""
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.host


def csrf_ok(request: web.Request, identity: Identity, form_value: str | None) -> bool:
    """A POST's CSRF check: bearer requests pass; session requests need the session's token and,
    when the browser sends an Origin, this host's."""
    if identity.session is None:
        return True
    given: str = form_value or request.headers.get(CSRF_HEADER) or ""
    return same_origin(request) and bool(given) and hmac.compare_digest(given.encode(), identity.csrf.encode())


def set_session_cookie(response: web.StreamResponse, session_id: str) -> None:
    response.set_cookie(COOKIE, session_id, max_age=SESSION_SECONDS, path="/", httponly=True, secure=True,
                        samesite="Strict")


def clear_session_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/")
