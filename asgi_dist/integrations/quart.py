"""Quart: wrap the ASGI app and teach Quart the status codes of asgi_dist errors.

    app = Quart(__name__)
    init_app(app, dist)

Quart turns unhandled exceptions into its own 500 page, so the mapping of
outages to 503 and busy locks to 409 is registered as Quart error handlers;
``get_session()``, ``get_locks()`` and ``get_tx()`` work in views and websockets.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from asgi_dist.backends import _OUTAGES
from asgi_dist.errors import BackendUnavailable, ConfigError, LockLost, LockTimeout
from asgi_dist.middleware import DistMiddleware, error_response

if TYPE_CHECKING:
    from quart import Quart

    from asgi_dist.dist import Dist

__all__ = ["init_app"]

log = logging.getLogger("asgi_dist")


def init_app(app: Quart, dist: Dist) -> Quart:
    """Install ``DistMiddleware`` around ``app.asgi_app`` and the error handlers."""
    asgi: Any = app.asgi_app
    if isinstance(asgi, DistMiddleware):
        raise ConfigError(
            "init_app() was already called on this app: call it once per app (a second "
            "DistMiddleware would run every request through asgi_dist twice)"
        )
    middleware = DistMiddleware(asgi, dist=dist)
    _rename_quart_session_cookie(app, dist)

    async def handler(exc: Exception) -> tuple[str, int, dict[str, str]]:
        status, headers, body = error_response(exc) or (500, {}, "Internal Server Error")
        if status == 503:
            # Quart answers here, so the middleware never sees the error: tell its
            # outage log, as Starlette's handler does.
            middleware._outages.answered(_what(), exc)
        return body, status, headers

    # Every outage the middleware answers 503 (a view's own asyncpg or redis call
    # included), not only ours: Quart turns the rest into its 500 page.
    for cls in (BackendUnavailable, LockTimeout, LockLost, *_OUTAGES):
        app.register_error_handler(cls, handler)
    app.asgi_app = middleware  # type: ignore[method-assign,assignment]
    return app


def _rename_quart_session_cookie(app: Quart, dist: Dist) -> None:
    """Quart's own cookie session (``quart.session``) is named ``session`` by default,
    as ours is: whenever a view touched it, its Set-Cookie replaced ours in the
    browser and the asgi_dist session was lost.  Quart's gets another name."""
    try:
        ours = dist.sessions.config.cookie_key
    except ConfigError:  # sessions are off
        return
    if app.config.get("SESSION_COOKIE_NAME") == ours:
        app.config["SESSION_COOKIE_NAME"] = f"quart_{ours}"
        log.info(
            "Quart's own cookie session is renamed %r: asgi_dist's session cookie is %r",
            f"quart_{ours}",
            ours,
        )


def _what() -> str:
    from quart import has_request_context, has_websocket_context, request, websocket

    if has_request_context():
        return f"http {request.path}"
    if has_websocket_context():
        return f"websocket {websocket.path}"
    return "quart"
