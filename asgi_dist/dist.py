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
_ENV = (
    "ASGI_DIST_REDIS_URL",
    "ASGI_DIST_POSTGRES_DSN",
    "ASGI_DIST_ZOOKEEPER_HOSTS",
    "ASGI_DIST_NAMESPACE",
    "ASGI_DIST_SECRET_KEYS",
    "ASGI_DIST_LEADER_TTL",
)


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
        if node_id is not None and (
            not isinstance(node_id, str) or not node_id or len(node_id) > 200 or "\x00" in node_id
        ):
            raise ConfigError(
                f"node_id={node_id!r} is invalid: pass a non-empty str of at most 200 "
                "characters (or None for host:pid:random)"
            )
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
        self._serving = False  # a DistMiddleware serves requests with this Dist
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
        newest first), ``ASGI_DIST_ZOOKEEPER_HOSTS`` and ``ASGI_DIST_LEADER_TTL``;
        keyword arguments win over the environment.  Values are stripped of
        surrounding whitespace (an env file with CRLF line ends leaves a ``\\r``)."""
        env = {
            name: value.strip()
            for name, value in os.environ.items()
            if name.startswith("ASGI_DIST_") and value.strip()
        }
        kwargs: dict[str, Any] = {
            "redis": env.get("ASGI_DIST_REDIS_URL"),
            "postgres": env.get("ASGI_DIST_POSTGRES_DSN"),
            "zookeeper": env.get("ASGI_DIST_ZOOKEEPER_HOSTS"),
        }
        if "ASGI_DIST_NAMESPACE" in env:
            kwargs["namespace"] = env["ASGI_DIST_NAMESPACE"]
        if "ASGI_DIST_SECRET_KEYS" in env:
            kwargs["secret_keys"] = env["ASGI_DIST_SECRET_KEYS"]
        if "ASGI_DIST_LEADER_TTL" in env:
            try:
                kwargs["leader_ttl"] = float(env["ASGI_DIST_LEADER_TTL"])
            except ValueError:
                raise ConfigError(
                    f"ASGI_DIST_LEADER_TTL={env['ASGI_DIST_LEADER_TTL']!r} is not a number of "
                    "seconds: set it to e.g. 15"
                ) from None
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            # The message names the Dist() argument; say where its value came from
            # (names only: URLs and keys may hold secrets).
            read = [name for name in _ENV if name in env]
            if not read:
                raise
            raise ConfigError(f"{exc} (Dist.from_env() read {', '.join(read)})") from exc

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
        if self._serving and (problem := self._serving_problem()) is not None:
            raise problem
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

        # Both forms on one app run every request through this Dist twice: two
        # session loads, and a warning that blames another session middleware.
        added = getattr(app, "user_middleware", None) or ()
        if (isinstance(app, DistMiddleware) and app.dist is self) or any(
            getattr(m, "cls", None) is DistMiddleware
            and getattr(m, "kwargs", {}).get("dist") is self
            for m in added
        ):
            raise ConfigError(
                "this app already has DistMiddleware with this Dist (app.add_middleware("
                "DistMiddleware, dist=dist) or an earlier dist.wrap(app)): install it once, "
                "either app = dist.wrap(app) or app.add_middleware(DistMiddleware, dist=dist)"
            )
        return DistMiddleware(app, dist=self)

    def check_serving(self) -> None:
        """Refuse to serve requests with a configuration that would break them.

        Called by DistMiddleware; workers that only lock or schedule need no keys.
        Built at import time (``dist.wrap(app)``), the middleware raises at once.
        ``app.add_middleware(DistMiddleware, ...)`` is built by Starlette inside its
        first ASGI call, the lifespan, and an error raised there looks to uvicorn like
        an app without lifespan: it would log that at INFO and answer every request
        500. So inside a running event loop the error waits for ``start()``, which
        the middleware runs next and whose failure fails the server's startup.
        """
        self._serving = True
        problem = self._serving_problem()
        if problem is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise problem from None

    def _serving_problem(self) -> ConfigError | None:
        shared = self.runtime.redis is not None or self.runtime.postgres is not None
        if self._sessions is not None and not self._secret_keys and shared:
            return ConfigError(
                "secret_keys is required when sessions are stored in Redis or PostgreSQL "
                "(every process must sign cookies alike): pass Dist(secret_keys=[...]), set "
                "ASGI_DIST_SECRET_KEYS, or turn sessions off with Dist(sessions=False)"
            )
        return None

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
        """The capabilities' request hooks; DistMiddleware asks on its first request.

        A request served by a Dist that never started would half work (sessions load
        lazily, locks refuse, get_tx() looks like an outage, no job ever runs), so it
        is refused here with what skipped the lifespan and the fix.
        """
        if not self._started:
            raise ConfigError(
                "a request reached DistMiddleware before its Dist was started: the Dist "
                "starts in the ASGI lifespan, which did not run. A sub-app mounted with "
                "Mount(..., app=dist.wrap(sub)) gets no lifespan from Starlette: wrap the "
                "outermost app instead (dist.wrap(app)). A server run with --lifespan off "
                "skips it too, and so do test clients outside their lifespan block: use "
                "'with TestClient(app) as client:' (Starlette, FastAPI) or 'async with "
                "app.test_app() as test_app:' (Quart). Otherwise start it yourself: "
                "'async with dist:' around the serving code, or 'await dist.start()' in "
                "the outer app's lifespan"
            )
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
