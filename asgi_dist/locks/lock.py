"""``dist.lock(name)``: a mutual-exclusion lock over any lease backend."""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Any

from asgi_dist._checks import lease_ttl
from asgi_dist.errors import ConfigError
from asgi_dist.locks.backend import LeaseBackend
from asgi_dist.locks.lease import Held, Watchdog, acquire_lease, new_token

__all__ = ["KIND", "Lock", "validate_timing"]

KIND = "lock"

_DEFAULT: Any = object()


def validate_timing(ttl: float, timeout: float | None) -> None:
    lease_ttl(ttl)
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 <= timeout < math.inf
    ):
        raise ConfigError(
            f"timeout={timeout!r} is invalid: use None (wait forever), 0 (try once) or a "
            "finite number of seconds"
        )


class Lock:
    """A named lock (or semaphore permit, or rwlock side); every ``acquire()``
    returns its own :class:`Held` handle.

    The object holds no acquisition state shared between tasks: ``async with``
    keeps each task's handle apart, so one ``Lock`` may be used by many tasks.
    """

    def __init__(
        self,
        *,
        backend: LeaseBackend,
        name: str,
        node_id: str,
        watchdog: Watchdog,
        ttl: float,
        timeout: float | None,
        reentrant: bool = False,
        owners: dict[tuple[int, str], Held] | None = None,
        kind: str = KIND,
    ) -> None:
        self.backend = backend
        self.kind = kind
        self.reentrant = reentrant
        # The service-wide map of reentrant holds: (backend, name) -> handle.
        self._owners = owners if owners is not None else {}
        self.name = name
        self.node_id = node_id
        self.ttl = float(ttl)
        self.timeout = timeout
        self._watchdog = watchdog
        self._entered: dict[asyncio.Task[Any] | None, list[Held]] = {}

    def __repr__(self) -> str:
        return f"<Lock {self.kind}:{self.name!r} backend={self.backend.name} ttl={self.ttl:g}>"

    async def acquire(self, timeout: float | None = _DEFAULT) -> Held:  # noqa: ASYNC109
        """Wait up to ``timeout`` (default: the lock's); raises LockTimeout."""
        if timeout is _DEFAULT:
            timeout = self.timeout
        validate_timing(self.ttl, timeout)
        self._watchdog.check_running(self.kind, self.name)
        key = (id(self.backend), self.name)
        if self.reentrant:
            current = self._owners.get(key)
            if (
                current is not None
                and current.owner_task is asyncio.current_task()
                and not current.released
                and not current.lost.is_set()
            ):
                # Reentrancy is keyed by the owning task, decided locally:
                # no round trip, and no other task of this process gets in.
                return current.reenter()
        token = new_token(self.node_id)
        attempt = await acquire_lease(
            self.backend, self.kind, self.name, token=token, ttl=self.ttl, timeout=timeout
        )
        held = Held(
            backend=self.backend,
            kind=self.kind,
            name=self.name,
            # A lease handed on within the process keeps the token the store has.
            token=attempt.token or token,
            fence=attempt.fence,
            ttl=self.ttl,
            renew_every=self.ttl / 3,
            # Declare the lease lost before the server can expire it.
            renew_deadline=self.ttl * 0.75,
            watchdog=self._watchdog,
            renewed_at=attempt.renewed_at,
        )
        if self.reentrant:
            self._owners[key] = held
            held.on_end(self._forget)
        return held

    def _forget(self, held: Held) -> None:
        key = (id(self.backend), self.name)
        if self._owners.get(key) is held:
            del self._owners[key]

    async def locked(self) -> bool:
        """Whether anyone holds the lock right now (a snapshot)."""
        return await self.backend.holder(self.kind, self.name) is not None

    async def __aenter__(self) -> Held:
        held = await self.acquire()
        task = asyncio.current_task()
        held.bind_body(task)
        self._entered.setdefault(task, []).append(held)
        return held

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = asyncio.current_task()
        stack = self._entered[task]
        held = stack.pop()
        if not stack:
            del self._entered[task]
        await held.exit_body(exc)
