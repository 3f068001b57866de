"""Request-scoped locks: ``get_locks()`` and ``@dist.locked(...)``.

Every lock a request acquires through :class:`RequestLocks` is released when
the response has ended (after the request transaction committed, since the
lock hook is entered first and left last), whether the endpoint returned,
raised or the client went away.  Creating the scope costs nothing: no round
trip happens unless a lock is acquired.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import string
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from asgi_dist._types import Message
from asgi_dist.backends import BackendName
from asgi_dist.backends.redis import MAX_NAME_LENGTH
from asgi_dist.context import RequestContext, current_request
from asgi_dist.errors import ConfigError, LockLost, LockNotOwned, NoRequestContext
from asgi_dist.locks.lease import Held, shielded

if TYPE_CHECKING:
    from asgi_dist.locks.service import LockService

__all__ = ["LockHook", "RequestLocks", "locked"]

log = logging.getLogger("asgi_dist.locks")

P = ParamSpec("P")
R = TypeVar("R")


class RequestLocks:
    """The locks of one request (``get_locks()``); all released when the response ends."""

    def __init__(self, service: LockService) -> None:
        self._service = service
        self._held: list[Held] = []

    @property
    def held(self) -> tuple[Held, ...]:
        return tuple(self._held)

    async def acquire(
        self,
        name: str,
        *,
        timeout: float | None = 0,  # noqa: ASYNC109 (the contract's name)
        ttl: float = 30.0,
        fair: bool = False,
        backend: BackendName | None = None,
    ) -> Held:
        """Acquire ``name`` until the response ends.

        ``timeout`` defaults to 0 (try once): a request should answer 409 rather
        than tie up a worker; an unhandled :class:`~asgi_dist.LockTimeout`
        becomes 409 with ``Retry-After``.
        """
        lock = self._service.lock(name, ttl=ttl, fair=fair, backend=backend)
        held = await lock.acquire(timeout=timeout)
        # Like the body of ``async with``: if the lease is lost, the request's
        # task is cancelled (again each watchdog tick until it stops) rather
        # than left to finish work the lock no longer protects.
        held.bind_body(asyncio.current_task())
        self._held.append(held)
        return held

    def lost_cancellation(self) -> LockLost | None:
        """The :class:`~asgi_dist.LockLost` behind the request's cancellation, if any.

        Call it where the request's ``CancelledError`` is caught: it stops the
        re-cancelling and returns the error to answer with when the only
        cancellation pending was ours (else None: someone else cancelled the
        request too, and the ``CancelledError`` must propagate).
        """
        lost = [h for h in self._held if h.lost.is_set()]
        ours = [h.detach_body() for h in self._held]
        if not lost or not any(ours):
            return None
        h = lost[0]
        return LockLost(
            f"{h.kind} {h.name!r} (fence {h.fence}) was lost during the request "
            f"({h.lost_reason}); the request was cancelled. Retry it",
            outage=h.lost_in_outage,
        )

    async def release_all(self) -> None:
        held, self._held = self._held, []
        if not held:
            return
        for h in held:
            # The request is over: never cancel its task after this point.
            h.detach_body()
        # In a task of its own: a cancellation of the request's task meanwhile (the
        # server's, as the client leaves) must not stop after the first lock, and
        # leave the others held, renewed by the watchdog until the process stops.
        await shielded(lambda: _release(held))


async def _release(held: list[Held]) -> None:
    for h in reversed(held):
        try:
            await h.release()
        except LockNotOwned as exc:
            log.warning("a request lock was lost before the response ended: %s", exc)
        except Exception:
            log.exception("could not release request lock %r; it expires by ttl", h.name)


class LockHook:
    """The lock capability's :class:`~asgi_dist.context.RequestHook`."""

    def __init__(self, service: LockService) -> None:
        self._service = service

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.locks = RequestLocks(self._service)

    def check_response(self, ctx: RequestContext) -> None:
        pass

    async def on_response_start(self, ctx: RequestContext, message: Message) -> None:
        return None

    async def on_response_end(self, ctx: RequestContext) -> None:
        # "Released when the response ends": before any background task runs.
        if ctx.locks is not None:
            await ctx.locks.release_all()

    async def on_finish(self, ctx: RequestContext, error: BaseException | None) -> None:
        if ctx.locks is not None:
            await ctx.locks.release_all()


def _fields(template: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"lock name template {template!r} is invalid: {exc}") from None
    fields = [f for _, f, spec, conv in parsed if f is not None]
    for field in fields:
        if not field.isidentifier():
            raise ConfigError(
                f"lock name template {template!r}: {{{field}}} must name a path parameter "
                "(an identifier like {order_id})"
            )
    return fields


# Percent-encoded in a path parameter's value: what a lock name may not hold
# (braces, control characters), and '%' itself, so that distinct values stay
# distinct names.
_ESCAPE = {c: f"%{c:02X}" for c in [*range(32), 127, ord("{"), ord("}"), ord("%")]}


def _name(template: str, values: dict[str, Any]) -> str:
    """The lock name for these path parameters: any value a client sends names a
    lock (escaped, and hashed if the name would be too long), never an error."""
    name = template.format_map({k: str(v).translate(_ESCAPE) for k, v in values.items()})
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(name.encode()).hexdigest()
        name = f"{template.partition('{')[0]}sha256:{digest}"
    return name


def locked(
    service: LockService,
    template: str,
    *,
    timeout: float | None = 0,
    ttl: float = 30.0,
    fair: bool = False,
    backend: BackendName | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorate an endpoint so it runs only while holding the lock ``template``.

    ``{field}`` in the template is filled from the endpoint's keyword arguments
    (values as the framework converted them, so ``/orders/05`` and ``/orders/5``
    name one lock when the endpoint gets ``order_id=5``), falling back to the
    request's path parameters (``scope["path_params"]``).  The lock is held
    until the response ends; a busy lock answers 409 with ``Retry-After``
    (through :class:`~asgi_dist.LockTimeout`).
    """
    fields = _fields(template)
    # Validate the options once, where they enter.
    service.lock(template.replace("{", "").replace("}", "") or "x", ttl=ttl, timeout=timeout)

    def decorate(endpoint: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(endpoint):
            raise ConfigError(f"@dist.locked needs an async endpoint; {endpoint!r} is not")

        @functools.wraps(endpoint)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                ctx: RequestContext | None = current_request("@dist.locked")
            except NoRequestContext:
                ctx = None
            params: dict[str, Any] = {}
            if ctx is not None:
                params.update(ctx.scope.get("path_params") or {})
            params.update(kwargs)
            missing = [f for f in fields if f not in params]
            if missing:
                raise ConfigError(
                    f"@dist.locked({template!r}) found no path parameter {missing[0]!r} "
                    f"on {endpoint.__qualname__}; name the route parameter like the template"
                )
            name = _name(template, {f: params[f] for f in fields})
            if ctx is not None and ctx.locks is not None:
                locks = ctx.locks
                await locks.acquire(name, timeout=timeout, ttl=ttl, fair=fair, backend=backend)
                try:
                    return await endpoint(*args, **kwargs)
                except asyncio.CancelledError as exc:
                    lost = locks.lost_cancellation()
                    if lost is None:
                        raise
                    raise lost from exc
            # Outside DistMiddleware (a test calling the function): hold it
            # for the call only.
            async with service.lock(name, ttl=ttl, timeout=timeout, fair=fair, backend=backend):
                return await endpoint(*args, **kwargs)

        return wrapper

    return decorate
