"""Dist: the one object an app builds.

It validates configuration where it enters, owns the backends, starts and
stops the capabilities in order, and hands out their public factories
(``dist.lock(...)``, ``dist.cron(...)``, ``dist.sessions`` ...).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import asyncpg

from asgi_dist._checks import seconds
from asgi_dist._types import ASGIApp
from asgi_dist.backends import PostgresBackend, RedisBackend, Runtime, ZooKeeperBackend
from asgi_dist.backends.redis import RedisClient
from asgi_dist.context import RequestHook
from asgi_dist.errors import ConfigError
from asgi_dist.locks import LockService
from asgi_dist.scheduling import Scheduler, SchedulerConfig
from asgi_dist.sessions import SessionConfig, SessionManager
from asgi_dist.transactions import TransactionConfig, TransactionService

if TYPE_CHECKING:
    from asgi_dist.middleware import DistMiddleware

__all__ = ["Dist"]

log = logging.getLogger("asgi_dist")

_NAMESPACE = re.compile(r"[a-z][a-z0-9_]{0,39}")
_MEMORY = (None, "", "memory://", "memory")
_STOP_TIMEOUT = 15.0


class Dist:
    """Distributed locks, transactions, sessions and scheduling for one app.

    Args:
        redis: a Redis URL (``redis://``, ``rediss://``, ``redis+sentinel://``,
            ``redis+cluster://``) or a ``redis.asyncio`` client; ``None`` or
            ``"memory://"`` uses the embedded single-process backend.
        postgres: a PostgreSQL DSN or an ``asyncpg.Pool``; optional.
        zookeeper: ZooKeeper hosts (``host:port[,host:port]``) for
            ``dist.lock(..., backend="zookeeper")``; optional.
        namespace: prefix of every key and table; isolates apps sharing servers.
        secret_keys: session signing keys, newest first; all are accepted.
        node_id: this process in every record it writes; default ``host:pid:random``.
        leader_ttl: lease (seconds) of every leader election, the scheduler's included.
        connect_timeout: bound (seconds) on reaching each server at start.
        sessions: session options, or ``False`` to turn sessions off.
        scheduler: scheduler options.
        transactions: outbox, relay and consumer options.
    """

    def __init__(
        self,
        redis: str | RedisClient | None = None,
        postgres: str | asyncpg.Pool | None = None,
        *,
        zookeeper: str | None = None,
        namespace: str = "asgi_dist",
        secret_keys: Sequence[str] | str | None = None,
        node_id: str | None = None,
        leader_ttl: float = 15.0,
        connect_timeout: float = 5.0,
        sessions: SessionConfig | Literal[False] | None = None,
        scheduler: SchedulerConfig | None = None,
        transactions: TransactionConfig | None = None,
    ) -> None:
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigError(
                f"namespace={namespace!r} is invalid: use 1-40 characters of lowercase letters, "
                "digits and '_', starting with a letter (it prefixes keys and table names)"
            )
        leader_ttl = seconds(leader_ttl, "leader_ttl", low=1, high=3600)
        connect_timeout = seconds(connect_timeout, "connect_timeout", open_low=True, high=3600)
        if (
            sessions is not None
            and sessions is not False
            and not isinstance(sessions, SessionConfig)
        ):
            raise ConfigError(
                f"sessions={sessions!r} is invalid: pass SessionConfig(...), None for the "
                "defaults, or False to turn sessions off"
            )
        for label, value, cls in (
            ("scheduler", scheduler, SchedulerConfig),
            ("transactions", transactions, TransactionConfig),
        ):
            if value is not None and not isinstance(value, cls):
                raise ConfigError(
                    f"{label}={value!r} is invalid: pass {cls.__name__}(...) or None for the "
                    "defaults"
                )
        keys = _secret_keys(secret_keys)
        self.namespace = namespace
        self._secret_keys = keys
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        redis_backend = None
        if redis not in _MEMORY:
            assert redis is not None
            redis_backend = RedisBackend(
                redis, namespace=namespace, connect_timeout=connect_timeout
            )
        postgres_backend = None
        if postgres not in _MEMORY:
            if not isinstance(postgres, str | asyncpg.Pool):
                raise ConfigError(
                    f"postgres={postgres!r} is invalid: pass a DSN like "
                    "'postgresql://user@host/db' or an asyncpg.Pool"
                )
            postgres_backend = PostgresBackend(
                postgres,
                namespace=namespace,
                node_id=self.node_id,
                connect_timeout=connect_timeout,
            )
        self.runtime = Runtime(
            namespace=namespace,
            node_id=self.node_id,
            leader_ttl=float(leader_ttl),
            redis=redis_backend,
            postgres=postgres_backend,
            zookeeper=(
                ZooKeeperBackend(zookeeper, namespace=namespace, connect_timeout=connect_timeout)
                if zookeeper
                else None
            ),
        )
        self.locks = LockService(self.runtime)
        self._sessions: SessionManager | None = None
        if sessions is not False:
            self._sessions = SessionManager(self.runtime, sessions or SessionConfig(), keys)
        self.scheduler = Scheduler(self.runtime, scheduler or SchedulerConfig(), self.locks)
        self.transactions = TransactionService(
            self.runtime, transactions or TransactionConfig(), self.scheduler
        )
        self._started = False
        self._starts = 0
        # The public factories are the capabilities' own methods, so their
        # signatures and docs are the ones users see.
        self.lock = self.locks.lock
        self.rwlock = self.locks.rwlock
        self.semaphore = self.locks.semaphore
        self.election = self.locks.election
        self.locked = self.locks.locked
        self.cron = self.scheduler.cron
        self.every = self.scheduler.every
        self.consumer = self.transactions.consumer
        self.transactional_message = self.transactions.transactional_message

    @classmethod
    def from_env(cls, **overrides: Any) -> Dist:
        """Build from ``ASGI_DIST_REDIS_URL``, ``ASGI_DIST_POSTGRES_DSN``,
        ``ASGI_DIST_NAMESPACE`` and ``ASGI_DIST_SECRET_KEYS`` (comma-separated,
        newest first); keyword arguments win over the environment."""
        env = os.environ
        kwargs: dict[str, Any] = {
            "redis": env.get("ASGI_DIST_REDIS_URL") or None,
            "postgres": env.get("ASGI_DIST_POSTGRES_DSN") or None,
            "zookeeper": env.get("ASGI_DIST_ZOOKEEPER_HOSTS") or None,
        }
        if env.get("ASGI_DIST_NAMESPACE"):
            kwargs["namespace"] = env["ASGI_DIST_NAMESPACE"]
        if env.get("ASGI_DIST_SECRET_KEYS"):
            kwargs["secret_keys"] = env["ASGI_DIST_SECRET_KEYS"]
        if env.get("ASGI_DIST_LEADER_TTL"):
            try:
                kwargs["leader_ttl"] = float(env["ASGI_DIST_LEADER_TTL"])
            except ValueError:
                raise ConfigError(
                    f"ASGI_DIST_LEADER_TTL={env['ASGI_DIST_LEADER_TTL']!r} is not a number of "
                    "seconds: set it to e.g. 15"
                ) from None
        kwargs.update(overrides)
        return cls(**kwargs)

    # lifecycle -----------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._started

    @property
    def start_count(self) -> int:
        """How many times this Dist was started (tests prove lifespan starts it once)."""
        return self._starts

    def _capabilities(self) -> list[Any]:
        caps: list[Any] = [self.locks]
        if self._sessions is not None:
            caps.append(self._sessions)
        caps += [self.scheduler, self.transactions]
        return caps

    async def start(self) -> None:
        """Connect the backends (bounded by ``connect_timeout``), migrate, start capabilities."""
        if self._started:
            return
        runtime = self.runtime
        # A Dist may be started again after a stop, maybe on another event loop.
        runtime.stopping = asyncio.Event()
        try:
            for cap in self._capabilities():
                cap.register()
            if runtime.redis is None and runtime.postgres is None:
                await runtime.memory.start()
            if runtime.redis is not None:
                await runtime.redis.start()
            if runtime.postgres is not None:
                await runtime.postgres.start()
            if runtime.zookeeper is not None:
                await runtime.zookeeper.start()
            for cap in self._capabilities():
                await cap.start()
        except BaseException:
            await self._shutdown()
            raise
        self._started = True
        self._starts += 1
        log.info("asgi_dist started: namespace=%s node=%s", self.namespace, self.node_id)

    async def stop(self) -> None:
        """Stop capabilities in reverse order, then close the backends."""
        if not self._started:
            return
        self._started = False
        await self._shutdown()
        log.info("asgi_dist stopped: node=%s", self.node_id)

    async def _shutdown(self) -> None:
        for cap in reversed(self._capabilities()):
            try:
                # A capability that cannot stop (a server gone mid-shutdown) must not
                # hold the process hostage: bound it and move on.
                await asyncio.wait_for(cap.stop(), _STOP_TIMEOUT)
            except Exception:
                log.exception("error stopping %s", type(cap).__name__)
        try:
            await asyncio.wait_for(self.runtime.cancel_tasks(), _STOP_TIMEOUT)
        except TimeoutError:
            log.error("background tasks did not stop within %ss", _STOP_TIMEOUT)
        if self.runtime.zookeeper is not None:
            await self.runtime.zookeeper.stop()
        if self.runtime.postgres is not None:
            await self.runtime.postgres.stop()
        if self.runtime.redis is not None:
            await self.runtime.redis.stop()

    async def __aenter__(self) -> Dist:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def wrap(self, app: ASGIApp) -> DistMiddleware:
        """``DistMiddleware(app, dist=self)``."""
        from asgi_dist.middleware import DistMiddleware

        return DistMiddleware(app, dist=self)

    def check_serving(self) -> None:
        """Refuse to serve requests with a configuration that would break them.

        Called by DistMiddleware; workers that only lock or schedule need no keys.
        """
        shared = self.runtime.redis is not None or self.runtime.postgres is not None
        if self._sessions is not None and not self._secret_keys and shared:
            raise ConfigError(
                "secret_keys is required when sessions are stored in Redis or PostgreSQL "
                "(every process must sign cookies alike): pass Dist(secret_keys=[...]), set "
                "ASGI_DIST_SECRET_KEYS, or turn sessions off with Dist(sessions=False)"
            )

    def add_migrations(self, name: str, steps: Sequence[str]) -> None:
        """Register the app's own ordered SQL steps, applied at start like asgi_dist's.

        ``{ns}`` in a step becomes the namespace (name your tables ``{ns}_orders``).
        Steps are append-only: add new ones at the end, never edit a released one.
        Ten processes starting at once apply each step exactly once.
        """
        postgres = self.runtime.require_postgres("add_migrations()")
        if not name.isidentifier():
            raise ConfigError(f"migration name {name!r} must be an identifier, like 'shop'")
        postgres.register_migrations(f"app:{name}", steps)

    def request_hooks(self) -> list[RequestHook]:
        hooks: list[RequestHook | None] = [cap.request_hook() for cap in self._capabilities()]
        return [h for h in hooks if h is not None]

    @property
    def sessions(self) -> SessionManager:
        """Session administration: ``invalidate_user(uid)``, ``list_user(uid)``."""
        if self._sessions is None:
            raise ConfigError("sessions are disabled (Dist(sessions=False))")
        return self._sessions


def _secret_keys(value: Sequence[str] | str | None) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, str | list | tuple):
        raise ConfigError(
            f"secret_keys={value!r} is invalid: pass a list of strings, newest first, or one "
            "comma-separated string"
        )
    keys = [k.strip() for k in value.split(",")] if isinstance(value, str) else list(value)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError(
            "secret_keys must be a non-empty list of non-empty strings, newest first "
            "(ASGI_DIST_SECRET_KEYS is comma-separated)"
        )
    for k in keys:
        if len(k) < 16:
            raise ConfigError(
                f"a secret key of {len(k)} characters is too short to sign sessions: use at "
                "least 16 random characters, e.g. from secrets.token_urlsafe(32)"
            )
    return keys
