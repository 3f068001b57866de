"""Quart: wrap the ASGI app and teach Quart the status codes of asgi_dist errors.

    app = Quart(__name__)
    init_app(app, dist)

Quart turns unhandled exceptions into its own 500 page, so the mapping of
outages to 503 and busy locks to 409 is registered as Quart error handlers;
``get_session()``, ``get_locks()`` and ``get_tx()`` work in views and websockets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis import exceptions as redis_errors

from asgi_dist.errors import BackendUnavailable, LockLost, LockTimeout
from asgi_dist.middleware import DistMiddleware, error_response

if TYPE_CHECKING:
    from quart import Quart

    from asgi_dist.dist import Dist

__all__ = ["init_app"]


def init_app(app: Quart, dist: Dist) -> Quart:
    """Install ``DistMiddleware`` around ``app.asgi_app`` and the error handlers."""

    async def handler(exc: Exception) -> tuple[str, int, dict[str, str]]:
        status, headers, body = error_response(exc) or (500, {}, "Internal Server Error")
        return body, status, headers

    for cls in (
        BackendUnavailable,
        LockTimeout,
        LockLost,
        redis_errors.ConnectionError,
        redis_errors.TimeoutError,
    ):
        app.register_error_handler(cls, handler)
    asgi: Any = app.asgi_app
    app.asgi_app = DistMiddleware(asgi, dist=dist)  # type: ignore[method-assign,assignment]
    return app
