"""The request context behind ``get_session()``, ``get_locks()`` and ``get_tx()``.

:class:`~asgi_dist.DistMiddleware` sets one :class:`RequestContext` per HTTP or
websocket connection in a :mod:`contextvars` variable; the capabilities attach
their request-scoped objects to it through :class:`RequestHook`.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Protocol

from asgi_dist._types import Message, Scope
from asgi_dist.errors import ConfigError, NoRequestContext

if TYPE_CHECKING:
    from asgi_dist.locks.request import RequestLocks
    from asgi_dist.sessions.session import Session
    from asgi_dist.transactions.request import RequestTransaction, TransactionHook

__all__ = ["RequestContext", "RequestHook", "get_locks", "get_session", "get_tx"]


class RequestContext:
    """Everything asgi_dist holds for one request or websocket connection."""

    __slots__ = ("locks", "scope", "session", "transactions", "tx")

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.session: Session | None = None
        self.locks: RequestLocks | None = None
        # Where get_tx() makes the request transaction, on its first call.
        self.transactions: TransactionHook | None = None
        self.tx: RequestTransaction | None = None


class RequestHook(Protocol):
    """What one capability does around a request.

    Hooks run like nested middleware: ``on_request`` in registration order,
    ``on_response_start`` and ``on_finish`` in reverse.  ``on_response_start``
    runs before ``http.response.start`` is forwarded and may add headers to
    ``message``; if it raises, the middleware answers with an error response
    instead of the app's (a failed commit must never look like success).
    ``check_response`` runs on every hook before any ``on_response_start``: what
    can fail without I/O (a session that cannot be stored) fails there, before
    another hook commits anything.
    """

    async def on_request(self, ctx: RequestContext) -> None: ...

    def check_response(self, ctx: RequestContext) -> None: ...

    async def on_response_start(self, ctx: RequestContext, message: Message) -> None: ...

    async def on_response_end(self, ctx: RequestContext) -> None:
        """The last byte of the response was sent (background tasks may still run)."""

    async def on_finish(self, ctx: RequestContext, error: BaseException | None) -> None: ...


_current: contextvars.ContextVar[RequestContext] = contextvars.ContextVar("asgi_dist_request")


def current_request(what: str = "this") -> RequestContext:
    try:
        return _current.get()
    except LookupError:
        raise NoRequestContext(
            f"{what} was called outside a request: it works only while DistMiddleware is "
            "handling an HTTP or websocket request (wrap the app with dist.wrap(app) or "
            "app.add_middleware(DistMiddleware, dist=dist)); in a thread, run the call with "
            "the request's context (starlette.concurrency.run_in_threadpool or "
            "asyncio.to_thread copy it, loop.run_in_executor does not)"
        ) from None


def set_current(ctx: RequestContext) -> contextvars.Token[RequestContext]:
    return _current.set(ctx)


def reset_current(token: contextvars.Token[RequestContext]) -> None:
    _current.reset(token)


def get_session() -> Session:
    """The session of the current request (also inside websockets)."""
    ctx = current_request("get_session()")
    if ctx.session is None:
        raise ConfigError(
            "get_session(): sessions are disabled for this Dist; build it with sessions enabled"
        )
    return ctx.session


def get_locks() -> RequestLocks:
    """The request's lock scope: every lock it acquires is released when the response ends."""
    ctx = current_request("get_locks()")
    if ctx.locks is None:
        raise ConfigError("get_locks(): the lock capability is not attached to this request")
    return ctx.locks


def get_tx() -> RequestTransaction:
    """The request's PostgreSQL transaction; it begins on first use."""
    ctx = _current.get(None) or current_request("get_tx()")
    tx = ctx.tx
    if tx is None:
        if ctx.transactions is None:
            raise ConfigError(
                "get_tx() needs PostgreSQL: build the Dist with postgres=... "
                "(or set ASGI_DIST_POSTGRES_DSN)"
            )
        tx = ctx.tx = ctx.transactions.transaction(ctx.scope)
    return tx
