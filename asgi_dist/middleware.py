"""DistMiddleware: pure ASGI glue between an app and its Dist.

* ``lifespan``: starts the Dist before the inner app's startup and stops it after
  the inner app's shutdown, whether or not the inner app speaks lifespan.
* ``http`` / ``websocket``: sets the request context behind ``get_session()``,
  ``get_locks()`` and ``get_tx()`` and runs the capabilities' request hooks.
* errors: an outage becomes 503 + ``Retry-After``, a busy lock 409, a failed
  commit 500 -- never a success for work that was rolled back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from asgi_dist._types import ASGIApp, Message, Receive, Scope, Send
from asgi_dist.backends import _OUTAGES, as_backend_unavailable
from asgi_dist.context import RequestContext, RequestHook, reset_current, set_current
from asgi_dist.errors import (
    BackendUnavailable,
    ConfigError,
    LockLost,
    LockTimeout,
    TransactionError,
)

if TYPE_CHECKING:
    from asgi_dist.dist import Dist

__all__ = ["DistMiddleware", "error_response"]

log = logging.getLogger("asgi_dist")

# During an outage every request may answer 503: past the first, they are counted and
# summed up in one log line per this many seconds.
OUTAGE_LOG_INTERVAL = 10.0


def error_response(exc: BaseException) -> tuple[int, dict[str, str], str] | None:
    """(status, headers, body) for the errors asgi_dist answers itself, else ``None``."""
    if isinstance(exc, LockTimeout):
        retry = max(1, math.ceil(exc.retry_after))
        return 409, {"retry-after": str(retry)}, f"Conflict: {exc}"
    if isinstance(exc, LockLost) and not exc.outage:
        # Another holder took over mid-request: the work was cancelled, retry it.
        return 409, {"retry-after": "1"}, f"Conflict: {exc}"
    outage = as_backend_unavailable(exc)
    if outage is None and isinstance(exc, LockLost):
        outage = BackendUnavailable(str(exc))
    if outage is not None:
        retry = max(1, math.ceil(outage.retry_after))
        # The body names the cause, not the server's address.
        return (
            503,
            {"retry-after": str(retry)},
            f"Service Unavailable: a backing store is unreachable; retry after {retry} s",
        )
    if isinstance(exc, TransactionError):
        return 500, {}, f"Internal Server Error: {exc}; nothing was saved"
    return None


async def _send_error(send: Send, status: int, headers: dict[str, str], body: str) -> None:
    data = body.encode()
    raw = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(data))]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class _OutageLog:
    """Logs the 503s of an outage without a line per request.

    The first 503 is logged at WARNING with its cause; the next ones are counted, and
    at most one line per ``interval`` says how many there were and the latest cause.
    Once no request answered 503 for ``interval`` seconds the outage is over: a last
    WARNING (at the level of the outage's own lines, so it is never filtered out
    while they were not) says so with the count, and the next 503 starts a new one.
    A request that needs no backend succeeds during an outage too, so a success
    cannot tell that the backends are back; a quiet interval can.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._first = 0.0  # monotonic time of the outage's first 503; 0: no outage
        self._last = 0.0  # of its latest 503
        self._logged = 0.0  # of its latest log line
        self._total = 0  # 503s of the outage
        self._unlogged = 0  # 503s since its latest log line
        self._cause = ""  # of the latest 503
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def answered(self, what: str, exc: BaseException) -> None:
        """A request (``what``: its type and path) was answered 503 because of ``exc``."""
        now = time.monotonic()
        if self._first and now - self._last >= self.interval:
            self._over(now)  # its timer never ran (its event loop stopped meanwhile)
        self._total += 1
        self._last = now
        self._cause = f"{what}: {type(exc).__name__}: {exc}"
        if not self._first:
            self._first = self._logged = now
            log.warning(
                "%s answered 503: %s; until the backends answer again, further 503s are "
                "counted and logged once per %g s",
                what,
                exc,
                self.interval,
            )
        else:
            self._unlogged += 1
            if now - self._logged >= self.interval:
                self._summary(now)
        self._schedule(now)

    def _summary(self, now: float) -> None:
        log.warning(
            "%d more requests answered 503 in the last %.1f s (the backends are still "
            "unavailable; latest: %s)",
            self._unlogged,
            now - self._logged,
            self._cause,
        )
        self._unlogged = 0
        self._logged = now

    def _over(self, now: float) -> None:
        log.warning(
            "no request answered 503 for %.1f s: the backends answer again; the outage "
            "answered %d requests 503 over %.1f s (%d since the last report)",
            now - self._last,
            self._total,
            self._last - self._first,
            self._unlogged,
        )
        self._first = self._total = self._unlogged = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, now: float) -> None:
        """Make sure a check runs when the next summary or the end of the outage is due,
        even if no request comes to trigger it."""
        loop = asyncio.get_running_loop()
        if self._timer is not None and self._timer_loop is loop:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_loop = loop
        self._timer = loop.call_later(self.interval, self._check)

    def _check(self) -> None:
        self._timer = None
        if not self._first:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._over(now)
            return
        if self._unlogged and now - self._logged >= self.interval:
            self._summary(now)
        due = self._last + self.interval
        if self._unlogged:
            due = min(due, self._logged + self.interval)
        assert self._timer_loop is not None
        self._timer = self._timer_loop.call_later(max(0.0, due - now), self._check)


class DistMiddleware:
    """Pure ASGI middleware; ``app = DistMiddleware(app, dist=dist)`` or ``dist.wrap(app)``."""

    def __init__(self, app: ASGIApp, dist: Dist) -> None:
        if not callable(app):
            raise ConfigError(
                f"DistMiddleware needs an ASGI app, got {app!r}: pass your Starlette, FastAPI "
                "or Quart app (dist.wrap(app))"
            )
        from asgi_dist.dist import Dist

        if not isinstance(dist, Dist):
            raise ConfigError(
                f"DistMiddleware needs dist=Dist(...), got {dist!r}: "
                "create one with Dist(...) or Dist.from_env() and pass it as dist="
            )
        dist.check_serving()
        self.app = app
        self.dist = dist
        self._hooks: list[RequestHook] | None = None
        self._outages = _OutageLog(OUTAGE_LOG_INTERVAL)
        _install_exception_handlers(app, self._outages.answered)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            await self._request(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # lifespan ------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":  # pragma: no cover - protocol violation
            return
        try:
            await self.dist.start()
        except Exception as exc:
            log.error("asgi_dist could not start: %s", exc)
            await send({"type": "lifespan.startup.failed", "message": f"asgi_dist: {exc}"})
            # Raised too, as Starlette's router does: servers expect it (uvicorn and
            # hypercorn report the failure once), and Starlette's TestClient would
            # otherwise wait forever.
            raise

        startup_answered = shutdown_answered = False
        pending: list[Message] = [message]

        async def inner_receive() -> Message:
            return pending.pop() if pending else await receive()

        async def inner_send(msg: Message) -> None:
            nonlocal startup_answered, shutdown_answered
            kind = msg["type"]
            if kind.startswith("lifespan.startup."):
                startup_answered = True
                if kind == "lifespan.startup.failed":
                    await self.dist.stop()
            elif kind.startswith("lifespan.shutdown."):
                # Stop after the inner app's shutdown, before the server hears of it.
                shutdown_answered = True
                await self.dist.stop()
            await send(msg)

        try:
            await self.app(scope, inner_receive, inner_send)
        except BaseException as exc:
            if startup_answered:
                await self.dist.stop()
                raise
            if _speaks_lifespan(self.app):
                # Starlette, FastAPI and Quart answer the startup even when it fails;
                # raising before that is a broken app (a middleware that cannot be
                # built, say): fail the startup instead of serving every request a 500.
                log.error("the app failed before answering the lifespan startup: %r", exc)
                await self.dist.stop()
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                raise
            # The inner app does not speak lifespan (it raised on the scope type):
            # asgi_dist still needs its own startup and shutdown.
            log.info(
                "the app raised on the lifespan scope (%r); taken as an app without "
                "lifespan support, asgi_dist handles its own startup and shutdown",
                exc,
            )
        if not startup_answered:
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await self.dist.stop()
            await send({"type": "lifespan.shutdown.complete"})
        elif not shutdown_answered:
            await self.dist.stop()

    # requests ------------------------------------------------------------------

    def _request_hooks(self) -> list[RequestHook]:
        if self._hooks is None:
            self._hooks = self.dist.request_hooks()
        return self._hooks

    async def _request(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext(scope)
        token = set_current(ctx)
        entered: list[RequestHook] = []
        started = replaced = False
        error: BaseException | None = None

        async def hooked_send(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return  # the app's body belongs to a response we replaced
            if message["type"] in ("http.response.start", "websocket.accept"):
                try:
                    for hook in entered:
                        hook.check_response(ctx)
                    for hook in reversed(entered):
                        await hook.on_response_start(ctx, message)
                except Exception as exc:
                    answer = error_response(exc) or (500, {}, "Internal Server Error")
                    if answer[0] == 503:
                        self._outages.answered(f"{scope['type']} {scope.get('path')}", exc)
                    else:
                        log.error(
                            "request %s failed before its response: %s", scope.get("path"), exc
                        )
                    replaced = started = True
                    if message["type"] == "http.response.start":
                        await _send_error(send, *answer)
                    else:
                        await send({"type": "websocket.close", "code": 1011})
                    return
                started = True
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # The response has ended; what runs now (background tasks) is not
                # part of it, and must not hold its request locks.
                for hook in reversed(entered):
                    try:
                        await hook.on_response_end(ctx)
                    except Exception:
                        log.exception(
                            "request hook %s failed at the response end", type(hook).__name__
                        )

        try:
            for hook in self._request_hooks():
                await hook.on_request(ctx)
                entered.append(hook)
            try:
                await self.app(scope, receive, hooked_send)
            except asyncio.CancelledError:
                # A request lock whose lease was lost cancels the request's task;
                # that cancellation becomes its LockLost.  Anyone else's propagates.
                lost = ctx.locks.lost_cancellation() if ctx.locks is not None else None
                if lost is None:
                    raise
                raise lost from None
        except Exception as exc:
            if _client_closed(scope, exc):
                # An ordinary end, though Starlette tells the endpoint by raising:
                # what the handler did stands, and nobody is left to hear of it.
                return
            error = exc
            answer = error_response(exc)
            if answer is None or started:
                raise
            if answer[0] == 503:
                self._outages.answered(f"{scope['type']} {scope.get('path')}", exc)
            else:
                log.warning(
                    "%s %s answered %d: %s", scope["type"], scope.get("path"), answer[0], exc
                )
            if scope["type"] == "http":
                await _send_error(send, *answer)
            else:
                await send({"type": "websocket.close", "code": 1013})
        finally:
            for hook in reversed(entered):
                try:
                    await hook.on_finish(ctx, error)
                except Exception:
                    log.exception("request hook %s failed to finish", type(hook).__name__)
            reset_current(token)


def _client_closed(scope: Scope, exc: Exception) -> bool:
    if scope["type"] != "websocket":
        return False
    from starlette.websockets import WebSocketDisconnect

    return isinstance(exc, WebSocketDisconnect)


def _speaks_lifespan(app: Any) -> bool:
    """Whether ``app`` is one of the frameworks that always answer a lifespan startup."""
    app = getattr(app, "__self__", app)  # Quart's init_app wraps its asgi_app method
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(app).__mro__}
    return bool(names & {"starlette.applications.Starlette", "quart.app.Quart"})


def _install_exception_handlers(app: Any, outage: Callable[[str, BaseException], None]) -> None:
    """Teach Starlette/FastAPI apps our status codes (``outage`` hears of each 503).

    Their ``ServerErrorMiddleware`` turns any exception into a 500 before an
    outer middleware could see it, so the mapping must live inside the app.
    """
    add = getattr(app, "add_exception_handler", None)
    if add is None:
        return
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response

    async def handler(request: Request, exc: Exception) -> Response:
        status, headers, body = error_response(exc) or (500, {}, "Internal Server Error")
        if status == 503:
            outage(f"{request.scope['type']} {request.url.path}", exc)
        return PlainTextResponse(body, status_code=status, headers=headers)

    # The same errors the middleware answers with 503 when they reach it.
    for cls in (BackendUnavailable, LockTimeout, LockLost, *_OUTAGES):
        add(cls, handler)
