"""Leases in PostgreSQL: one row per name, fence and expiry decided by the database.

Each operation is a single statement (no session state, no advisory lock), so
it works behind PgBouncer in transaction pooling mode.  Expiry compares with
the database's ``now()``; the fence is the row's counter, incremented by the
same statement that grants the lease and kept when it is released.

Releases wake waiters through LISTEN/NOTIFY: the release statement itself
calls ``pg_notify`` (delivered at commit), and each Dist keeps one connection
listening on the namespace's channel, demultiplexed to its waiters by the
payload.  Where notifications do not arrive (PgBouncer transaction pooling
gives no session to LISTEN on; the probe at start finds out) or while the
listening connection is down, waiters fall back to polling every
``poll_interval``, bounded by the holder's remaining lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Sequence
from typing import Any

import asyncpg

from asgi_dist.backends.postgres import PostgresBackend
from asgi_dist.locks.backend import Attempt, LocalWakeups, Renewal, Watch, limit_mismatch

__all__ = ["MIGRATIONS", "PostgresLeases", "PostgresPermitLeases", "PostgresWakeups"]

log = logging.getLogger("asgi_dist.locks")

# How long a waiting writer's intent blocks new readers unless refreshed: a
# waiting writer attempts again every third of it (its liveness), so that a
# crashed one blocks readers this long at most.
_INTENT_LIVENESS = 10.0

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


# Below this pool size no connection is held in LISTEN (see PostgresWakeups._listen).
_LISTEN_MIN_POOL = 3


class PostgresWakeups:
    """One LISTEN connection per Dist, shared by its PostgreSQL lease backends.

    ``listening`` is True only while notifications are known to arrive: LISTEN
    was acknowledged *and* a probe notification came back through it.
    """

    def __init__(self, postgres: PostgresBackend, *, probe_timeout: float = 1.0) -> None:
        self._pg = postgres
        self.channel = postgres.table("lease_released")
        self.local = LocalWakeups()
        self.listening = False
        self._probe_timeout = probe_timeout
        self._conn: Any = None
        self._starting: asyncio.Task[None] | None = None
        self._probe = f"probe:{secrets.token_hex(8)}"
        self._probed = asyncio.Event()
        self._gave_up = False
        self._closed = False

    def payload(self, kind: str, name: str) -> str:
        return json.dumps([kind, name])

    async def ensure(self) -> None:
        """Listen (once; again after the connection was lost) before a waiter's attempt."""
        if self.listening or self._gave_up or self._closed:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._listen())
        try:
            await asyncio.shield(self._starting)
        except Exception:
            log.debug("could not LISTEN for lease releases; polling", exc_info=True)

    async def _listen(self) -> None:
        if self._pg.pool.get_max_size() < _LISTEN_MIN_POOL:
            # The LISTEN connection is held for good, and the outbox relay may hold
            # another: in a pool this small, work would wait for a connection forever.
            log.info(
                "the PostgreSQL pool has max_size < %d: lease waiters poll instead of "
                "holding a connection in LISTEN",
                _LISTEN_MIN_POOL,
            )
            self._gave_up = True
            return
        conn = await self._pg.pool.acquire()
        try:
            await conn.add_listener(self.channel, self._on_notify)
            conn.add_termination_listener(self._on_lost)
            self._probed.clear()
            await self._pg.pool.execute("SELECT pg_notify($1, $2)", self.channel, self._probe)
            try:
                async with asyncio.timeout(self._probe_timeout):
                    await self._probed.wait()
            except TimeoutError:
                # Typically PgBouncer in transaction mode: the notification went
                # to whichever client held the server connection.  Poll instead.
                log.info("lease release notifications do not arrive here; waiters poll")
                self._gave_up = True
                await conn.remove_listener(self.channel, self._on_notify)
                await self._pg.pool.release(conn)
                return
        except BaseException:
            await self._pg.pool.release(conn)
            raise
        self._conn = conn
        self.listening = True
        # Releases may have been missed while nobody listened.
        self.local.wake_all()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload == self._probe:
            self._probed.set()
            return
        try:
            kind, name = json.loads(payload)
        except (ValueError, TypeError):
            return
        self.local.wake(str(kind), str(name))

    def _on_lost(self, conn: Any) -> None:
        if conn is self._conn:
            self._conn = None
            self.listening = False
            self.local.wake_all()  # re-check now; polling until listening again

    def on_start(self) -> None:
        """Listen again after a stop (on this start's loop, which may be another)."""
        self._closed = False
        self._gave_up = False
        self._starting = None
        self._probed = asyncio.Event()

    async def close(self) -> None:
        self._closed = True
        self.listening = False
        conn, self._conn = self._conn, None
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        if conn is not None:
            try:
                await conn.remove_listener(self.channel, self._on_notify)
                await self._pg.pool.release(conn)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
                log.debug("closing the LISTEN connection failed", exc_info=True)


class PostgresLeases:
    """:class:`~asgi_dist.locks.backend.LeaseBackend` on PostgreSQL."""

    name = "postgres"

    def __init__(
        self,
        postgres: PostgresBackend,
        poll_interval: float = 0.25,
        wakeups: PostgresWakeups | None = None,
    ) -> None:
        self._pg = postgres
        self._poll_interval = poll_interval
        self._notify = wakeups if wakeups is not None else PostgresWakeups(postgres)
        self._wakeups = self._notify.local
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
        # The notification is sent when the statement commits, only if it released.
        self._release_sql = f"""
            UPDATE {table} SET token = NULL
            WHERE kind = $1 AND name = $2 AND token = $3 AND expires_at > now()
            RETURNING pg_notify($4, $5)
        """
        self._renew_sql = f"""
            UPDATE {table} SET expires_at = now() + make_interval(secs => $4)
            WHERE kind = $1 AND name = $2 AND token = $3 AND expires_at > now()
        """
        self._holder_sql = f"""
            SELECT token FROM {table} WHERE kind = $1 AND name = $2 AND expires_at > now()
        """

    @property
    def poll_interval(self) -> float | None:
        # Listening: waiters sleep until a notification or the holder's expiry.
        return None if self._notify.listening else self._poll_interval

    async def acquire(self, kind: str, name: str, token: str, ttl: float) -> Attempt:
        row = await self._pg.pool.fetchrow(self._acquire_sql, kind, name, token, float(ttl))
        assert row is not None
        if row["fence"] is not None:
            return Attempt(True, int(row["fence"]), ttl)
        remaining = row["remaining"]
        return Attempt(False, 0, -1.0 if remaining is None else float(remaining))

    async def release(self, kind: str, name: str, token: str) -> bool:
        status: str = await self._pg.pool.execute(
            self._release_sql,
            kind,
            name,
            token,
            self._notify.channel,
            self._notify.payload(kind, name),
        )
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
        watch = self._wakeups.watch(kind, name)
        try:
            await self._notify.ensure()  # listening before the next attempt
        except BaseException:
            watch.close()
            raise
        return watch


class PostgresPermitLeases(PostgresLeases):
    """Semaphore permits (``mode="semaphore"``) and rwlock sides (``"read"``/``"write"``).

    An acquire is one short transaction: it locks the name's row in the lease
    table (the serialisation point and fence counter), drops expired permits,
    decides on the live ones, and inserts its permit.  Transaction-scoped, so
    PgBouncer's transaction pooling is fine.
    """

    def __init__(
        self,
        postgres: PostgresBackend,
        mode: str,
        limit: int = 0,
        wakeups: PostgresWakeups | None = None,
    ) -> None:
        super().__init__(postgres, wakeups=wakeups)
        self.mode = mode
        self.limit = limit
        self.shared = mode != "write"  # several holders at once (see RedisLeases)
        self._leases = postgres.table("leases")
        self._permits = postgres.table("permits")

    @property
    def poll_interval(self) -> float | None:
        interval = super().poll_interval
        if self.mode != "write":
            return interval
        # A waiting writer refreshes its intent, or readers it should hold
        # back would come in once it lapsed, while the readers before it renew.
        refresh = _INTENT_LIVENESS / 3
        return refresh if interval is None else min(interval, refresh)

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
                # Permits carry the limit they were granted under ('semaphore:5').
                for r in holders:
                    granted_under = r["role"].partition(":")[2]
                    if granted_under.isdigit() and int(granted_under) != self.limit:
                        raise limit_mismatch(kind, name, int(granted_under), self.limit)
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
                        " VALUES ($1, $2, $3, 'intent', 0, now() + make_interval(secs => $4))"
                        " ON CONFLICT (kind, name, token) DO UPDATE"
                        " SET expires_at = excluded.expires_at",
                        kind,
                        name,
                        token,
                        _INTENT_LIVENESS,
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
                f"semaphore:{self.limit}" if self.mode == "semaphore" else self.mode,
                fence,
                float(ttl),
            )
        return Attempt(True, int(fence), ttl, queued=self.mode == "write")

    async def release(self, kind: str, name: str, token: str) -> bool:
        live = await self._pg.pool.fetchval(
            f"DELETE FROM {self._permits} WHERE kind = $1 AND name = $2 AND token = $3"
            " RETURNING role <> 'intent' AND expires_at > now(), pg_notify($4, $5)",
            kind,
            name,
            token,
            self._notify.channel,
            self._notify.payload(kind, name),
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
