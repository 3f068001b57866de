"""PostgreSQL session store: one table, JSONB, each operation one statement.

``fields`` maps each session key to its value's JSON text, held as a JSONB
string: a value reads back exactly as written (JSONB itself would turn ``1e16``
into an integer and refuse ``\u0000``), and its size is known.  The delta merge
``(fields - deleted) || set`` is evaluated by ``UPDATE`` on the latest row
version (READ COMMITTED re-reads a row it waited for), so two overlapping
requests that change different keys both persist, and the same statement
refuses a merge over ``max_size``.  Expiry is decided by ``now()`` in every
statement; a sweeper deletes the dead rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from asgi_dist.backends import Runtime
from asgi_dist.backends.postgres import PostgresBackend
from asgi_dist.sessions.config import SessionConfig
from asgi_dist.sessions.store import (
    TOO_LARGE,
    SessionDelta,
    SessionInfo,
    SessionKey,
    StoredSession,
    store_outage,
)

__all__ = ["MIGRATIONS", "PostgresSessionStore"]

log = logging.getLogger("asgi_dist.sessions")

MIGRATIONS = [
    """
    CREATE TABLE {ns}_sessions (
        key text PRIMARY KEY,               -- shard.digest: a hash of the id, never the id
        data jsonb NOT NULL DEFAULT '{{}}',
        user_id text,
        created timestamptz NOT NULL,
        accessed timestamptz NOT NULL,
        expires timestamptz NOT NULL,       -- min(last refresh + idle, created + absolute)
        moved boolean NOT NULL DEFAULT false
    );
    CREATE INDEX {ns}_sessions_user ON {ns}_sessions (user_id) WHERE user_id IS NOT NULL;
    CREATE INDEX {ns}_sessions_expires ON {ns}_sessions (expires);
    """,
    # Values as exact JSON texts (see the module docstring).
    """
    ALTER TABLE {ns}_sessions ADD COLUMN fields jsonb NOT NULL DEFAULT '{{}}';
    UPDATE {ns}_sessions SET fields = (
        SELECT coalesce(jsonb_object_agg(k, v::text), '{{}}') FROM jsonb_each(data) AS e(k, v));
    ALTER TABLE {ns}_sessions DROP COLUMN data;
    """,
    # The key a session was regenerated from, which a logout ends too.
    """
    ALTER TABLE {ns}_sessions ADD COLUMN previous text;
    """,
]

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_SWEEP_EVERY = 60.0
_SWEEP_BATCH = 1000


class PostgresSessionStore:
    """Sessions in PostgreSQL (table ``<namespace>_sessions``)."""

    def __init__(self, backend: PostgresBackend, config: SessionConfig, runtime: Runtime) -> None:
        self.backend = backend
        self.config = config
        self.runtime = runtime
        t = backend.table("sessions")
        self._idle = float(config.idle_timeout)
        self._absolute = float(config.absolute_timeout)
        expires = "least(now() + make_interval(secs => $2), created + make_interval(secs => $3))"
        self._load_sql = f"""
            WITH s AS (
                SELECT key, fields, user_id, created, accessed, expires, moved
                FROM {t} WHERE key = $1 AND expires > now()
            ), refreshed AS (
                -- The idle timeout is refreshed at most every tenth of it.
                UPDATE {t} SET accessed = now(), expires = {expires.replace("created", "s.created")}
                FROM s WHERE {t}.key = s.key AND NOT s.moved
                    AND s.accessed <= now() - make_interval(secs => $4)
                RETURNING {t}.expires
            )
            SELECT s.fields::text AS fields, s.user_id, s.moved,
                extract(epoch FROM s.created)::float8 AS created,
                extract(epoch FROM s.accessed)::float8 AS accessed,
                extract(epoch FROM coalesce((SELECT expires FROM refreshed), s.expires) - now())
                    ::float8 AS ttl
            FROM s
        """
        self._create_sql = f"""
            INSERT INTO {t} (key, fields, user_id, created, accessed, expires)
            VALUES ($1, $4::text::jsonb, $5, now(), now(), {expires.replace("created", "now()")})
            ON CONFLICT (key) DO NOTHING RETURNING 1
        """
        merged = "(fields - $4::text[]) || $5::text::jsonb"
        # Only a request that sets something can be refused (as on Redis): one that
        # only deletes shrinks the session, even one stored over a max_size lowered since.
        fits = (
            "($5::text::jsonb = '{}'::jsonb OR (SELECT coalesce(sum(octet_length(k)"
            f" + octet_length(v)), 0) FROM jsonb_each_text({merged}) AS e(k, v)) <= $8)"
        )
        # Over max_size (concurrent requests each grew it), nothing changes and the
        # row says so: its fields then lack what this request set or still hold
        # what it deleted.
        self._save_sql = f"""
            UPDATE {t} SET fields = CASE WHEN {fits} THEN {merged} ELSE fields END,
                accessed = now(), expires = {expires},
                user_id = CASE WHEN $6 AND {fits} THEN $7 ELSE user_id END
            WHERE key = $1 AND expires > now() AND NOT moved
            RETURNING fields @> $5::text::jsonb AND NOT fields ?| $4::text[] AS applied
        """
        self._regenerate_sql = f"""
            WITH old AS (
                UPDATE {t} SET moved = true,
                    expires = least(expires, now() + make_interval(secs => $4))
                WHERE key = $1 AND expires > now() AND NOT moved
                RETURNING fields, user_id, created
            )
            INSERT INTO {t} (key, fields, user_id, created, accessed, expires, previous)
            SELECT $5, fields, user_id, created, now(), {expires}, $1 FROM old
            RETURNING 1
        """
        # A logout ends the session and the ids it was regenerated from: each stays
        # readable, as the same user, for its grace period.  The chain stops where a
        # predecessor is gone; the bound caps the work for a client logging in in a loop.
        self._delete_sql = f"""
            WITH RECURSIVE chain (key, previous, depth) AS (
                SELECT key, previous, 0 FROM {t} WHERE key = $1
                UNION ALL
                SELECT s.key, s.previous, chain.depth + 1
                FROM {t} s JOIN chain ON s.key = chain.previous
                WHERE s.moved AND chain.depth < 100
            )
            DELETE FROM {t} WHERE key IN (SELECT key FROM chain) RETURNING key
        """
        live = "user_id = $1 AND expires > now() AND NOT moved"
        self._list_sql = f"""
            SELECT key, extract(epoch FROM created)::float8 AS created,
                extract(epoch FROM accessed)::float8 AS accessed
            FROM {t} WHERE {live} ORDER BY created
        """
        self._invalidate_user_sql = f"""
            DELETE FROM {t} WHERE user_id = $1
            RETURNING key, (expires > now() AND NOT moved) AS live
        """
        self._sweep_sql = f"""
            DELETE FROM {t} WHERE key IN (
                SELECT key FROM {t} WHERE expires < now() LIMIT {_SWEEP_BATCH})
        """

    async def start(self) -> None:
        self.runtime.spawn("sessions:postgres-sweeper", self._sweeper)

    async def stop(self) -> None:
        return None

    async def _sweeper(self) -> None:
        # Statements ignore dead rows already; this only gives their space back.
        while not self.runtime.stopping.is_set():
            await asyncio.sleep(_SWEEP_EVERY)
            try:
                for _ in range(100):
                    status = await self._call("execute", self._sweep_sql)
                    if status != f"DELETE {_SWEEP_BATCH}":
                        break
            except Exception as exc:
                log.warning("session sweep failed (%s); retrying in %gs", exc, _SWEEP_EVERY)

    async def _call(self, method: str, query: str, *args: Any) -> Any:
        """``pool.<method>(query, *args)`` bounded by store_timeout."""
        pool = self.backend.pool
        conn = None
        try:
            async with asyncio.timeout(self.config.store_timeout):
                conn = await pool.acquire()
                return await getattr(conn, method)(query, *args)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if conn is not None:
                # asyncpg would cancel the statement on the server and reset the
                # connection before releasing it: against a paused server that holds
                # the request as long as the pause.  Drop the connection instead.
                conn.terminate()
            if isinstance(exc, TimeoutError):
                raise self._outage(exc, conn) from exc
            raise
        except Exception as exc:
            outage = self._outage(exc, conn)
            if outage is exc:
                raise
            raise outage from exc
        finally:
            if conn is not None:
                await pool.release(conn)

    def _outage(self, exc: Exception, conn: Any) -> Exception:
        where = f"PostgreSQL at {self.backend.where}"
        outage = store_outage(exc, where, self.config.store_timeout, conn)
        return exc if outage is None else outage

    def _timeouts(self) -> tuple[float, float]:
        return self._idle, self._absolute

    async def load(self, key: SessionKey) -> StoredSession | None:
        row = await self._call(
            "fetchrow", self._load_sql, key.handle, *self._timeouts(), self.config.refresh_interval
        )
        if row is None:
            return None
        fields: dict[str, str] = json.loads(row["fields"])
        return StoredSession(
            fields=fields,
            user_id=row["user_id"],
            created=row["created"],
            last_access=row["accessed"],
            ttl=max(0.0, row["ttl"]),
            moved=row["moved"],
        )

    @staticmethod
    def _object(fields: dict[str, str]) -> str:
        # Each value's JSON text becomes a JSONB string.
        return _encode(fields)

    async def create(self, key: SessionKey, delta: SessionDelta) -> int:
        done = await self._call(
            "fetchval",
            self._create_sql,
            key.handle,
            *self._timeouts(),
            self._object(delta.set),
            delta.user_id,
        )
        return 1 if done == 1 else 0

    async def save(self, key: SessionKey, delta: SessionDelta) -> int:
        applied = await self._call(
            "fetchval",
            self._save_sql,
            key.handle,
            *self._timeouts(),
            delta.delete,
            self._object(delta.set),
            delta.user_changed,
            delta.user_id,
            self.config.max_size,
        )
        if applied is None:
            return 0  # gone
        # No versions here: the near cache is Redis only.
        return 1 if applied else TOO_LARGE

    async def regenerate(self, old: SessionKey, new: SessionKey, user_id: str | None) -> bool:
        done = await self._call(
            "fetchval",
            self._regenerate_sql,
            old.handle,
            *self._timeouts(),
            float(self.config.regenerate_grace),
            new.handle,
        )
        return bool(done == 1)

    async def delete(self, key: SessionKey, user_id: str | None) -> list[str]:
        rows = await self._call("fetch", self._delete_sql, key.handle)
        return [r["key"] for r in rows]

    async def list_user(self, user_id: str) -> list[SessionInfo]:
        rows = await self._call("fetch", self._list_sql, user_id)
        return [SessionInfo(r["key"], user_id, r["created"], r["accessed"]) for r in rows]

    async def invalidate_user(self, user_id: str) -> list[str]:
        rows = await self._call("fetch", self._invalidate_user_sql, user_id)
        return [r["key"] for r in rows if r["live"]]
