"""What a lease store must do, whatever holds it (Redis, PostgreSQL, memory).

A *lease* is the state behind a lock or an election term: a holder token, a
fencing token (``fence``) that increases with every grant of the same name and
is never reset, and an expiry measured on the store's own clock.  Locks,
elections and semaphores are built from these five operations plus a way to be
woken when a lease is released.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from asgi_dist.errors import ConfigError

__all__ = ["Attempt", "LeaseBackend", "LocalWakeups", "Renewal", "Watch"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """The answer to one acquire attempt.

    ``remaining`` is the granted ttl when ``acquired``, else the holder's
    remaining lease in seconds (how long a waiter may sleep before it is
    worth trying again even without a wake-up); negative when unknown.
    """

    acquired: bool
    fence: int
    remaining: float
    # The attempt left an entry (a fair queue position, a writer's intent) that
    # a waiter giving up must remove.
    queued: bool = False
    # Set when the lease was handed on within this process (lock cohorting): the
    # token the store knows it by, and when it was last granted or renewed (loop
    # time), which the new holder's renewals and renew deadline count from.
    token: str | None = None
    renewed_at: float | None = None


@dataclass(frozen=True, slots=True)
class Renewal:
    """One lease to renew in a batched watchdog tick."""

    kind: str
    name: str
    token: str
    ttl: float


class Watch(Protocol):
    """A registration for wake-ups on one lease; set *before* an attempt."""

    @property
    def event(self) -> asyncio.Event: ...

    def close(self) -> None: ...


class LeaseBackend(Protocol):
    """The lease operations a lock backend implements.

    ``kind`` separates namespaces of names (``lock``, ``election``, ...).
    Every operation that changes a lease is owner-checked by ``token``.
    """

    name: str

    @property
    def poll_interval(self) -> float | None:
        """Longest sleep between attempts of a waiter when no wake-up comes.

        Set while the store's push channel misses some releases (PostgreSQL
        without a working LISTEN, Redlock); None when every release pushes a
        wake-up and a waiter may sleep until the holder's lease ends.
        """
        ...

    async def acquire(self, kind: str, name: str, token: str, ttl: float) -> Attempt: ...

    async def release(self, kind: str, name: str, token: str) -> bool: ...

    async def renew(self, kind: str, name: str, token: str, ttl: float) -> bool: ...

    async def renew_many(self, leases: Sequence[Renewal]) -> list[bool | BaseException]:
        """Renew many leases in as few round trips as possible; one result per lease."""
        ...

    async def holder(self, kind: str, name: str) -> str | None: ...

    async def watch(self, kind: str, name: str, token: str) -> Watch: ...


class _LocalWatch:
    __slots__ = ("_key", "_owner", "event")

    def __init__(self, owner: LocalWakeups, key: tuple[str, str]) -> None:
        self._owner = owner
        self._key = key
        self.event = asyncio.Event()

    def close(self) -> None:
        watchers = self._owner._watchers.get(self._key)
        if watchers is not None:
            watchers.discard(self)
            if not watchers:
                del self._owner._watchers[self._key]


class LocalWakeups:
    """In-process wake-ups for stores without push (memory, PostgreSQL)."""

    def __init__(self) -> None:
        self._watchers: dict[tuple[str, str], set[_LocalWatch]] = {}

    def watch(self, kind: str, name: str, token: str = "") -> Watch:
        watch = _LocalWatch(self, (kind, name))
        self._watchers.setdefault((kind, name), set()).add(watch)
        return watch

    def wake(self, kind: str, name: str) -> None:
        for watch in self._watchers.get((kind, name), ()):
            watch.event.set()

    def wake_all(self) -> None:
        for watchers in self._watchers.values():
            for watch in watchers:
                watch.event.set()

    @property
    def watched(self) -> int:
        return sum(len(w) for w in self._watchers.values())


def limit_mismatch(kind: str, name: str, granted_under: int, asked: int) -> ConfigError:
    """A semaphore asked for with another limit than its live permits were granted under."""
    return ConfigError(
        f"{kind} {name!r} has permits granted under limit={granted_under}, but this "
        f"process asks for limit={asked}: use one limit for a name everywhere (a new "
        "limit takes effect once the permits of the old one are released or expired)"
    )
