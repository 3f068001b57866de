"""LockService: the lock capability of one Dist.

It owns one lease backend per store (built on first use), the watchdog that
renews every lease this process holds, and the public factories
``dist.lock``, ``dist.election``, ``dist.locked`` ...
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import ParamSpec, TypeVar

from asgi_dist.backends import BackendName, Runtime
from asgi_dist.backends.redis import validate_name
from asgi_dist.context import RequestHook
from asgi_dist.errors import ConfigError
from asgi_dist.locks.backend import LeaseBackend
from asgi_dist.locks.election import Election, Term, election_timings
from asgi_dist.locks.lease import Held, Watchdog
from asgi_dist.locks.lock import Lock, validate_timing
from asgi_dist.locks.memory import MemoryLeases, MemoryRWLeases, MemorySemaphoreLeases
from asgi_dist.locks.postgres import (
    MIGRATIONS,
    PostgresLeases,
    PostgresPermitLeases,
    PostgresWakeups,
)
from asgi_dist.locks.redis import FAIR, PLAIN, READ, SEMAPHORE, WRITE, RedisLeases
from asgi_dist.locks.redlock import RedlockLeases
from asgi_dist.locks.request import LockHook, locked
from asgi_dist.locks.rwlock import KIND as RW_KIND
from asgi_dist.locks.rwlock import RWLock

__all__ = ["LockService"]

log = logging.getLogger("asgi_dist.locks")

P = ParamSpec("P")
R = TypeVar("R")

_BACKENDS = ("redis", "postgres", "zookeeper", "memory")


class LockService:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.watchdog = Watchdog(runtime.spawn)
        self._backends: dict[str, LeaseBackend] = {}
        self._reentrant: dict[tuple[int, str], Held] = {}
        self._redlocks: list[RedlockLeases] = []
        self._terms: dict[tuple[int, str], set[Term]] = {}
        # One LISTEN connection for every PostgreSQL lease backend of this Dist.
        self._pg_wakeups: PostgresWakeups | None = None

    # lifecycle -------------------------------------------------------------------

    def register(self) -> None:
        if self.runtime.postgres is not None:
            self.runtime.postgres.register_migrations("locks", MIGRATIONS)

    async def start(self) -> None:
        # What outlives a stop gets fresh asyncio primitives: the Dist may start
        # again on another event loop (two TestClient blocks in a row).
        self.watchdog.on_start()
        for backend in self._backends.values():
            on_start = getattr(backend, "on_start", None)
            if on_start is not None:
                on_start()
        if self._pg_wakeups is not None:
            self._pg_wakeups.on_start()
        if self.runtime.redis is not None:
            # Pipelined EVALSHA (the watchdog) has no NOSCRIPT fallback per call.
            plain = self.backend("redis")
            assert isinstance(plain, RedisLeases)
            await plain.load_scripts()

    async def stop(self) -> None:
        """Resign every lease still held: elections hand over at once, not after a ttl."""
        self.watchdog.running = False
        held = list(self.watchdog.held)
        for h in held:
            h.mark_lost("the Dist is stopping")

        async def give_back() -> None:
            await asyncio.gather(
                *(h.backend.release(h.kind, h.name, h.token) for h in held),
                return_exceptions=True,
            )

        if held:
            try:
                await asyncio.wait_for(give_back(), 5.0)
            except TimeoutError:
                log.warning("could not release %d leases at stop; they expire by ttl", len(held))
        if self._pg_wakeups is not None:
            # Kept: the PostgreSQL lease backends hold it, and listen again after
            # the next start.
            await self._pg_wakeups.close()
        redlocks, self._redlocks = self._redlocks, []
        for leases in redlocks:
            await leases.close()

    def request_hook(self) -> RequestHook | None:
        return LockHook(self)

    # backends --------------------------------------------------------------------

    def backend(self, name: str | None = None, *, fair: bool = False) -> LeaseBackend:
        """The lease backend called ``name`` (default: the first configured)."""
        chosen: str = name or self.runtime.default_backend
        if fair and chosen in ("memory", "zookeeper"):
            # Fair already: in memory every waiter is local and the per-name FIFO
            # turnstile serves them in arrival order; ZooKeeper serves contenders
            # in the order of their sequential znodes.
            fair = False
        if fair and chosen != "redis":
            raise ConfigError(
                f"fair=True needs the Redis, ZooKeeper or memory backend (got "
                f"backend={chosen!r}): pass another backend= or drop fair=True"
            )
        cache_key = f"{chosen}:fair" if fair else chosen
        found = self._backends.get(cache_key)
        if found is not None:
            return found
        runtime = self.runtime
        if chosen == "redis":
            redis = runtime.require_redis("backend='redis'")
            found = RedisLeases(redis, lambda: runtime.pubsub, FAIR if fair else PLAIN)
        elif chosen == "postgres":
            found = PostgresLeases(
                runtime.require_postgres("backend='postgres'"), wakeups=self._postgres_wakeups()
            )
        elif chosen == "memory":
            found = MemoryLeases(runtime.memory)
        elif chosen == "zookeeper":
            from asgi_dist.locks.zookeeper import ZooKeeperLeases

            found = ZooKeeperLeases(runtime, self.watchdog)
        else:
            raise ConfigError(f"backend={name!r} is unknown: use one of {', '.join(_BACKENDS)}")
        self._backends[cache_key] = found
        return found

    def _postgres_wakeups(self) -> PostgresWakeups:
        if self._pg_wakeups is None:
            postgres = self.runtime.require_postgres("backend='postgres'")
            self._pg_wakeups = PostgresWakeups(postgres)
        return self._pg_wakeups

    # factories -------------------------------------------------------------------

    def lock(
        self,
        name: str,
        *,
        ttl: float = 30.0,
        timeout: float | None = None,
        fair: bool = False,
        reentrant: bool = False,
        backend: BackendName | None = None,
    ) -> Lock:
        """A distributed lock; ``async with dist.lock(name) as held:`` or ``await .acquire()``.

        Args:
            ttl: lease in seconds; renewed by the watchdog while held.
            timeout: ``None`` waits forever, ``0`` tries once, else seconds.
            fair: serve waiters in arrival order, handing the lease directly to the
                next waiter (Redis); use the same fairness for every user of a name.
            reentrant: let the task holding it acquire it again (nested, counted).
            backend: ``"redis"``, ``"postgres"``, ``"zookeeper"`` or ``"memory"``; default
                the first configured.
        """
        validate_name(name, "lock name")
        validate_timing(ttl, timeout)
        return Lock(
            backend=self.backend(backend, fair=fair),
            name=name,
            node_id=self.runtime.node_id,
            watchdog=self.watchdog,
            ttl=ttl,
            timeout=timeout,
            reentrant=reentrant,
            owners=self._reentrant,
        )

    def election(
        self,
        name: str,
        *,
        ttl: float | None = None,
        renew_deadline: float | None = None,
        retry: float | None = None,
        backend: BackendName | None = None,
    ) -> Election:
        """Leader election over ``name``; timings default from ``Dist(leader_ttl=...)``."""
        validate_name(name, "election name")
        ttl, renew_deadline, retry = election_timings(
            self.runtime.leader_ttl, ttl, renew_deadline, retry
        )
        return Election(
            backend=self.backend(backend),
            name=name,
            node_id=self.runtime.node_id,
            watchdog=self.watchdog,
            ttl=ttl,
            renew_deadline=renew_deadline,
            retry=retry,
            terms=self._terms,
        )

    def rwlock(
        self,
        name: str,
        *,
        ttl: float = 30.0,
        timeout: float | None = None,
        backend: BackendName | None = None,
    ) -> RWLock:
        """A read/write lock: ``.read()`` and ``.write()`` return lock objects."""
        validate_name(name, "rwlock name")
        validate_timing(ttl, timeout)
        chosen = self._shared_backend(backend, "rwlock")

        def side(mode: str) -> Callable[[], Lock]:
            def make() -> Lock:
                return Lock(
                    backend=self._variant(chosen, mode),
                    name=name,
                    node_id=self.runtime.node_id,
                    watchdog=self.watchdog,
                    ttl=ttl,
                    timeout=timeout,
                    kind=RW_KIND,
                )

            return make

        return RWLock(name, side("read"), side("write"))

    def semaphore(
        self,
        name: str,
        limit: int,
        *,
        ttl: float = 30.0,
        timeout: float | None = None,
        backend: BackendName | None = None,
    ) -> Lock:
        """At most ``limit`` holders at once; each permit expires unless renewed."""
        validate_name(name, "semaphore name")
        validate_timing(ttl, timeout)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1_000_000:
            raise ConfigError(f"limit={limit!r} is invalid: use an integer from 1 to 1000000")
        chosen = self._shared_backend(backend, "semaphore")
        return Lock(
            backend=self._variant(chosen, "semaphore", limit),
            name=name,
            node_id=self.runtime.node_id,
            watchdog=self.watchdog,
            ttl=ttl,
            timeout=timeout,
            kind="semaphore",
        )

    def redlock(self, urls: Sequence[str], *, server_timeout: float = 0.1) -> Redlock:
        """Locks granted by a majority of independent Redis servers (see ``redlock.py``).

        ``quorum = dist.locks.redlock(["redis://a", "redis://b", "redis://c"])``, then
        ``async with quorum.lock("name", ttl=10) as held:``.  Connections close at stop.
        """
        leases = RedlockLeases(
            urls, namespace=self.runtime.namespace, server_timeout=server_timeout
        )
        self._redlocks.append(leases)
        return Redlock(self, leases)

    def _shared_backend(self, backend: str | None, what: str) -> str:
        chosen = backend or self.runtime.default_backend
        if chosen not in ("redis", "postgres", "memory"):
            raise ConfigError(
                f"dist.{what}() supports backend='redis', 'postgres' or 'memory', not {chosen!r}"
            )
        return chosen

    def _variant(self, chosen: str, mode: str, limit: int = 0) -> LeaseBackend:
        cache_key = f"{chosen}:{mode}:{limit}"
        found = self._backends.get(cache_key)
        if found is not None:
            return found
        runtime = self.runtime
        if chosen == "redis":
            redis = runtime.require_redis(f"backend='redis' ({mode})")
            variant = {"semaphore": SEMAPHORE, "read": READ, "write": WRITE}[mode]
            extra: tuple[int, ...] = (limit,) if mode == "semaphore" else ()
            found = RedisLeases(redis, lambda: runtime.pubsub, variant, extra=extra)
        elif chosen == "postgres":
            postgres = runtime.require_postgres(f"backend='postgres' ({mode})")
            found = PostgresPermitLeases(postgres, mode, limit, self._postgres_wakeups())
        elif mode == "semaphore":
            found = MemorySemaphoreLeases(runtime.memory, limit)
        else:
            found = MemoryRWLeases(runtime.memory, mode)
        self._backends[cache_key] = found
        return found

    def locked(
        self,
        template: str,
        *,
        timeout: float | None = 0,
        ttl: float = 30.0,
        fair: bool = False,
        backend: BackendName | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
        """``@dist.locked("order:{order_id}", timeout=0)`` on an endpoint.

        Path parameters fill the name; the lock is held until the response
        ends; a busy lock answers 409 with ``Retry-After``.
        """
        return locked(self, template, timeout=timeout, ttl=ttl, fair=fair, backend=backend)


class Redlock:
    """Factory of quorum locks over the servers given to ``dist.locks.redlock(...)``."""

    def __init__(self, service: LockService, leases: RedlockLeases) -> None:
        self._service = service
        self.leases = leases

    def lock(self, name: str, *, ttl: float = 30.0, timeout: float | None = None) -> Lock:
        validate_name(name, "lock name")
        validate_timing(ttl, timeout)
        return Lock(
            backend=self.leases,
            name=name,
            node_id=self._service.runtime.node_id,
            watchdog=self._service.watchdog,
            ttl=ttl,
            timeout=timeout,
        )
