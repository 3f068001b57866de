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

__all__ = ["MIGRATIONS", "PostgresLeases", "PostgresPermitLeases"]

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
    # Shared leases: semaphore permits, rwlock readers, writers and writer intents.
    """
    CREATE TABLE IF NOT EXISTS {ns}_permits (
        kind text NOT NULL,
        name text NOT NULL,
        token text NOT NULL,
        role text NOT NULL,
        fence bigint NOT NULL,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (kind, name, token)
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


class PostgresPermitLeases(PostgresLeases):
    """Semaphore permits (``mode="semaphore"``) and rwlock sides (``"read"``/``"write"``).

    An acquire is one short transaction: it locks the name's row in the lease
    table (the serialisation point and fence counter), drops expired permits,
    decides on the live ones, and inserts its permit.  Transaction-scoped, so
    PgBouncer's transaction pooling is fine.
    """

    def __init__(self, postgres: PostgresBackend, mode: str, limit: int = 0) -> None:
        super().__init__(postgres)
        self.mode = mode
        self.limit = limit
        self._leases = postgres.table("leases")
        self._permits = postgres.table("permits")

    async def acquire(self, kind: str, name: str, token: str, ttl: float) -> Attempt:
        leases, permits = self._leases, self._permits
        async with self._pg.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO {leases} (kind, name, token, fence, expires_at)"
                " VALUES ($1, $2, NULL, 0, now()) ON CONFLICT (kind, name) DO NOTHING",
                kind,
                name,
            )
            # Serialises acquirers of this name until commit (each later
            # statement of READ COMMITTED sees what the previous holder committed).
            await conn.execute(
                f"SELECT 1 FROM {leases} WHERE kind = $1 AND name = $2 FOR UPDATE", kind, name
            )
            await conn.execute(
                f"DELETE FROM {permits} WHERE kind = $1 AND name = $2 AND expires_at <= now()",
                kind,
                name,
            )
            rows = await conn.fetch(
                f"SELECT token, role, extract(epoch FROM expires_at - now())::float8 AS left"
                f" FROM {permits} WHERE kind = $1 AND name = $2",
                kind,
                name,
            )
            holders = [r for r in rows if r["role"] != "intent" and r["token"] != token]
            intents = [r for r in rows if r["role"] == "intent" and r["token"] != token]
            soonest = min((r["left"] for r in holders), default=0.05)
            if self.mode == "semaphore":
                free = len(holders) < self.limit
            elif self.mode == "read":
                free = not any(r["role"] == "write" for r in holders) and not intents
            else:
                free = not holders
            if not free:
                if self.mode == "write":
                    # A waiting writer blocks new readers (writer preference).
                    await conn.execute(
                        f"INSERT INTO {permits} (kind, name, token, role, fence, expires_at)"
                        " VALUES ($1, $2, $3, 'intent', 0, now() + make_interval(secs => 10))"
                        " ON CONFLICT (kind, name, token) DO UPDATE"
                        " SET expires_at = excluded.expires_at",
                        kind,
                        name,
                        token,
                    )
                return Attempt(False, 0, soonest, queued=self.mode == "write")
            fence = await conn.fetchval(
                f"UPDATE {leases} SET fence = fence + 1 WHERE kind = $1 AND name = $2"
                " RETURNING fence",
                kind,
                name,
            )
            await conn.execute(
                f"INSERT INTO {permits} (kind, name, token, role, fence, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))"
                " ON CONFLICT (kind, name, token) DO UPDATE"
                " SET role = excluded.role, fence = excluded.fence,"
                " expires_at = excluded.expires_at",
                kind,
                name,
                token,
                self.mode,
                fence,
                float(ttl),
            )
        return Attempt(True, int(fence), ttl, queued=self.mode == "write")

    async def release(self, kind: str, name: str, token: str) -> bool:
        live = await self._pg.pool.fetchval(
            f"DELETE FROM {self._permits} WHERE kind = $1 AND name = $2 AND token = $3"
            " RETURNING role <> 'intent' AND expires_at > now()",
            kind,
            name,
            token,
        )
        if live is not None:
            self._wakeups.wake(kind, name)
        return bool(live)

    async def renew(self, kind: str, name: str, token: str, ttl: float) -> bool:
        status: str = await self._pg.pool.execute(
            f"UPDATE {self._permits} SET expires_at = now() + make_interval(secs => $4)"
            " WHERE kind = $1 AND name = $2 AND token = $3 AND role <> 'intent'"
            " AND expires_at > now()",
            kind,
            name,
            token,
            float(ttl),
        )
        return status.endswith(" 1")

    async def holder(self, kind: str, name: str) -> str | None:
        if self.mode == "semaphore":
            return None
        value = await self._pg.pool.fetchval(
            f"SELECT token FROM {self._permits} WHERE kind = $1 AND name = $2"
            " AND role = 'write' AND expires_at > now()",
            kind,
            name,
        )
        return None if value is None else str(value)
