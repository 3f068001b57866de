"""PostgreSQL: an asyncpg pool and a migration runner that ten processes can start at once.

Migrations are ordered SQL steps registered per capability.  At start each step
is applied in its own transaction, under ``pg_advisory_xact_lock`` keyed by the
namespace, together with the row that records it in ``<namespace>_schema_migrations``,
so processes starting together apply every step exactly once (and PgBouncer's
transaction pooling cannot strand the lock).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from asgi_dist._checks import shown_url
from asgi_dist.errors import BackendUnavailable, ConfigError

__all__ = ["PostgresBackend", "connection_lost", "describe_dsn"]

log = logging.getLogger("asgi_dist.postgres")

# asyncpg >= 0.30 lets a pool replace the reset query it runs on every release.
_POOL_RESET = "reset" in inspect.signature(asyncpg.create_pool).parameters
# True around a release whose caller already ran the reset query (release_reset).
_already_reset: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "asgi_dist_already_reset", default=False
)


def describe_dsn(dsn: str) -> str:
    """``host:port/database`` without credentials, for messages."""
    parts = urlsplit(dsn)
    host = parts.hostname or "localhost"
    return f"{host}:{parts.port or 5432}{parts.path or ''}"


def _check_dsn(dsn: str) -> None:
    """Refuse a DSN asyncpg cannot read, before anything connects."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"postgres={shown_url(dsn)} is not a PostgreSQL URL: use "
            "'postgresql://user[:password]@host[:port]/database' (or pass an asyncpg.Pool)"
        )
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ConfigError(
            f"the PostgreSQL URL {shown_url(dsn)} has a port that is not a number"
        ) from None


# The server answered, and refused: a role, password or database that is wrong,
# or a client the server does not admit. Not an outage: the DSN must change.
_REFUSALS = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidCatalogNameError,
)


def connection_lost(conn: asyncpg.Connection) -> bool:
    """Whether ``conn``, still held by its caller, has closed (server gone, link cut).

    A pool takes a connection back the moment it closes, and the caller's proxy then
    refuses every call, ``is_closed()`` included, as "released back to the pool": for
    a caller that has not released it, that refusal says the connection closed.
    """
    try:
        closed: bool = conn.is_closed()
    except asyncpg.InterfaceError:
        return True
    return closed


class PostgresBackend:
    """The PostgreSQL pool of one Dist and the migrations of its capabilities."""

    def __init__(
        self,
        target: str | asyncpg.Pool,
        *,
        namespace: str,
        node_id: str,
        connect_timeout: float = 5.0,
        min_size: int = 1,
        max_size: int = 10,
    ) -> None:
        if isinstance(target, str):
            _check_dsn(target)
        self.namespace = namespace
        self.node_id = node_id
        self.connect_timeout = connect_timeout
        self._dsn = target if isinstance(target, str) else None
        self._pool: asyncpg.Pool | None = None if isinstance(target, str) else target
        self._owns_pool = isinstance(target, str)
        self.where = describe_dsn(target) if isinstance(target, str) else "the given asyncpg pool"
        self._pool_size = (min_size, max_size)
        # Whether release_reset() saves the pool's reset round trip: only on a pool
        # we made, with our reset (a pool passed in keeps its own).
        self.skips_reset = False
        self._migrations: dict[str, list[str]] = {}

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise BackendUnavailable(f"PostgreSQL at {self.where} is not connected: start the Dist")
        return self._pool

    def table(self, name: str) -> str:
        """The namespaced table name ``<namespace>_<name>`` (the namespace is validated)."""
        return f"{self.namespace}_{name}"

    def register_migrations(self, capability: str, steps: Sequence[str]) -> None:
        """Register ordered SQL steps; ``{ns}`` in them becomes the namespace.

        Steps are append-only: version N is ``steps[N-1]``; never edit a released step.
        """
        if capability in self._migrations and self._migrations[capability] != list(steps):
            raise ConfigError(f"migrations for {capability!r} registered twice with other steps")
        self._migrations[capability] = list(steps)

    def unavailable(self, exc: BaseException) -> BackendUnavailable:
        return BackendUnavailable(
            f"PostgreSQL at {self.where} is unavailable ({type(exc).__name__}: {exc}); "
            "check that it is running and that ASGI_DIST_POSTGRES_DSN points at it"
        )

    async def start(self) -> None:
        if self._pool is None:
            self._pool = await self._create_pool()
            if await _shares_server_connections(self._pool):
                # A pooler in transaction mode (PgBouncer): a prepared statement made on
                # one server connection is missing on the next, so none are kept.
                pool, self._pool = self._pool, None
                pool.terminate()
                self._pool = await self._create_pool(statement_cache_size=0)
                log.warning(
                    "PostgreSQL at %s is behind a pooler in transaction mode (PgBouncer): "
                    "prepared statements are off, which costs a round trip per statement; "
                    "use session pooling, or PgBouncer >= 1.21 with max_prepared_statements "
                    "and pass your own asyncpg pool, to keep them",
                    self.where,
                )
            self.skips_reset = _POOL_RESET
        await self.migrate()

    async def _create_pool(self, **options: Any) -> asyncpg.Pool:
        assert self._dsn is not None
        try:
            pool: asyncpg.Pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    self._dsn,
                    min_size=self._pool_size[0],
                    max_size=self._pool_size[1],
                    timeout=self.connect_timeout,
                    command_timeout=60,
                    **({"reset": _reset} if _POOL_RESET else {}),
                    **options,
                ),
                self.connect_timeout,
            )
        except _REFUSALS as exc:
            raise ConfigError(
                f"PostgreSQL at {self.where} refused the connection ({type(exc).__name__}: "
                f"{exc}): fix the user, password or database in the DSN (Dist(postgres=...) "
                "or ASGI_DIST_POSTGRES_DSN)"
            ) from exc
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            answer = (
                f"did not answer within {self.connect_timeout:g}s"
                if isinstance(exc, TimeoutError)
                else "is unavailable"
            )
            raise BackendUnavailable(
                f"PostgreSQL at {self.where} {answer} ({type(exc).__name__}: "
                f"{exc or 'timeout'}); start it or fix the DSN (Dist(postgres=...) or "
                "ASGI_DIST_POSTGRES_DSN)"
            ) from exc
        return pool

    async def release_reset(self, conn: asyncpg.Connection) -> None:
        """Give back a connection whose last round trip ran ``conn.get_reset_query()``.

        With :attr:`skips_reset` the pool then sends no reset of its own; otherwise
        this is ``pool.release(conn)``.
        """
        token = _already_reset.set(True)
        try:
            # asyncpg releases in a task made here, which copies this context.
            await self.pool.release(conn)
        finally:
            _already_reset.reset(token)

    async def stop(self) -> None:
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except Exception:
                pool.terminate()

    async def migrate(self) -> list[tuple[str, int]]:
        """Apply pending steps; returns the (capability, version) pairs this call applied."""
        applied: list[tuple[str, int]] = []
        if not self._migrations:
            return applied
        table = self.table("schema_migrations")
        # Transaction-scoped advisory locks, one per namespace: they serialise concurrent
        # starters and, unlike a session lock, cannot be stranded on a server connection
        # by PgBouncer's transaction pooling.
        lock = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
        lock_key = f"asgi_dist:migrate:{table}"
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute(lock, lock_key)
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} ("
                    " capability text NOT NULL, version int NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now(), node_id text NOT NULL,"
                    " PRIMARY KEY (capability, version))"
                )
                rows = await conn.fetch(
                    f"SELECT capability, max(version) AS v FROM {table} GROUP BY capability"
                )
            done = {r["capability"]: r["v"] for r in rows}
            for capability, steps in self._migrations.items():
                for version, sql in enumerate(steps, start=1):
                    if version <= done.get(capability, 0):
                        continue
                    async with conn.transaction():
                        await conn.execute(lock, lock_key)
                        # Another process may have applied it since we looked.
                        if await conn.fetchval(
                            f"SELECT 1 FROM {table} WHERE capability = $1 AND version = $2",
                            capability,
                            version,
                        ):
                            continue
                        await conn.execute(sql.format(ns=self.namespace))
                        await conn.execute(
                            f"INSERT INTO {table} (capability, version, node_id)"
                            " VALUES ($1, $2, $3)",
                            capability,
                            version,
                            self.node_id,
                        )
                    applied.append((capability, version))
                    log.info("applied migration %s/%d", capability, version)
        return applied

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self.pool.fetchval(query, *args)


async def _shares_server_connections(pool: asyncpg.Pool) -> bool:
    """Whether two connections of ``pool`` run on shared server backends.

    A direct connection (or a pooler in session mode) keeps one backend for its
    life, and two connections never share one.  A pooler in transaction mode hands
    each transaction any idle backend: the backend pids seen through two
    connections, taking turns, then repeat across them or change within one (or a
    prepared statement goes missing).  Six statements, once, at start.
    """
    seen: tuple[set[int], set[int]] = (set(), set())
    try:
        async with pool.acquire() as first, pool.acquire() as second:
            for _ in range(3):
                for conn, pids in zip((first, second), seen, strict=True):
                    pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
    except (asyncpg.InvalidSQLStatementNameError, asyncpg.DuplicatePreparedStatementError):
        return True
    return len(seen[0]) > 1 or len(seen[1]) > 1 or bool(seen[0] & seen[1])


async def _reset(conn: asyncpg.Connection) -> None:
    """The pool's reset: asyncpg's default, unless the releaser already ran it.

    asyncpg has rolled back an open transaction before calling this.
    """
    if _already_reset.get():
        return
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)
