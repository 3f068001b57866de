"""Leases in Redis: one Lua script per step, all keys of a lease in one hash slot.

Keys of the lease ``name`` of kind ``kind`` (namespace ``ns``)::

    {ns:kind:name}:lease   hash {token, fence}, PEXPIRE ttl (the server's clock)
    {ns:kind:name}:fence   counter, never deleted: fences never repeat
    {ns:kind:name}:wake    pub/sub channel a release publishes to

acquire, release and renew are one round trip each; renewals of every lease a
process holds are pipelined into one round trip per tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from redis import exceptions as redis_errors

from asgi_dist.backends.pubsub import PubSubHub, Subscription
from asgi_dist.backends.redis import RedisBackend
from asgi_dist.locks.backend import Attempt, Renewal, Watch

__all__ = ["RedisLeases"]

_PACKAGE = "asgi_dist.locks"


class _PubSubWatch:
    __slots__ = ("_sub", "event")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._sub: Subscription | None = None

    def _on_message(self, payload: bytes | None) -> None:
        self.event.set()

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close()


class RedisLeases:
    """:class:`~asgi_dist.locks.backend.LeaseBackend` on one Redis deployment."""

    name = "redis"
    poll_interval: float | None = None

    def __init__(self, redis: RedisBackend, hub: Callable[[], PubSubHub]) -> None:
        self._redis = redis
        # The process's pub/sub hub, looked up on use (it is created lazily
        # and replaced when the Dist restarts).
        self._hub = hub
        self._acquire = redis.script(_PACKAGE, "acquire")
        self._release = redis.script(_PACKAGE, "release")
        self._renew = redis.script(_PACKAGE, "renew")

    def keys(self, kind: str, name: str) -> tuple[str, str, str]:
        """(lease key, fence key, wake-up channel)."""
        tag = self._redis.key(kind, name)
        return f"{tag}:lease", f"{tag}:fence", f"{tag}:wake"

    async def load_scripts(self) -> None:
        for script in (self._acquire, self._release, self._renew):
            await script.load(self._redis.client)

    async def acquire(self, kind: str, name: str, token: str, ttl: float) -> Attempt:
        lease, fence, _ = self.keys(kind, name)
        got, value, remaining = await self._acquire(
            self._redis.client, [lease, fence], [token, _ms(ttl)]
        )
        return Attempt(bool(got), int(value), int(remaining) / 1000.0)

    async def release(self, kind: str, name: str, token: str) -> bool:
        lease, _, channel = self.keys(kind, name)
        return bool(await self._release(self._redis.client, [lease], [token, channel]))

    async def renew(self, kind: str, name: str, token: str, ttl: float) -> bool:
        lease, _, _ = self.keys(kind, name)
        return bool(await self._renew(self._redis.client, [lease], [token, _ms(ttl)]))

    async def renew_many(self, leases: Sequence[Renewal]) -> list[bool | BaseException]:
        if not leases:
            return []
        for retry in (True, False):
            # One pipeline: redis-py splits it per shard on Cluster.
            pipe = self._redis.client.pipeline(transaction=False)
            for r in leases:
                pipe.evalsha(self._renew.sha, 1, self.keys(r.kind, r.name)[0], r.token, _ms(r.ttl))
            results = await pipe.execute(raise_on_error=False)
            if retry and any(isinstance(x, redis_errors.NoScriptError) for x in results):
                # A restarted or failed-over node lost its script cache.
                await self._renew.load(self._redis.client)
                continue
            break
        return [x if isinstance(x, BaseException) else bool(x) for x in results]

    async def holder(self, kind: str, name: str) -> str | None:
        lease, _, _ = self.keys(kind, name)
        value = await self._redis.client.hget(lease, "token")
        return value.decode() if isinstance(value, bytes) else value

    async def watch(self, kind: str, name: str) -> Watch:
        watch = _PubSubWatch()
        watch._sub = await self._hub().subscribe(self.keys(kind, name)[2], watch._on_message)
        return watch


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
