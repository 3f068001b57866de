"""Leases in this process's memory: the embedded backend's locks and elections.

Same semantics as Redis for one process: fences never repeat, leases expire on
a monotonic clock, releases wake waiters at once.  Dists of the same namespace
in one process share the store, as they would share a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from asgi_dist.backends.memory import MemoryBackend
from asgi_dist.locks.backend import Attempt, LocalWakeups, Renewal, Watch, limit_mismatch

__all__ = ["MemoryLeases", "MemoryRWLeases", "MemorySemaphoreLeases"]


@dataclass(slots=True)
class _Lease:
    token: str
    fence: int
    expires: float


class _Store:
    def __init__(self) -> None:
        self.leases: dict[tuple[str, str], _Lease] = {}
        self.fences: dict[tuple[str, str], int] = {}
        self.permits: dict[tuple[str, str], dict[str, _Lease]] = {}
        self.permit_limits: dict[tuple[str, str], int] = {}
        self.writer_intents: dict[tuple[str, str], dict[str, float]] = {}
        self.wakeups = LocalWakeups()


_STORES: dict[str, _Store] = {}


class MemoryLeases:
    """:class:`~asgi_dist.locks.backend.LeaseBackend` in process memory."""

    name = "memory"
    poll_interval: float | None = None

    def __init__(self, memory: MemoryBackend) -> None:
        self._clock = memory.now
        self._store = _STORES.setdefault(memory.namespace, _Store())
        self.gate_scope = self._store

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


class MemorySemaphoreLeases(MemoryLeases):
    """Up to ``limit`` holders at once, each with its own expiring permit."""

    def __init__(self, memory: MemoryBackend, limit: int) -> None:
        super().__init__(memory)
        self.limit = limit
        self.shared = True  # several holders at once (see RedisLeases)
        self._permits = self._store.permits
        # The limit each name's live permits were granted under.
        self._limits = self._store.permit_limits

    def _live_permits(self, key: tuple[str, str]) -> dict[str, _Lease]:
        now = self._clock()
        permits = self._permits.setdefault(key, {})
        for token in [t for t, p in permits.items() if p.expires <= now]:
            del permits[token]
        return permits

    async def acquire(self, kind: str, name: str, token: str, ttl: float) -> Attempt:
        key = (kind, name)
        permits = self._live_permits(key)
        now = self._clock()
        granted_under = self._limits.get(key)
        if permits and granted_under is not None and granted_under != self.limit:
            raise limit_mismatch(kind, name, granted_under, self.limit)
        if len(permits) < self.limit:
            fence = self._store.fences.get(key, 0) + 1
            self._store.fences[key] = fence
            permits[token] = _Lease(token, fence, now + ttl)
            self._limits[key] = self.limit
            return Attempt(True, fence, ttl)
        return Attempt(False, 0, min(p.expires for p in permits.values()) - now)

    async def release(self, kind: str, name: str, token: str) -> bool:
        permit = self._live_permits((kind, name)).pop(token, None)
        if permit is None:
            return False
        self._store.wakeups.wake(kind, name)
        return True

    async def renew(self, kind: str, name: str, token: str, ttl: float) -> bool:
        permit = self._live_permits((kind, name)).get(token)
        if permit is None:
            return False
        permit.expires = self._clock() + ttl
        return True

    async def holder(self, kind: str, name: str) -> str | None:
        return None


class MemoryRWLeases(MemoryLeases):
    """Writer-preferring read/write lock: ``mode`` is ``"read"`` or ``"write"``."""

    def __init__(self, memory: MemoryBackend, mode: str) -> None:
        super().__init__(memory)
        self.mode = mode
        self.shared = mode == "read"
        self._readers = MemorySemaphoreLeases(memory, limit=1 << 30)

    def _waiting_writers(self, key: tuple[str, str]) -> dict[str, float]:
        now = self._clock()
        waiting = self._store.writer_intents.setdefault(key, {})
        for token in [t for t, until in waiting.items() if until <= now]:
            del waiting[token]
        return waiting

    async def acquire(self, kind: str, name: str, token: str, ttl: float) -> Attempt:
        key = (kind, name)
        writer = self._live(key)
        readers = self._readers._live_permits(key)
        now = self._clock()
        if self.mode == "read":
            if writer is not None:
                return Attempt(False, 0, writer.expires - now)
            if self._waiting_writers(key):
                return Attempt(False, 0, 0.05)
            return await self._readers.acquire(kind, name, token, ttl)
        if writer is None and not readers:
            self._waiting_writers(key).pop(token, None)
            return await super().acquire(kind, name, token, ttl)
        self._waiting_writers(key)[token] = now + 10.0
        wait = writer.expires - now if writer else max(p.expires for p in readers.values()) - now
        return Attempt(False, 0, wait, queued=True)

    async def release(self, kind: str, name: str, token: str) -> bool:
        if self.mode == "read":
            return await self._readers.release(kind, name, token)
        if self._waiting_writers((kind, name)).pop(token, None) is not None:
            self._store.wakeups.wake(kind, name)
        return await super().release(kind, name, token)

    async def renew(self, kind: str, name: str, token: str, ttl: float) -> bool:
        if self.mode == "read":
            return await self._readers.renew(kind, name, token, ttl)
        return await super().renew(kind, name, token, ttl)
