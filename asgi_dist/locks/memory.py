"""Leases in this process's memory: the embedded backend's locks and elections.

Same semantics as Redis for one process: fences never repeat, leases expire on
a monotonic clock, releases wake waiters at once.  Dists of the same namespace
in one process share the store, as they would share a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from asgi_dist.backends.memory import MemoryBackend
from asgi_dist.locks.backend import Attempt, LocalWakeups, Renewal, Watch

__all__ = ["MemoryLeases"]


@dataclass(slots=True)
class _Lease:
    token: str
    fence: int
    expires: float


class _Store:
    def __init__(self) -> None:
        self.leases: dict[tuple[str, str], _Lease] = {}
        self.fences: dict[tuple[str, str], int] = {}
        self.wakeups = LocalWakeups()


_STORES: dict[str, _Store] = {}


class MemoryLeases:
    """:class:`~asgi_dist.locks.backend.LeaseBackend` in process memory."""

    name = "memory"
    poll_interval: float | None = None

    def __init__(self, memory: MemoryBackend) -> None:
        self._clock = memory.now
        self._store = _STORES.setdefault(memory.namespace, _Store())

    def _live(self, key: tuple[str, str]) -> _Lease | None:
        lease = self._store.leases.get(key)
        if lease is not None and lease.expires <= self._clock():
            del self._store.leases[key]
            lease = None
        return lease

    async def acquire(self, kind: str, name: str, token: str, ttl: float) -> Attempt:
        key = (kind, name)
        lease = self._live(key)
        now = self._clock()
        if lease is None:
            fence = self._store.fences.get(key, 0) + 1
            self._store.fences[key] = fence
            self._store.leases[key] = _Lease(token, fence, now + ttl)
            return Attempt(True, fence, ttl)
        if lease.token == token:
            lease.expires = now + ttl
            return Attempt(True, lease.fence, ttl)
        return Attempt(False, 0, lease.expires - now)

    async def release(self, kind: str, name: str, token: str) -> bool:
        key = (kind, name)
        lease = self._live(key)
        if lease is None or lease.token != token:
            return False
        del self._store.leases[key]
        self._store.wakeups.wake(kind, name)
        return True

    async def renew(self, kind: str, name: str, token: str, ttl: float) -> bool:
        lease = self._live((kind, name))
        if lease is None or lease.token != token:
            return False
        lease.expires = self._clock() + ttl
        return True

    async def renew_many(self, leases: Sequence[Renewal]) -> list[bool | BaseException]:
        return [await self.renew(r.kind, r.name, r.token, r.ttl) for r in leases]

    async def holder(self, kind: str, name: str) -> str | None:
        lease = self._live((kind, name))
        return None if lease is None else lease.token

    async def watch(self, kind: str, name: str, token: str) -> Watch:
        return self._store.wakeups.watch(kind, name)
