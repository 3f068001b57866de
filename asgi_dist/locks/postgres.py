"""Leases in PostgreSQL: one row per name, fence and expiry decided by the database.

Each operation is a single statement (no session state, no advisory lock), so
it works behind PgBouncer in transaction pooling mode.  Expiry compares with
the database's ``now()``; the fence is the row's counter, incremented by the
same statement that grants the lease and kept when it is released.

Releases in this process wake local waiters at once; waiters in other
processes notice within ``poll_interval`` (LISTEN/NOTIFY would need a session
connection, which PgBouncer transaction pooling does not give).
"""

from __future__ import annotations

from collections.abc import Sequence

from asgi_dist.backends.postgres import PostgresBackend
from asgi_dist.locks.backend import Attempt, LocalWakeups, Renewal, Watch

__all__ = ["MIGRATIONS", "PostgresLeases"]

MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS {ns}_leases (
        kind text NOT NULL,
        name text NOT NULL,
        token text,
        fence bigint NOT NULL,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (kind, name)
    )
    """,
]


class PostgresLeases:
    """:class:`~asgi_dist.locks.backend.LeaseBackend` on PostgreSQL."""

    name = "postgres"

    def __init__(self, postgres: PostgresBackend, poll_interval: float = 0.25) -> None:
        self._pg = postgres
        self.poll_interval: float | None = poll_interval
        self._wakeups = LocalWakeups()
        table = postgres.table("leases")
        # A free row (released or expired) is taken by the same statement that
        # bumps its fence; a held row is left alone and reports its remaining time.
        self._acquire_sql = f"""
            WITH taken AS (
                INSERT INTO {table} AS l (kind, name, token, fence, expires_at)
                VALUES ($1, $2, $3, 1, now() + make_interval(secs => $4))
                ON CONFLICT (kind, name) DO UPDATE
                    SET token = excluded.token,
                        fence = CASE WHEN l.token = excluded.token AND l.expires_at > now()
                                     THEN l.fence ELSE l.fence + 1 END,
                        expires_at = excluded.expires_at
                    WHERE l.token IS NULL OR l.expires_at <= now() OR l.token = excluded.token
                RETURNING fence
            )
            SELECT (SELECT fence FROM taken) AS fence,
                   (SELECT extract(epoch FROM expires_at - now())::float8
                      FROM {table} WHERE kind = $1 AND name = $2) AS remaining
        """
        self._release_sql = f"""
            UPDATE {table} SET token = NULL
            WHERE kind = $1 AND name = $2 AND token = $3 AND expires_at > now()
        """
        self._renew_sql = f"""
            UPDATE {table} SET expires_at = now() + make_interval(secs => $4)
            WHERE kind = $1 AND name = $2 AND token = $3 AND expires_at > now()
        """
        self._holder_sql = f"""
            SELECT token FROM {table} WHERE kind = $1 AND name = $2 AND expires_at > now()
        """

    async def acquire(self, kind: str, name: str, token: str, ttl: float) -> Attempt:
        row = await self._pg.pool.fetchrow(self._acquire_sql, kind, name, token, float(ttl))
        assert row is not None
        if row["fence"] is not None:
            return Attempt(True, int(row["fence"]), ttl)
        remaining = row["remaining"]
        return Attempt(False, 0, -1.0 if remaining is None else float(remaining))

    async def release(self, kind: str, name: str, token: str) -> bool:
        status: str = await self._pg.pool.execute(self._release_sql, kind, name, token)
        released = status.endswith(" 1")
        if released:
            self._wakeups.wake(kind, name)
        return released

    async def renew(self, kind: str, name: str, token: str, ttl: float) -> bool:
        status: str = await self._pg.pool.execute(self._renew_sql, kind, name, token, float(ttl))
        return status.endswith(" 1")

    async def renew_many(self, leases: Sequence[Renewal]) -> list[bool | BaseException]:
        results: list[bool | BaseException] = []
        for r in leases:
            try:
                results.append(await self.renew(r.kind, r.name, r.token, r.ttl))
            except Exception as exc:
                results.append(exc)
        return results

    async def holder(self, kind: str, name: str) -> str | None:
        value = await self._pg.pool.fetchval(self._holder_sql, kind, name)
        return None if value is None else str(value)

    async def watch(self, kind: str, name: str, token: str) -> Watch:
        return self._wakeups.watch(kind, name)
