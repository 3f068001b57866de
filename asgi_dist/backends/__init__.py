"""Backends shared by every capability, and the runtime a Dist hands to them.

Capabilities receive a :class:`Runtime`: the configured backends, the
namespace, this process's node id, and a place to run background tasks that
live exactly as long as the Dist.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
from redis import exceptions as redis_errors

from asgi_dist.backends.memory import MemoryBackend
from asgi_dist.backends.postgres import PostgresBackend, connection_lost
from asgi_dist.backends.redis import RedisBackend
from asgi_dist.backends.zookeeper import ZooKeeperBackend
from asgi_dist.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from asgi_dist.backends.pubsub import PubSubHub

__all__ = [
    "BackendName",
    "MemoryBackend",
    "PostgresBackend",
    "RedisBackend",
    "Runtime",
    "ZooKeeperBackend",
    "as_backend_unavailable",
]

log = logging.getLogger("asgi_dist")

BackendName = Literal["redis", "postgres", "zookeeper", "memory"]

_OUTAGES: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.ReadOnlyError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    # A pooled connection left mid-operation by a lost server ("cannot switch to
    # state ...; another operation is in progress"): our calls never share one.
    asyncpg.InternalClientError,
    ConnectionError,
    TimeoutError,
)


def as_backend_unavailable(
    exc: BaseException, connection: asyncpg.Connection | None = None
) -> BackendUnavailable | None:
    """The :class:`BackendUnavailable` an outage exception stands for, else ``None``.

    ``connection`` is the PostgreSQL connection ``exc`` came from, if known: asyncpg
    reports a connection that closed under its holder as an ``InterfaceError``, the
    class of its programming errors too, so only the connection's state tells them apart.
    """
    if isinstance(exc, BackendUnavailable):
        return exc
    lost = (
        connection is not None
        and isinstance(exc, asyncpg.InterfaceError)
        and connection_lost(connection)
    )
    if lost or isinstance(exc, _OUTAGES):
        pg = (asyncpg.PostgresError, asyncpg.InternalClientError)
        origin = "PostgreSQL" if lost or isinstance(exc, pg) else "a backend"
        if isinstance(exc, redis_errors.RedisError):
            origin = "Redis"
        return BackendUnavailable(
            f"{origin} is unavailable ({type(exc).__name__}: {exc}); retry shortly"
        )
    return None


class Runtime:
    """The backends and lifetime one Dist shares with its capabilities."""

    def __init__(
        self,
        *,
        namespace: str,
        node_id: str,
        leader_ttl: float,
        redis: RedisBackend | None,
        postgres: PostgresBackend | None,
        zookeeper: ZooKeeperBackend | None = None,
    ) -> None:
        self.namespace = namespace
        self.node_id = node_id
        self.leader_ttl = leader_ttl
        self.redis = redis
        self.postgres = postgres
        self.zookeeper = zookeeper
        self.memory = MemoryBackend(namespace)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()
        self._pubsub: PubSubHub | None = None

    @property
    def pubsub(self) -> PubSubHub:
        """This process's one Redis pub/sub connection, opened on first use, closed at stop."""
        if self._pubsub is None:
            from asgi_dist.backends.pubsub import PubSubHub

            self._pubsub = PubSubHub(self.require_redis("pub/sub"))
        return self._pubsub

    @property
    def default_backend(self) -> BackendName:
        """The first configured of redis, postgres, memory."""
        if self.redis is not None:
            return "redis"
        if self.postgres is not None:
            return "postgres"
        return "memory"

    def require_redis(self, what: str) -> RedisBackend:
        if self.redis is None:
            raise ConfigError(
                f"{what} needs Redis: pass Dist(redis=...) or set ASGI_DIST_REDIS_URL"
            )
        return self.redis

    def require_postgres(self, what: str) -> PostgresBackend:
        if self.postgres is None:
            raise ConfigError(
                f"{what} needs PostgreSQL: pass Dist(postgres=...) or set ASGI_DIST_POSTGRES_DSN"
            )
        return self.postgres

    def spawn(
        self, name: str, factory: Callable[[], Coroutine[Any, Any, Any]]
    ) -> asyncio.Task[Any]:
        """Run a background task owned by the Dist; it is cancelled and awaited on stop."""
        task = asyncio.create_task(self._guard(name, factory), name=f"asgi_dist:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _guard(name: str, factory: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s crashed", name)

    async def cancel_tasks(self, grace: float = 0.0) -> None:
        """Cancel every background task (after ``grace`` seconds) and wait for them."""
        self.stopping.set()
        tasks = list(self._tasks)
        if grace > 0 and tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._pubsub is not None:
            hub, self._pubsub = self._pubsub, None
            await hub.close()
